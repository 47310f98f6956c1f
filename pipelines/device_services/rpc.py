"""Remote procedure calls as Golioth's Firmware SDK expects them (``src/rpc.c``).

Operators (``pipeline rpc``, ``POST /v1/devices/{device}/rpc``, or this coroutine)::

    result = await call(store, "cam-01", "multiply", [3, 4], timeout=10)
    result.status_code, result.detail          # 0 and {"value": 12.0}
    # raises RpcTimeout when the device is offline or too slow: never waits longer than timeout

A call is a row in the router's store (``rpc_calls``): whichever process holds the device's
observation of ``/.rpc`` sends it (the CLI is another process; with ``--workers`` the device
may be on any of them), and the caller watches the row for the answer. Calls wait for a device
that starts observing before their deadline; after it they are ``expired``. A device gets one
call at a time, in order (the next once it answered or the call expired). A call sent on an
observation that then ends unanswered (the device deregistered, answered RST, or observes again
from a new session) is sent again: at least once, like Golioth's.

Devices (CoAP, under ``/.rpc``):

* ``GET /.rpc`` (Observe; CBOR): the first answer is the CBOR text ``"OK"`` (what the SDK
  expects); each call is then a notification, CBOR ``{"id": ID, "method": M, "params": [...]}``.
* ``POST /.rpc/status``: the answer, CBOR ``{"id": ID, "statusCode": N, "detail": {...}}``
  (``golioth_rpc_status``: 0 OK, 5 NOT_FOUND, ...). An id the router never issued to this
  device: 4.04 with the reason; an id whose call already timed out: 4.04 saying so; a repeat
  of an answer already taken: 2.04, taken once. Malformed answers: 4.00 with the reason.

An answer also enters the pipelines as a message from the device on ``/.rpc/result``
(``application/json``: ``{"id", "method", "params", "statusCode", "status", "detail"}``),
the way prediction results come back, so a pipeline can route it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiocoap
import cbor2
from aiocoap import Code, resource

from pipelines.device_services.common import (
    CF_CBOR,
    ChangePoller,
    Refusal,
    Server,
    ServiceResource,
    Tables,
    add_at,
    decode_cbor_or_json,
    refuse,
    small_body,
)
from pipelines.ingest import Overloaded
from pipelines.message import Message
from pipelines.store import Store

log = logging.getLogger("pipelines.device_services.rpc")

TABLES = Tables("rpc", """
CREATE TABLE IF NOT EXISTS rpc_calls(
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, device_id TEXT NOT NULL,
  method TEXT NOT NULL, params TEXT NOT NULL, created_at REAL NOT NULL, deadline REAL NOT NULL,
  state TEXT NOT NULL, sent_at REAL, project_id TEXT, status_code INTEGER, detail TEXT,
  answered_at REAL);
CREATE INDEX IF NOT EXISTS rpc_calls_waiting ON rpc_calls(state, device_id);
CREATE INDEX IF NOT EXISTS rpc_calls_age ON rpc_calls(created_at);
""")

POLL_INTERVAL = 0.1        # how soon a serving process sees a call made by another process
ANSWER_POLL = 0.05         # how often a caller looks for the answer
MAX_TIMEOUT = 300.0
RESULT_PATH = "/.rpc/result"
KEEP_CALLS = 7 * 86400     # seconds a finished call stays in the store (``pipeline rpc --list``)
_METHOD_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
STATUS_NAMES = ("OK", "CANCELED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                "UNAUTHENTICATED")


class RpcError(ValueError):
    """A call that cannot be made as asked (bad method name, params, timeout)."""


class RpcTimeout(TimeoutError):
    """The device did not answer in time; the message says whether the call reached it."""


@dataclass(frozen=True)
class RpcResult:
    id: str
    device_id: str
    method: str
    status_code: int
    detail: Any

    @property
    def status(self) -> str:
        return STATUS_NAMES[self.status_code] if 0 <= self.status_code < len(STATUS_NAMES) else str(self.status_code)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "device_id": self.device_id, "method": self.method,
                "statusCode": self.status_code, "status": self.status, "detail": self.detail}


def _jsonable(value: Any) -> Any:
    """CBOR from a device as JSON: byte strings become base64 text, other keys become text."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN has no JSON form
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


async def call(store: Store, device_id: str, method: str, params: list[Any] | None = None, *,
               timeout: float = 10.0) -> RpcResult:
    """Call ``method`` on the device and wait for its answer (see the module docstring)."""
    if not _METHOD_RE.match(method):
        raise RpcError(f"method {method!r}: use 1-64 letters, digits, '_', '.', ':' or '-'")
    if not isinstance(params, list | type(None)):
        raise RpcError("params must be a list")
    if not 0 < timeout <= MAX_TIMEOUT:
        raise RpcError(f"timeout {timeout:g}s: give more than 0 and at most {MAX_TIMEOUT:g} seconds")
    try:
        params_json = json.dumps(params or [], allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RpcError(f"params are not plain JSON values: {exc}") from None
    await TABLES.ready(store)
    call_id = uuid.uuid4().hex[:16]
    now = time.time()
    deadline = now + timeout

    def insert(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO rpc_calls(id, device_id, method, params, created_at, deadline, state)"
                     " VALUES (?,?,?,?,?,?, 'pending')", (call_id, device_id, method, params_json, now, deadline))
        conn.execute("DELETE FROM rpc_calls WHERE created_at < ?", (now - KEEP_CALLS,))
    await store.run(insert)

    def look(conn: sqlite3.Connection) -> tuple[str, int | None, str | None, float | None]:
        return conn.execute("SELECT state, status_code, detail, sent_at FROM rpc_calls WHERE id = ?",
                            (call_id,)).fetchone()

    def expire(conn: sqlite3.Connection) -> tuple[str, int | None, str | None, float | None]:
        conn.execute("UPDATE rpc_calls SET state = 'expired' WHERE id = ? AND state IN ('pending', 'sent')",
                     (call_id,))
        return look(conn)

    while True:
        left = deadline - time.time()
        row = await store.run(look if left > 0 else expire)
        if row[0] == "answered":
            return RpcResult(call_id, device_id, method, int(row[1] or 0), json.loads(row[2] or "null"))
        if left <= 0:
            reached = ("the call was sent to it, no answer came" if row[3] is not None
                       else "it is not observing /.rpc: offline?")
            raise RpcTimeout(f"device {device_id} did not answer {method} within {timeout:g}s ({reached})")
        await asyncio.sleep(min(ANSWER_POLL, max(left, 0.001)))


async def calls(store: Store, device_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recent calls, newest first."""
    await TABLES.ready(store)
    sql = ("SELECT id, device_id, method, params, state, status_code, detail, created_at, answered_at"
           " FROM rpc_calls")
    args: tuple[Any, ...] = ()
    if device_id is not None:
        sql += " WHERE device_id = ?"
        args = (device_id,)
    rows = await store.run(lambda c: c.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall())
    return [{"id": r[0], "device_id": r[1], "method": r[2], "params": json.loads(r[3]), "state": r[4],
             "statusCode": r[5], "detail": json.loads(r[6]) if r[6] else None, "created_at": r[7],
             "answered_at": r[8]} for r in rows]


class RpcResource(ServiceResource, resource.ObservableResource):
    """``/.rpc`` and ``/.rpc/status`` (module docstring)."""

    link = {"rt": "x.rpc", "obs": None, "title": "remote procedure calls: /.rpc, /.rpc/status"}

    def __init__(self, server: Server, store: Store) -> None:
        super().__init__(server, store)
        # new calls, and calls answered or given up (the next one of that device may go)
        self.poller = ChangePoller(store, "SELECT (SELECT MAX(seq) FROM rpc_calls), (SELECT COUNT(*)"
                                   " FROM rpc_calls WHERE state IN ('answered', 'expired'))", POLL_INTERVAL, TABLES)
        self.observers: dict[str, list[_Observer]] = {}
        self._sending = asyncio.Lock()

    async def render_get(self, request):
        self.server.who(request)
        if self._path(request):
            raise refuse(Code.NOT_FOUND, "RPC: observe /.rpc, answer with POST /.rpc/status")
        if request.opt.accept not in (None, CF_CBOR):
            raise refuse(Code.NOT_ACCEPTABLE, "RPC calls are sent as CBOR (60)")
        return aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps("OK"), content_format=CF_CBOR)

    async def render_post(self, request):
        who = self.server.who(request)
        if self._path(request) != ["status"]:
            raise refuse(Code.METHOD_NOT_ALLOWED, "RPC: answer with POST /.rpc/status")
        # not rate limited: an answer to the router's own call (the SDK does not send it again)
        body = small_body(request, 16 << 10, "an RPC answer")
        answer = decode_cbor_or_json(body, request.opt.content_format, "the RPC answer")
        if not isinstance(answer, dict):
            raise refuse(Code.BAD_REQUEST, "an RPC answer is a map {id, statusCode, detail?}")
        call_id, code = answer.get("id"), answer.get("statusCode")
        if not isinstance(call_id, str) or not call_id:
            raise refuse(Code.BAD_REQUEST, "RPC answer: 'id' must be the call's id (text)")
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code < 1 << 16:
            raise refuse(Code.BAD_REQUEST, "RPC answer: 'statusCode' must be a whole number")
        detail = _jsonable(answer.get("detail"))
        now = time.time()
        await TABLES.ready(self.store)

        def op(conn: sqlite3.Connection) -> tuple[str, tuple | None]:
            row = conn.execute("SELECT state, method, params FROM rpc_calls WHERE id = ? AND device_id = ?",
                               (call_id, who.device_id)).fetchone()
            if row is None:
                return "unknown", None
            if row[0] in ("pending", "sent"):
                conn.execute("UPDATE rpc_calls SET state = 'answered', status_code = ?, detail = ?,"
                             " answered_at = ?, project_id = ? WHERE id = ?",
                             (code, json.dumps(detail), now, who.project_id, call_id))
                return "taken", row
            return row[0], row

        outcome, row = await self.store.run(op)
        if outcome == "unknown":
            raise refuse(Code.NOT_FOUND, f"RPC id {call_id[:40]!r} was never issued to {who.device_id}")
        if outcome == "expired":
            raise refuse(Code.NOT_FOUND, f"RPC call {call_id} already timed out; its caller has gone")
        if outcome == "taken" and row is not None:
            result = RpcResult(call_id, who.device_id, row[1], code, detail)
            body = {**result.as_dict(), "params": json.loads(row[2])}
            body.pop("device_id")
            msg = Message.new(device_id=who.device_id, project_id=who.project_id, path=RESULT_PATH,
                              content_type="application/json", payload=json.dumps(body).encode())
            try:
                await self.server.target.accept(msg)
            except Overloaded:  # the caller has its answer; the pipelines miss this one
                log.warning("RPC result %s from %s not routed: the router is full", call_id, who.device_id)
            self._changed()  # the device's next call may go
        return aiocoap.Message(code=Code.CHANGED)

    async def add_observation(self, request, serverobservation):
        try:
            who = self.server.who(request)
        except Refusal:
            return
        if self._path(request) or request.opt.accept not in (None, CF_CBOR):
            return
        device = who.device_id
        watch = _Observer(serverobservation)
        self.observers.setdefault(device, []).append(watch)
        stop = self.poller.listen(self._changed)
        # a device that observes (again) has lost what was in flight on its old session: send
        # its unanswered call again, then the calls made while it was away
        asyncio.get_running_loop().create_task(self._resend(device))

        def cancelled() -> None:
            stop()
            lst = self.observers.get(device, [])
            if watch in lst:
                lst.remove(watch)
            if not lst:
                self.observers.pop(device, None)
            if watch.sent:  # the device dropped the observation (deregistered, or RST): not taken
                asyncio.get_running_loop().create_task(self._requeue(set(watch.sent)))

        serverobservation.accept(cancelled)

    def _changed(self) -> None:
        asyncio.get_running_loop().create_task(self._send_waiting())

    async def _resend(self, device: str) -> None:
        with contextlib.suppress(Exception):
            await TABLES.ready(self.store)
            await self.store.run(lambda c: c.execute(
                "UPDATE rpc_calls SET state = 'pending', sent_at = NULL WHERE state = 'sent' AND device_id = ?",
                (device,)) and None)
        await self._send_waiting()

    async def _requeue(self, ids: set[str]) -> None:
        marks = ",".join("?" * len(ids))
        with contextlib.suppress(Exception):
            await self.store.run(lambda c: c.execute(
                f"UPDATE rpc_calls SET state = 'pending', sent_at = NULL WHERE state = 'sent' AND id IN ({marks})",
                tuple(ids)) and None)
            self._changed()

    async def _send_waiting(self) -> None:
        """Claim the next waiting call of each device observing here, and notify it. One call at
        a time per device: the SDK handles one at a time, and aiocoap keeps only the newest of
        two notifications triggered before the first went out (Observe is lossy)."""
        async with self._sending:
            devices = list(self.observers)
            if not devices:
                return
            now = time.time()

            def claim(conn: sqlite3.Connection) -> list[tuple[str, str, str, str]]:
                marks = ",".join("?" * len(devices))
                busy = {r[0] for r in conn.execute(
                    f"SELECT DISTINCT device_id FROM rpc_calls WHERE state = 'sent' AND deadline > ?"
                    f" AND device_id IN ({marks})", (now, *devices))}
                rows = []
                for r in conn.execute(
                        f"SELECT id, device_id, method, params FROM rpc_calls WHERE state = 'pending'"
                        f" AND deadline > ? AND device_id IN ({marks}) ORDER BY seq", (now, *devices)):
                    if r[1] not in busy:
                        busy.add(r[1])
                        rows.append(r)
                for r in rows:
                    conn.execute("UPDATE rpc_calls SET state = 'sent', sent_at = ? WHERE id = ?", (now, r[0]))
                return rows

            try:
                await TABLES.ready(self.store)
                rows = await self.store.run(claim)
            except Exception:
                log.exception("claiming RPC calls")
                return
            for call_id, device, method, params in rows:
                body = cbor2.dumps({"id": call_id, "method": method, "params": json.loads(params)})
                for watch in list(self.observers.get(device, [])):
                    watch.sent.add(call_id)
                    # confirmable: a device that no longer knows the observation answers RST
                    watch.observation.trigger(aiocoap.Message(code=Code.CONTENT, payload=body,
                                                              content_format=CF_CBOR,
                                                              transport_tuning=aiocoap.Reliable))


class _Observer:
    """One observation of ``/.rpc`` and the calls sent through it."""

    def __init__(self, observation: Any) -> None:
        self.observation = observation
        self.sent: set[str] = set()


def add_resources(site: resource.Site, server: Server, store: Store) -> RpcResource:
    res = RpcResource(server, store)
    add_at(site, ".rpc", res)
    return res


def http_routes(store: Store) -> list:
    """``POST /v1/devices/{device}/rpc`` with ``{"method": M, "params": [...], "timeout": S}``:
    200 with the answer, 504 when the device did not answer in time, 400 for a bad request."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def problem(status: int, title: str, detail: str) -> Response:
        return JSONResponse({"title": title, "status": status, "detail": detail}, status_code=status,
                            media_type="application/problem+json")

    async def rpc(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            return problem(400, "Bad Request", f"the body is not JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            return problem(400, "Bad Request", 'send {"method": "name", "params": [...], "timeout": seconds}')
        timeout = body.get("timeout", 10)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool):
            return problem(400, "Bad Request", "timeout must be a number of seconds")
        try:
            result = await call(store, request.path_params["device"], body["method"], body.get("params"),
                                timeout=float(timeout))
        except RpcError as exc:
            return problem(400, "Bad Request", str(exc))
        except RpcTimeout as exc:
            return problem(504, "Gateway Timeout", str(exc))
        return JSONResponse(result.as_dict())

    return [Route("/v1/devices/{device}/rpc", rpc, methods=["POST"])]
