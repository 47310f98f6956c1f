"""What the device services share: their store tables, Block2 answers, change polling.

Usage::

    TABLES = Tables("ota", '''CREATE TABLE IF NOT EXISTS ota_x(...);''')
    await TABLES.ready(store)                  # once per Store object; idempotent DDL
    rows = await store.run(lambda conn: conn.execute(...).fetchall())

    answer = block2_answer(request, body, content_format=42)   # one block, from its number

    poller = ChangePoller(store, "SELECT MAX(id) FROM ota_releases", tables=TABLES)
    stop = poller.listen(callback)             # callback() on the loop when the value changes

    # in add_observation: notify when poller sees a change and current() gives something new
    await notify_changes(serverobservation, poller, current, lambda value: answer_for(value))

Each service owns its tables (``CREATE TABLE IF NOT EXISTS``, run in the store's writer
transaction on first use), so the store module does not need to know about them, and the CLI
(another process) sees the same rows. A ``pipeline`` command writes in its own process; the
serving process notices through ``ChangePoller``: one cheap query every ``interval`` while
something listens (the same way ingest-only workers watch device state), nothing otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import aiocoap
from aiocoap import Code, resource
from aiocoap.optiontypes import BlockOption

from pipelines.ingest.coap import _Base, _error, _Refusal, _Server
from pipelines.store import Store

log = logging.getLogger("pipelines.device_services")

CF_OCTET_STREAM = 42
CF_JSON = 50
CF_CBOR = 60
MAX_SZX = 6  # 1024-byte blocks: what the SDK asks for (CONFIG_GOLIOTH_BLOCKWISE_DOWNLOAD_MAX_BLOCK_SIZE)

Refusal = _Refusal
Server = _Server
error = _error


class Tables:
    """A service's DDL, run once per ``Store`` object (statements are idempotent)."""

    def __init__(self, name: str, ddl: str) -> None:
        self.name = name
        self.statements = [s.strip() for s in ddl.split(";") if s.strip()]
        self._done: weakref.WeakSet[Store] = weakref.WeakSet()

    async def ready(self, store: Store) -> Store:
        if store not in self._done:
            def op(conn: sqlite3.Connection) -> None:
                for statement in self.statements:
                    conn.execute(statement)
            await store.run(op)
            self._done.add(store)
        return store


class PastEnd(Exception):
    """A Block2 request for a block after the last one."""


def block2_answer(request: aiocoap.Message, body: bytes, *, content_format: int,
                  etag: bytes | None = None, code: Code = Code.CONTENT) -> aiocoap.Message:
    """The block of ``body`` the request's Block2 option names (block 0 without one), with
    Block2 (when the body spans blocks or one was asked for) and Size2.

    Stateless: any block can be asked for at any time from any endpoint (a download resumed
    after a reconnect). aiocoap's own Block2 support keeps the rendered body per endpoint and
    answers 4.08 to a block from an endpoint it has not seen start the transfer; resources
    using this answer ``needs_blockwise_assembly`` with False. Raises ``PastEnd``."""
    b2 = request.opt.block2
    if b2 is None:
        num, szx = 0, MAX_SZX
    else:
        num, szx = b2.block_number, b2.size_exponent
        if szx > MAX_SZX:  # larger (or BERT) asked: answer with 1024-byte blocks, same offset
            num, szx = num << (szx - MAX_SZX), MAX_SZX
    size = 1 << (szx + 4)
    start = num * size
    if start >= len(body) and num > 0:
        raise PastEnd(f"block {num} is past the end: {len(body)} bytes are "
                      f"{max(1, -(-len(body) // size))} blocks of {size}")
    more = start + size < len(body)
    msg = aiocoap.Message(code=code, payload=body[start:start + size], content_format=content_format)
    if b2 is not None or more:
        msg.opt.block2 = BlockOption.BlockwiseTuple(num, more, szx)
    msg.opt.size2 = len(body)
    if etag is not None:
        msg.opt.etag = etag
    return msg


def first_block(response: aiocoap.Message) -> aiocoap.Message:
    """A notification carries at most block 0; the observer asks for the rest (RFC 7959 §3.4)."""
    if len(response.payload) <= 1 << (MAX_SZX + 4):
        return response
    probe = aiocoap.Message(code=Code.GET)
    return block2_answer(probe, response.payload, content_format=response.opt.content_format or 0,
                         etag=response.opt.etag, code=response.code)


class ChangePoller:
    """Watch one cheap query's value; tell listeners when it changes (see module docstring)."""

    def __init__(self, store: Store, sql: str, interval: float = 0.2, tables: Tables | None = None) -> None:
        self.store = store
        self.tables = tables
        self.sql = sql
        self.interval = interval
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.last: Any = None

    def listen(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"poll {self.sql}")

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)
            if not self._listeners and self._task is not None:
                self._task.cancel()
                self._task = None
        return stop

    def poke(self) -> None:
        """Look now (a change made in this process)."""
        self._wake.set()

    async def _probe(self) -> Any:
        if self.tables is not None:
            await self.tables.ready(self.store)
        return await self.store.run(lambda conn: tuple(conn.execute(self.sql).fetchone()))

    async def _run(self) -> None:
        with contextlib.suppress(Exception):
            self.last = await self._probe()
        while self._listeners:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                value = await self._probe()
            except Exception:
                log.exception("polling %s", self.sql)
                continue
            if value != self.last:
                self.last = value
                for cb in list(self._listeners):
                    try:
                        cb()
                    except Exception:
                        log.exception("change listener failed")


class ServiceResource(_Base):
    """Base of the services' resources: refusals (``Refusal``) become their answers (as in
    ingest's resources, whose base this is), and they keep the store."""

    link: dict[str, Any] = {}

    def __init__(self, server: _Server, store: Store) -> None:
        super().__init__(server)
        self.store = store

    async def needs_blockwise_assembly(self, request):
        return False  # bodies are small (checked), and Block2 is answered per block

    def _path(self, request: aiocoap.Message) -> list[str]:
        return [p for p in request.opt.uri_path if p != ""]


async def notify_changes(serverobservation: Any, poller: ChangePoller, current: Callable[[], Awaitable[Any]],
                         answer: Callable[[Any], aiocoap.Message]) -> None:
    """Keep one observation fed: whenever ``poller`` sees a change, ask ``current()`` again and,
    if it differs from what the observer last got, send ``first_block(answer(value))``. The
    first answer is rendered by the resource's ``render_get``; this remembers what it was."""
    try:
        last: list[Any] = [await current()]
    except Exception:
        last = [None]
    pending: list[asyncio.Task] = []

    async def notify() -> None:
        try:
            value = await current()
        except Exception:
            return
        if value != last[0]:
            last[0] = value
            serverobservation.trigger(first_block(answer(value)))

    def changed() -> None:
        pending[:] = [t for t in pending if not t.done()]
        pending.append(asyncio.get_running_loop().create_task(notify()))

    stop = poller.listen(changed)

    def cancelled() -> None:
        stop()
        for t in pending:
            t.cancel()

    serverobservation.accept(cancelled)


def refuse(code: Code, reason: str) -> _Refusal:
    return _Refusal(_error(code, reason))


def decode_cbor_or_json(payload: bytes, content_format: int | None, what: str) -> Any:
    """A device's report: CBOR (what the SDK sends) or JSON; anything else is a clear 4.xx."""
    import json

    import cbor2
    if content_format == CF_CBOR:
        try:
            return cbor2.loads(payload)
        except Exception as exc:  # cbor2 raises several types for bad input
            raise refuse(Code.BAD_REQUEST, f"{what} is not valid CBOR: {exc}") from None
    if content_format in (None, CF_JSON):
        try:
            return json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise refuse(Code.BAD_REQUEST, f"{what} is not valid JSON: {exc}") from None
    raise refuse(Code.UNSUPPORTED_CONTENT_FORMAT, f"{what} takes CBOR (60) or JSON (50)")


class ExactPath(resource.Resource):
    """aiocoap's Site hands a path-capable resource only the paths *below* where it is added
    (``/.c/status``, not ``/.c``): this serves the exact path through the same resource."""

    def __init__(self, target: resource.Resource) -> None:
        super().__init__()
        self.target = target

    async def render_to_pipe(self, pipe) -> None:
        await self.target.render_to_pipe(pipe)

    def get_link_description(self):
        return self.target.link


def add_at(site: resource.Site, name: str, res: ServiceResource) -> None:
    """``res`` answers ``/<name>`` and everything below it."""
    site.add_resource([name], res)
    site.add_resource([name], ExactPath(res))


def small_body(request: aiocoap.Message, limit: int, what: str) -> bytes:
    """The payload of a device's report or answer: one message (the SDK never splits these),
    at most ``limit`` bytes. Block1, or more: 4.13 with Size1 and the reason."""
    if request.opt.block1 is not None or len(request.payload) > limit:
        msg = _error(Code.REQUEST_ENTITY_TOO_LARGE, f"{what} must come in one message of at most {limit} bytes")
        msg.opt.size1 = limit
        raise _Refusal(msg)
    return request.payload
