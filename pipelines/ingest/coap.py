"""Device ingestion over CoAP: DTLS 1.2 on 5684 (``dtls_server``), plain CoAP on 5683 (only when enabled).

Usage::

    settings = CoapSettings(host="192.0.2.10", registry_path="devices.yaml")
    async with CoapIngest(router, settings) as server:     # router implements IngestTarget
        print(server.dtls_port, server.port)                # the ports actually bound
        ...
    await serve_coap(router, settings)                       # or: run until cancelled

Resources (see ``/work/shared/specs/devices.md``):

* ``POST /.s/<path>``: one message into the pipelines, path ``/<path>`` (``POST /.s/``: path
  ``/``); Block1 uploads are
  reassembled here (``coap_blockwise``) with a body limit, a memory cap and expiry. The
  answer is 2.04 Changed only after ``target.accept`` returned (the message is stored); its
  payload is the message id (ASCII), so a device can correlate the frame with its results.
  The blocks with more to come are answered at the datagram by ``coap_fastpath`` (through
  ``_Server.fast_block``, the same steps and answers as ``StreamResource.post``), before
  aiocoap's request pipeline; ``CoapSettings.fast_blocks=False`` turns that off.
* ``GET (Observe) / PUT / POST / DELETE /.d/<path>``: the device's state document (JSON,
  Content-Format 50; PUT/POST also take CBOR, 60). Observers are notified when it changes.
* ``GET /.well-known/core``.

Who is talking: over DTLS, the registry entry the PSK identity ``<device>@<project>`` named,
or the device certificate's CN/O (the handshake fails for unknown devices or wrong keys). Over
plain CoAP (development), the device names itself with ``?d=<device-id>``; the project comes
from the registry or its default.

Limits answer with codes, never stack traces: per-device token bucket (new requests; the
continuation blocks of an accepted upload are not counted) -> 4.29 + Max-Age; ``Overloaded``
from the target or the upload memory cap -> 5.03 + Max-Age; body over ``max_body`` -> 4.13 +
Size1; gaps or unknown uploads -> 4.08; a second concurrent upload from one endpoint to one
path without a distinct Request-Tag (RFC 9175) -> 4.09; tokens longer than 8 bytes -> 4.00.
A retransmitted request (same Message ID) is answered from aiocoap's exchange cache and never
ingested twice.

A 2.04 is a promise that these exact bytes are stored and can be delivered: plain CoAP reads
whole datagrams, answers the unreadable ones (``coap_datagrams``: 4.13 when cut, RST / 4.02
when undecodable, counted on ``/metrics``, logged once a minute); paths follow
``pipelines.stream_paths`` (4.00 otherwise); state writes are checked by
``pipelines.state_validation`` (4.00 with the reason) and reads never fail; unknown critical
options get 4.02, proxy options 5.05 (``coap_options``); If-Match / If-None-Match on ``/.d``
give 4.12 when they fail.

Scale-out: with ``reuse_port=True`` several processes can each run a ``CoapIngest`` on the
same ports (SO_REUSEPORT); the kernel keeps each client on one process, so per-client Block1
and DTLS state stays together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import aiocoap
import cbor2
from aiocoap import Code, resource
from aiocoap.optiontypes import BlockOption
from aiocoap.pipe import error_to_message, run_driving_pipe

from pipelines.devices import DeviceRegistry, Resolver
from pipelines.gc_tuning import give_back_memory
from pipelines.ingest import IngestTarget, Overloaded
from pipelines.ingest.coap_blockwise import Block1Assembler, Complete, Continue, Refused
from pipelines.ingest.coap_datagrams import MAX_DATAGRAM, RECEIVE_BUFFER, IngestUDP6
from pipelines.ingest.coap_exchanges import RecentExchanges, cap_recent_exchanges
from pipelines.ingest.coap_fastpath import Answer, Block1FastPath, UploadBlock, continue_answer, uint
from pipelines.ingest.coap_keepalive import answer_empty_non
from pipelines.ingest.coap_options import option_refusal
from pipelines.ingest.dtls_server import DtlsOptions, DtlsServerTransport, add_dtls_server, device_from_claims
from pipelines.ingest.rate_limit import DEFAULT_BURST, DEFAULT_RATE, RateLimiter
from pipelines.message import Message
from pipelines.state_doc import StateTooLarge
from pipelines.state_validation import StateRejected, parse_state_cbor, parse_state_json, readable_state
from pipelines.stream_paths import path_problem

log = logging.getLogger(__name__)

#: Content-Format number -> content type (devices spec). Missing means octet-stream.
CONTENT_FORMATS: dict[int, str] = {
    0: "text/plain",
    21: "image/gif",
    22: "image/jpeg",
    23: "image/png",
    42: "application/octet-stream",
    50: "application/json",
    60: "application/cbor",
}
OCTET_STREAM = "application/octet-stream"
CF_JSON = 50
CF_CBOR = 60

LOGGER_NAME = "coap-ingest"  # aiocoap's own messages about our server go here


class _KeepAliveFilter(logging.Filter):
    """The Golioth SDK sends an empty NON as keep-alive every 9 s. ``coap_keepalive`` answers them
    before aiocoap sees them; should one reach aiocoap (a transport added later), its warning
    about each one is dropped here."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()  # msg need not be a str
        return not (text.startswith("Received a message with code") and "EMPTY" in text and "NON" in text)


logging.getLogger(LOGGER_NAME).addFilter(_KeepAliveFilter())

MAX_TOKEN_LENGTH = 8
MAX_LIMITED_DEVICES = 10_000  # per-device 4.29 counters kept for /metrics
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass
class CoapSettings:
    """Where and how the CoAP ingest listens. Ports 0 mean "any free port" (tests)."""

    host: str = "127.0.0.1"          # "0.0.0.0" / "::" listen on every address
    port: int = 5683                 # plain CoAP, only if plain_enabled
    dtls_port: int = 5684
    dtls_enabled: bool = True
    plain_enabled: bool = False      # development only: devices name themselves with ?d=
    registry_path: str | os.PathLike[str] | None = None
    registry: DeviceRegistry | None = None   # instead of registry_path
    secret_resolver: Resolver | None = None  # for "$NAME" keys; default: environment variables
    max_body: int = 4 << 20          # 4 MiB per upload -> 4.13 beyond
    max_held_bytes: int = 64 << 20   # all unfinished uploads together -> 5.03 beyond
    block_expiry: float = 60.0       # seconds an idle upload is kept
    max_block_szx: int = 6           # 1024-byte blocks; smaller makes clients re-index
    max_state_body: int = 64 << 10   # /.d/ documents
    rate_limit: float = DEFAULT_RATE    # requests/s per device; 0 disables (rate_limit.py: why)
    rate_burst: float | None = DEFAULT_BURST  # bucket size; None = rate_limit
    busy_retry_after: float = 2.0    # Max-Age on 5.03 from the memory cap
    reuse_port: bool = False         # SO_REUSEPORT, for --workers N on one port
    max_dtls_sessions: int = 4096
    dtls: DtlsOptions = field(default_factory=DtlsOptions)  # timeouts, caps, certificates (cert/key/ca)
    max_recent_exchanges: int = 30_000  # duplicate-detection entries kept (3-4 KB each), newest first
    registry_refresh: float = 2.0    # seconds between checks of the registry file's mtime
    max_datagram: int = MAX_DATAGRAM  # plain CoAP receive buffer; a longer datagram gets 4.13
    receive_buffer: int = RECEIVE_BUFFER  # kernel receive queue asked for, bytes (0: OS default)
    fast_blocks: bool = True         # answer Block1 blocks with more to come at the datagram (coap_fastpath)
    extra: dict[str, Any] = field(default_factory=dict)


def content_type_for(content_format: int | None) -> tuple[str, dict[str, Any]]:
    """Content type and extra metadata for a CoAP Content-Format number."""
    if content_format is None:
        return OCTET_STREAM, {}
    ct = CONTENT_FORMATS.get(int(content_format))
    if ct is None:
        return OCTET_STREAM, {"coap_content_format": int(content_format)}
    return ct, {}


def _max_age(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _reason(text: str) -> bytes:
    """A diagnostic payload: the reason's UTF-8, at most 200 bytes of whole characters."""
    return text.encode()[:200].decode("utf-8", "ignore").encode()


def _error(code: Code | int, reason: str, *, max_age: float | None = None,
           size1: int | None = None) -> aiocoap.Message:
    msg = aiocoap.Message(code=Code(code), payload=_reason(reason))
    if max_age is not None:
        msg.opt.max_age = _max_age(max_age)
    if size1 is not None:
        msg.opt.size1 = size1
    return msg


class _Refusal(Exception):
    def __init__(self, response: aiocoap.Message) -> None:
        self.response = response


class _Who(NamedTuple):  # a tuple: hashed in C, as part of every block's upload key
    project_id: str
    device_id: str


class _Server:
    """State shared by the resources: target, registry, limits, counters."""

    def __init__(self, target: IngestTarget, settings: CoapSettings, registry: DeviceRegistry) -> None:
        self.target = target
        self.settings = settings
        self.registry = registry
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.uploads = Block1Assembler(max_body=settings.max_body, max_held_bytes=settings.max_held_bytes,
                                       expiry=settings.block_expiry, max_szx=settings.max_block_szx,
                                       busy_retry_after=settings.busy_retry_after)
        self.state_uploads = Block1Assembler(max_body=settings.max_state_body,
                                             max_held_bytes=max(settings.max_state_body * 64, 1 << 20),
                                             expiry=settings.block_expiry, max_szx=settings.max_block_szx,
                                             busy_retry_after=settings.busy_retry_after)
        self.stats: dict[str, int] = {"accepted": 0, "bytes": 0, "blocks": 0}
        # (project, device) -> requests answered 4.29; at most MAX_LIMITED_DEVICES series (plain
        # CoAP devices name themselves), the rest are counted under device "(other)"
        self.rate_limited: dict[tuple[str, str], int] = {}
        # per device: how it last talked to us and what it was refused (the console shows it)
        self.sessions: dict[tuple[str, str], dict[str, Any]] = {}

    def count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n

    def who(self, request: aiocoap.Message) -> _Who:
        """The device behind a request, or raise a refusal (4.00 / 4.01)."""
        if len(request.token) > MAX_TOKEN_LENGTH:
            raise _Refusal(_error(Code.BAD_REQUEST, "token longer than 8 bytes"))
        entry = device_from_claims(request.remote)
        if entry is not None:
            return self._seen(_Who(entry.project_id, entry.device_id), request.remote)
        if getattr(request.remote, "scheme", "coap") == "coaps":
            raise _Refusal(_error(Code.UNAUTHORIZED, "DTLS session without a known device identity"))
        device_id = None
        for q in request.opt.uri_query:
            key, _, value = q.partition("=")
            if key == "d":
                device_id = value
        if device_id is None:
            raise _Refusal(_error(Code.UNAUTHORIZED, "plain CoAP: name the device with ?d=<device-id>"))
        if not _DEVICE_ID_RE.match(device_id):
            raise _Refusal(_error(Code.BAD_REQUEST, "?d= must be letters, digits, '.', '_', ':' or '-'"))
        entry = self.registry.find_device(device_id)
        project = entry.project_id if entry is not None else self.registry.default_project
        return self._seen(_Who(project, device_id), request.remote)

    def _seen(self, who: _Who, remote: Any) -> _Who:
        s = self.sessions.get((who.project_id, who.device_id))
        if s is None:
            if len(self.sessions) >= 10_000:  # bounded: forget the oldest
                self.sessions.pop(next(iter(self.sessions)))
            s = self.sessions[(who.project_id, who.device_id)] = {"rate_limited": 0, "refused": 0}
        s["transport"] = "DTLS" if getattr(remote, "scheme", "coap") == "coaps" else "plain CoAP"
        s["address"] = str(getattr(remote, "hostinfo", "") or "")
        s["at"] = time.time()
        return who

    def fast_block(self, block: UploadBlock, remote: Any) -> Answer | None:
        """The answer to a Block1 block with more to come of ``POST /.s/...`` read at the
        datagram (``coap_fastpath``), or None to let aiocoap's pipeline take it (a device that
        is not named, a path to refuse): then nothing was changed. The same steps as
        ``StreamResource.post`` for such a block (who, path, rate limit for block 0, the
        assembler), with the same answers."""
        entry = device_from_claims(remote)
        if entry is not None:
            who = _Who(entry.project_id, entry.device_id)
        elif getattr(remote, "scheme", "coap") == "coaps":
            return None
        else:
            device_id = None
            for q in block.query:
                key, _, value = q.partition("=")
                if key == "d":
                    device_id = value
            if device_id is None or not _DEVICE_ID_RE.match(device_id):
                return None
            found = self.registry.find_device(device_id)
            who = _Who(found.project_id if found is not None else self.registry.default_project, device_id)
        path = _stream_path(block.path, 1)
        if path is None:
            return None
        s = self.sessions.get((who.project_id, who.device_id))
        if s is None:
            self._seen(who, remote)
        else:  # transport and address were set by the upload's block 0, from this same remote
            s["at"] = time.time()
        if block.num == 0:
            wait = self.rate_wait(who)
            if wait:
                return Answer(int(Code.TOO_MANY_REQUESTS), [(14, uint(_max_age(wait)))],  # Max-Age
                              _reason(self.rate_reason(who)))
        key = (remote.blockwise_key, who, path, block.request_tag)
        out = self.uploads.feed(key, block.num, True, block.szx, block.payload, size1=block.size1,
                                token=block.token, content_format=block.content_format)
        self.count("blocks")
        if isinstance(out, Continue):
            return continue_answer(out.num, out.szx)
        assert isinstance(out, Refused)  # a block with more to come never completes an upload
        self.count(f"refused_{out.code}")
        self.refused(who, "refused")
        options = []
        if out.max_age is not None:
            options.append((14, uint(_max_age(out.max_age))))  # Max-Age
        if out.size1 is not None:
            options.append((60, uint(out.size1)))  # Size1
        return Answer(out.code, options, _reason(out.reason))

    def refused(self, who: _Who, what: str) -> None:
        s = self.sessions.get((who.project_id, who.device_id))
        if s is not None:
            s[what] = s.get(what, 0) + 1

    def rate_wait(self, who: _Who) -> float:
        """Seconds the device must wait (counted as refused), or 0 when the request may go on."""
        wait = self.limiter.take((who.project_id, who.device_id))
        if wait:
            self.count("rate_limited")
            self.refused(who, "rate_limited")
            key = (who.project_id, who.device_id)
            if key not in self.rate_limited and len(self.rate_limited) >= MAX_LIMITED_DEVICES:
                key = (who.project_id, "(other)")
            self.rate_limited[key] = self.rate_limited.get(key, 0) + 1
        return wait

    def rate_reason(self, who: _Who) -> str:
        return f"device {who.device_id} is over {self.settings.rate_limit:g} requests/s"

    def check_rate(self, who: _Who) -> None:
        wait = self.rate_wait(who)
        if wait:
            raise _Refusal(_error(Code.TOO_MANY_REQUESTS, self.rate_reason(who), max_age=wait))


_PATHS: dict[tuple[str, ...], tuple[str, str | None]] = {}  # Uri-Path -> (path, problem); a few per fleet
_MAX_PATHS = 4096


def _checked_path(uri_path: tuple[str, ...] | list[str], skip: int) -> tuple[str, str | None]:
    """(message path, why it may not be used or None) for Uri-Path segments after ``skip``;
    remembered, since every block of every upload names the same few paths."""
    cache_key = (str(skip), *uri_path)
    hit = _PATHS.get(cache_key)
    if hit is not None:
        return hit
    segments = list(uri_path[skip:])
    if segments and segments[-1] == "":
        segments.pop()  # trailing slash
    out = "/" + "/".join(segments), path_problem(segments)  # what a path may hold: pipelines.stream_paths
    if len(_PATHS) >= _MAX_PATHS:
        _PATHS.clear()
    _PATHS[cache_key] = out
    return out


def _stream_path(uri_path: list[str], skip: int) -> str | None:
    path, problem = _checked_path(uri_path, skip)
    return path if problem is None else None


def _path_of(request: aiocoap.Message, skip: int = 0) -> str:
    """The message path from the request's Uri-Path, after the first ``skip`` segments."""
    path, problem = _checked_path(request.opt.uri_path, skip)
    if problem is not None:
        raise _Refusal(_error(Code.BAD_REQUEST, problem))
    return path


def _refused_to_message(refused: Refused) -> aiocoap.Message:
    return _error(refused.code, refused.reason, max_age=refused.max_age, size1=refused.size1)


async def _reassemble(server: _Server, uploads: Block1Assembler, request: aiocoap.Message,
                      who: _Who, path: str) -> tuple[bytes, BlockOption.BlockwiseTuple | None]:
    """The whole body of a request (raising a 2.31 / error refusal while blocks are missing),
    and the Block1 option to echo on the final answer. The caller must ``release`` the body."""
    block1 = request.opt.block1
    if block1 is None:
        too_big = uploads.check_size1(max(len(request.payload), request.opt.size1 or 0))
        if too_big is not None:
            raise _Refusal(_refused_to_message(too_big))
        server.check_rate(who)
        if uploads.held_bytes + len(request.payload) > uploads.max_held_bytes:  # datagrams up to 64 KB
            server.count("refused_163")
            raise _Refusal(_error(Code.SERVICE_UNAVAILABLE, "too much upload data held; try again later",
                                  max_age=uploads.busy_retry_after))
        uploads.held_bytes += len(request.payload)
        return request.payload, None
    if block1.block_number == 0:
        server.check_rate(who)
    key = (request.remote.blockwise_key, who, path, tuple(request.opt.request_tag))
    out = uploads.feed(key, block1.block_number, bool(block1.more), block1.size_exponent,
                       request.payload, size1=request.opt.size1, token=request.token,
                       content_format=request.opt.content_format)
    server.count("blocks")
    if isinstance(out, Continue):
        msg = aiocoap.Message(code=Code.CONTINUE)
        msg.opt.block1 = BlockOption.BlockwiseTuple(out.num, True, out.szx)
        raise _Refusal(msg)
    if isinstance(out, Refused):
        server.count(f"refused_{out.code}")
        server.refused(who, "refused")
        raise _Refusal(_refused_to_message(out))
    assert isinstance(out, Complete)
    return out.body, BlockOption.BlockwiseTuple(out.num, False, out.szx)


class _Base(resource.Resource, resource.PathCapable):
    link: dict[str, str] = {}

    def __init__(self, server: _Server) -> None:
        super().__init__()
        self.server = server

    async def render(self, request):
        try:
            return await super().render(request)
        except _Refusal as refusal:
            return refusal.response

    def get_resources_as_linkheader(self):
        from aiocoap.util.linkformat import Link, LinkFormat
        return LinkFormat([Link("/", **self.link)])


class StreamResource(_Base):
    """``POST /.s/<path>``: a message into the pipelines."""

    link = {"rt": "x.stream", "title": "stream data into the pipelines"}

    async def needs_blockwise_assembly(self, request):
        return False  # Block1 is reassembled here, with limits

    async def render_post(self, request):
        return await self.post(request, 0)

    async def post(self, request: aiocoap.Message, skip: int) -> aiocoap.Message:
        """Ingest one request (or one block of it); the stream path follows ``skip`` segments."""
        server = self.server
        who = server.who(request)
        path = _path_of(request, skip)  # "/" for POST /.s/ (the SDK's stream to the root path)
        body, block1 = await _reassemble(server, server.uploads, request, who, path)
        try:
            content_type, metadata = content_type_for(request.opt.content_format)
            msg = Message.new(device_id=who.device_id, project_id=who.project_id, path=path,
                              content_type=content_type, payload=body, metadata=metadata)
            try:
                await server.target.accept(msg)
            except Overloaded as exc:
                server.count("overloaded")
                server.refused(who, "refused")
                # the reason names internal pipelines and queues: not for devices' eyes
                return _error(Code.SERVICE_UNAVAILABLE, "router busy, retry later", max_age=exc.retry_after)
        finally:
            server.uploads.release(len(body))
        server.count("accepted")
        server.count("bytes", len(body))
        response = aiocoap.Message(code=Code.CHANGED, payload=msg.id.encode())
        if block1 is not None:
            response.opt.block1 = block1
        return response


def _encode_state(value: Any, accept: int | None) -> aiocoap.Message:
    """The document as served: never fails, even for one stored before writes were checked."""
    value = readable_state(value)
    if accept == CF_CBOR:
        msg = aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps(value), content_format=CF_CBOR)
    elif accept not in (None, CF_JSON):
        return _error(Code.NOT_ACCEPTABLE, "state is served as JSON (50) or CBOR (60)")
    else:
        payload = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        msg = aiocoap.Message(code=Code.CONTENT, payload=payload, content_format=CF_JSON)
    msg.opt.etag = state_etag(value)
    return msg


def state_etag(value: Any) -> bytes:
    """The ETag of the value at a state path (for If-Match): 8 bytes of its canonical JSON's hash."""
    text = json.dumps(readable_state(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).digest()[:8]


async def _check_preconditions(server: _Server, request: aiocoap.Message, who: _Who, path: str) -> None:
    """If-None-Match (fails when a value exists at the path) and If-Match (fails when none does,
    or when none of the given ETags is the current one; an empty If-Match means "exists"):
    4.12 Precondition Failed (RFC 7252 §5.10.8). Checked just before the write; concurrent
    writes to one document between the check and the write are not excluded."""
    if_match = request.opt.if_match
    if not (if_match or request.opt.if_none_match):
        return
    current = await server.target.get_state(who.project_id, who.device_id, path)
    if request.opt.if_none_match and current is not None:
        raise _Refusal(_error(Code.PRECONDITION_FAILED, f"If-None-Match: {path} has a value"))
    if if_match:
        if current is None:
            raise _Refusal(_error(Code.PRECONDITION_FAILED, f"If-Match: {path} has no value"))
        tags = [t for t in if_match if t]
        if tags and state_etag(current) not in tags:
            raise _Refusal(_error(Code.PRECONDITION_FAILED, f"If-Match: {path} has another ETag"))


def _decode_state(payload: bytes, content_format: int | None, path: str) -> Any:
    """The checked value of a state write (``pipelines.state_validation``), or a 4.00 / 4.15."""
    depth = path.count("/") - (path == "/")
    try:
        if content_format in (None, CF_JSON):
            return parse_state_json(payload, depth)
        if content_format == CF_CBOR:
            return parse_state_cbor(payload, depth)
    except StateRejected as exc:
        raise _Refusal(_error(Code.BAD_REQUEST, str(exc))) from None
    raise _Refusal(_error(Code.UNSUPPORTED_CONTENT_FORMAT, "state takes JSON (50) or CBOR (60)"))


class StateResource(_Base, resource.ObservableResource):
    """``/.d/<path>``: the device's state document; GET may Observe."""

    link = {"rt": "x.state", "obs": None, "title": "device state (LightDB State)"}

    def __init__(self, server: _Server) -> None:
        super().__init__(server)
        # Observe registrations: id(request) -> the first answer add_observation read, taken by
        # render_get, which aiocoap calls next with the same request object
        self._first_answers: dict[int, aiocoap.Message] = {}

    async def needs_blockwise_assembly(self, request):
        # GET answers may need Block2 (aiocoap does that); uploads go through our limited spool.
        return request.code in (Code.GET, Code.FETCH)

    async def render_get(self, request):
        first = self._first_answers.pop(id(request), None)
        if first is not None:  # an Observe registration: add_observation has read the document
            return first
        who = self.server.who(request)
        path = _path_of(request)
        if request.opt.observe is None:
            self.server.check_rate(who)
        value = await self.server.target.get_state(who.project_id, who.device_id, path)
        return _encode_state(value, request.opt.accept)

    async def _write(self, request, merge: bool):
        server = self.server
        who = server.who(request)
        path = _path_of(request)
        body, block1 = await _reassemble(server, server.state_uploads, request, who, path)
        try:
            value = _decode_state(body, request.opt.content_format, path)
        finally:
            server.state_uploads.release(len(body))
        await _check_preconditions(server, request, who, path)
        try:
            await server.target.set_state(who.project_id, who.device_id, path, value, merge=merge)
        except StateTooLarge as exc:
            return _error(Code.REQUEST_ENTITY_TOO_LARGE, str(exc))
        response = aiocoap.Message(code=Code.CHANGED)
        if block1 is not None:
            response.opt.block1 = block1
        return response

    async def render_put(self, request):
        return await self._write(request, merge=False)

    async def render_post(self, request):
        # The Golioth SDK sets LightDB State with POST and means "replace at path".
        return await self._write(request, merge=False)

    async def render_delete(self, request):
        who = self.server.who(request)
        path = _path_of(request)
        self.server.check_rate(who)
        await _check_preconditions(self.server, request, who, path)
        await self.server.target.delete_state(who.project_id, who.device_id, path)
        return aiocoap.Message(code=Code.DELETED)

    async def add_observation(self, request, serverobservation):
        try:
            who = self.server.who(request)
            path = _path_of(request)
            self.server.check_rate(who)
        except _Refusal:
            return  # not accepted; render answers with the refusal and the observation ends
        # One reader per observation, woken by changes: the last read always follows the last
        # write, so a slow read can never deliver an older document after a newer one.
        dirty = asyncio.Event()
        stop = self.server.target.watch_state(who.project_id, who.device_id, dirty.set)
        # The first answer is read here, after the watch is in place, and is what the pump
        # compares with: a change that lands before or during this read wakes the pump, which
        # then sends only a document that differs from the first answer (one notification per
        # registration, not a copy of the first answer a few ms later).
        try:
            value = await self.server.target.get_state(who.project_id, who.device_id, path)
        except BaseException:
            stop()
            raise
        first = _encode_state(value, request.opt.accept)
        if not first.code.is_successful():
            stop()
            return  # 4.06: render answers it and the observation ends
        self._first_answers[id(request)] = first  # render_get answers with it (next, same task)

        async def pump(last: bytes) -> None:
            while True:
                await dirty.wait()
                dirty.clear()
                try:
                    value = await self.server.target.get_state(who.project_id, who.device_id, path)
                    response = _encode_state(value, request.opt.accept)
                except Exception:  # the next change tries again: an observer is never silenced
                    log.exception("reading state for an observer of %s %s failed", who.device_id, path)
                    continue
                if response.payload != last:  # a change elsewhere in the document is not news here
                    last = response.payload
                    serverobservation.trigger(response)

        task = asyncio.get_running_loop().create_task(pump(first.payload), name=f"observe {who.device_id}{path}")

        def cancelled() -> None:
            stop()
            task.cancel()
            self._first_answers.pop(id(request), None)

        serverobservation.accept(cancelled)


class _IngestSite(resource.Site):
    """aiocoap's Site with a direct route for ``POST /.s/...``, the hot path (one request per
    Block1 block). The Site would deep-copy every request to strip its path and look up the
    resource; the stream resource reads the path after ``.s`` itself, so nothing is copied."""

    def __init__(self, stream: StreamResource) -> None:
        super().__init__()
        self.stream = stream

    async def render_to_pipe(self, pipe):
        request = pipe.request
        refusal = option_refusal(request.opt)  # unknown critical, repeated, proxy options
        if refusal is not None:
            pipe.add_response(_error(*refusal), is_last=True)
            return
        uri_path = request.opt.uri_path
        if not uri_path and request.code.is_request() and request.opt.uri_path_abbrev is None:
            # The Golioth Linux SDK's keep-alive: a request with no path (a CON DELETE). Golioth
            # answers 4.04 and the SDK takes any answer; cheap, and never rate-limited.
            self.stream.server.count("keepalives")
            response = aiocoap.Message(code=Code.NOT_FOUND)
            response.opt.no_response = request.opt.no_response
            pipe.add_response(response, is_last=True)
            return
        if (uri_path and uri_path[0] == ".s" and request.code == Code.POST
                and request.opt.uri_path_abbrev is None):
            try:
                response = await self.stream.post(request, 1)
            except _Refusal as refusal:
                response = refusal.response
            if response.opt.no_response is None:  # as Resource.render does
                response.opt.no_response = request.opt.no_response
            pipe.add_response(response, is_last=True)
            return
        await super().render_to_pipe(pipe)


class _IngestContext(aiocoap.Context):
    """aiocoap's Context, minus the ``repr`` of every request it renders (a task name that
    costs a tenth of the ingest CPU at one request per block)."""

    def render_to_pipe(self, pipe):
        run_driving_pipe(error_to_message(pipe, self.log), self._render_to_pipe(pipe), name="coap render")


def build_site(server: _Server) -> resource.Site:
    stream = StreamResource(server)
    site = _IngestSite(stream)
    site.add_resource([".s"], stream)
    site.add_resource([".d"], StateResource(server))
    from pipelines.device_services import add_device_services  # here: they import this module
    add_device_services(site, server)  # /.u (OTA), /.c (settings), /.rpc
    site.add_resource([".well-known", "core"],
                      resource.WKCResource(site.get_resources_as_linkheader, impl_info=None))
    return site


@contextlib.contextmanager
def _reuse_port(flag: bool) -> Iterator[None]:
    """aiocoap reads SO_REUSEPORT from the environment when it binds."""
    old = os.environ.get("AIOCOAP_REUSE_PORT")
    os.environ["AIOCOAP_REUSE_PORT"] = "1" if flag else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AIOCOAP_REUSE_PORT", None)
        else:
            os.environ["AIOCOAP_REUSE_PORT"] = old


class CoapIngest:
    """The CoAP/DTLS ingest server. ``start``/``stop`` or ``async with``."""

    def __init__(self, target: IngestTarget, settings: CoapSettings | None = None) -> None:
        self.settings = settings = settings or CoapSettings()
        if settings.registry is not None:
            registry = settings.registry
        elif settings.registry_path is not None:
            registry = DeviceRegistry.load(Path(settings.registry_path), settings.secret_resolver)
        elif settings.dtls_enabled:
            raise ValueError("CoAP over DTLS needs a device registry: set registry_path")
        else:
            registry = DeviceRegistry([])
        self.server = _Server(target, settings, registry)
        self.context: aiocoap.Context | None = None
        self.port: int | None = None
        self.dtls_port: int | None = None
        self.dtls: DtlsServerTransport | None = None
        self._housekeeping: asyncio.Task | None = None
        self.exchange_tables: list[RecentExchanges] = []
        self.plain: IngestUDP6 | None = None
        self.fast_path: Block1FastPath | None = None

    @property
    def registry(self) -> DeviceRegistry:
        return self.server.registry

    def device_sessions(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(project, device) -> transport ("DTLS"/"plain CoAP"), address, at (last request),
        rate_limited and refused counts."""
        return self.server.sessions

    @property
    def stats(self) -> dict[str, int]:
        out = dict(self.server.stats)
        out["recent_exchanges"] = sum(len(t) for t in self.exchange_tables)
        out["exchanges_evicted"] = sum(t.evicted for t in self.exchange_tables)
        if self.fast_path is not None:
            out["fast_blocks"], out["fast_duplicates"] = self.fast_path.handled, self.fast_path.duplicates
        if self.dtls is not None:
            out.update({f"dtls_{name}": n for name, n in self.dtls.stats.items()})
            out["dtls_sessions"], out["dtls_handshakes"] = self.dtls.session_count, self.dtls.handshake_count
        return out

    async def start(self) -> CoapIngest:
        s = self.settings
        if not (s.plain_enabled or s.dtls_enabled):
            raise ValueError("enable plain CoAP, DTLS or both")
        loop = asyncio.get_running_loop()
        ctx = _IngestContext(loop=loop, serversite=build_site(self.server), loggername=LOGGER_NAME)
        self.context = ctx
        try:
            with _reuse_port(s.reuse_port):
                if s.plain_enabled:
                    created: list[Any] = []

                    interface = type("IngestUDP6", (IngestUDP6,), {"max_datagram": s.max_datagram,
                                                                   "block_szx": s.max_block_szx,
                                                                   "receive_buffer": s.receive_buffer})

                    async def plain(mman):
                        t = await interface.create_server_transport_endpoint(
                            mman, log=ctx.log, loop=loop, bind=(s.host, s.port), multicast=[])
                        created.append(t)
                        return t

                    await ctx._append_tokenmanaged_messagemanaged_transport(plain)
                    self.plain = created[0]
                    self.port = int(created[0].transport.get_extra_info("socket").getsockname()[1])
                if s.dtls_enabled:
                    options = dataclasses.replace(s.dtls, max_sessions=s.max_dtls_sessions)
                    self.dtls = await add_dtls_server(ctx, (s.host, s.dtls_port), lambda: self.server.registry,
                                                      options, reuse_port=s.reuse_port)
                    self.dtls_port = self.dtls.port
        except BaseException:
            if ctx.request_interfaces:  # aiocoap's shutdown fails on a context without transports
                await ctx.shutdown()
            self.context = None
            raise
        self.exchange_tables = cap_recent_exchanges(ctx, s.max_recent_exchanges)
        if s.fast_blocks:
            self.fast_path = Block1FastPath(self.server.fast_block)
            for transport in (self.plain, self.dtls):
                if transport is not None:
                    transport.fast_path = self.fast_path
        answer_empty_non(ctx, count=lambda: self.server.count("keepalives"))
        sources = getattr(self.server.target, "metric_sources", None)
        if isinstance(sources, list):
            sources.append(self.collect_metrics)
        self._housekeeping = loop.create_task(self._housekeep(), name="coap-ingest housekeeping")
        log.info("CoAP ingest listening: plain=%s dtls=%s on %s", self.port, self.dtls_port, s.host)
        return self

    async def _housekeep(self) -> None:
        s = self.settings
        interval = max(0.2, min(s.block_expiry / 2, s.registry_refresh))
        while True:
            await asyncio.sleep(interval)
            before = self.server.uploads.held_bytes + self.server.state_uploads.held_bytes
            self.server.uploads.sweep()
            self.server.state_uploads.sweep()
            for table in self.exchange_tables:
                table.expire()
            if before - (self.server.uploads.held_bytes + self.server.state_uploads.held_bytes) >= 1 << 20:
                give_back_memory()  # expired uploads freed megabytes: let RSS come down too
            try:
                if self.server.registry.refresh():
                    log.info("device registry reloaded: %d devices", len(self.server.registry))
            except Exception as exc:  # keep serving with the old registry
                log.error("device registry not reloaded: %s", exc)

    def collect_metrics(self) -> Iterator[Any]:
        """Prometheus metric families for ``GET /metrics`` (``pipelines.metrics``)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        limited = CounterMetricFamily("pipeline_coap_rate_limited",
                                      "CoAP requests answered 4.29 by the per-device rate limit",
                                      labels=["project", "device"])
        for (project, device), n in sorted(self.server.rate_limited.items()):
            limited.add_metric([project, device], n)
        yield limited
        stats = self.stats
        for name, help_text in (("accepted", "stream messages accepted over CoAP"),
                                ("keepalives", "keep-alives answered (NON Empty: RST; path-less: 4.04)"),
                                ("overloaded", "requests answered 5.03 because the router was busy")):
            c = CounterMetricFamily(f"pipeline_coap_{name}", help_text)
            c.add_metric([], stats.get(name, 0))
            yield c
        rate = GaugeMetricFamily("pipeline_coap_rate_limit", "per-device rate limit settings",
                                 labels=["setting"])
        rate.add_metric(["requests_per_second"], self.server.limiter.rate)
        rate.add_metric(["burst"], self.server.limiter.burst)
        yield rate

    async def stop(self) -> None:
        sources = getattr(self.server.target, "metric_sources", None)
        if isinstance(sources, list) and self.collect_metrics in sources:
            sources.remove(self.collect_metrics)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        if self.context is not None:
            await self.context.shutdown()
            self.context = None
            self.dtls = None
            self.plain = None

    async def __aenter__(self) -> CoapIngest:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve_coap(target: IngestTarget, settings: CoapSettings,
                     ready: Callable[[CoapIngest], None] | None = None) -> None:
    """Serve until cancelled. ``ready(server)`` is called once the sockets are bound."""
    async with CoapIngest(target, settings) as server:
        if ready is not None:
            ready(server)
        await asyncio.Event().wait()
