"""Webhook POSTs: plain ``http://`` receivers over our own keep-alive HTTP/1.1 connections.

    poster = WebhookPoster(https_client=httpx.AsyncClient(), timeout=10)
    status = await poster.post("http://127.0.0.1:9000/hook", body, {"content-type": "application/json"})
    await poster.close()

A webhook is one POST whose answer matters only by its status, so for ``http://`` the request
goes out as one write on a kept-alive connection and the answer is read up to the end of its
body (Content-Length, chunked, or until the connection closes) and discarded. On the async
predictions path this is on the critical path of every result: httpx took ~0.5 ms per 56 KB
POST here, this takes ~0.06 ms (``bench/predictions.py``). ``https://``, URLs with credentials
(``http://user:pass@host/``: basic auth) and anything else go through the httpx client given.

Failures raise :class:`WebhookSendError` (refused, reset, timed out, malformed answer). A
kept-alive connection the receiver closed meanwhile is retried once on a new one, as HTTP
clients do; webhooks carry a ``webhook-id`` for the receiver's idempotency anyway. Redirects
are not followed: a 3xx is returned like any other status.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import httpx

MAX_HEAD = 64 << 10  # bytes of status line and headers in an answer
MAX_DISCARD = 1 << 20  # answer body bytes read to keep the connection; beyond, it is closed
MAX_IDLE_PER_HOST = 8


class WebhookSendError(Exception):
    """The POST did not get an HTTP answer; ``str()`` says why (never the body or headers)."""


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class WebhookPoster:
    def __init__(self, https_client: httpx.AsyncClient, timeout: float) -> None:
        self.https_client = https_client
        self.timeout = timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """POST ``body``; the answer's status code, or WebhookSendError."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or "@" in parts.netloc:  # TLS, or credentials
            try:
                response = await self.https_client.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise WebhookSendError(type(exc).__name__) from exc
            return response.status_code
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise WebhookSendError("invalid port in the webhook URL") from exc
        host = parts.hostname
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"POST {target} HTTP/1.1", f"host: {parts.netloc}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
        request = (("\r\n".join(head) + "\r\n\r\n").encode("latin-1"), body)  # written as two, not copied
        key = (host, port)
        idle = self._idle.setdefault(key, [])
        while idle:  # a kept-alive connection first; if the receiver closed it, a new one
            conn = idle.pop()
            try:
                return await self._exchange(conn, key, request)
            except _Stale:
                continue
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
        except (OSError, TimeoutError) as exc:
            raise WebhookSendError(_why(exc)) from exc
        try:
            return await self._exchange(_Conn(reader, writer), key, request)
        except _Stale as exc:
            raise WebhookSendError("the receiver closed the connection without an answer") from exc

    async def _exchange(self, conn: _Conn, key: tuple[str, int], request: tuple[bytes, bytes]) -> int:
        keep = False
        try:
            async with asyncio.timeout(self.timeout):
                conn.writer.writelines(request)
                try:
                    status, keep = await _read_answer(conn.reader)
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:  # closed before a byte of the answer: not this request's fault
                        raise _Stale from exc
                    raise
            return status
        except _Stale:
            raise
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            if isinstance(exc, ConnectionResetError | BrokenPipeError):
                raise _Stale from exc
            raise WebhookSendError(_why(exc)) from exc
        finally:
            idle = self._idle.setdefault(key, [])
            if keep and len(idle) < MAX_IDLE_PER_HOST and not conn.writer.is_closing():
                idle.append(conn)
            else:
                conn.close()

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
                with contextlib.suppress(Exception):
                    await conn.writer.wait_closed()
        self._idle.clear()


class _Stale(Exception):
    """A kept-alive connection that the receiver had closed."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the connection closed in the middle of the answer"
    if isinstance(exc, asyncio.LimitOverrunError | ValueError):
        return "the answer is not valid HTTP/1.1"
    return f"{type(exc).__name__}: {exc.strerror or exc}" if isinstance(exc, OSError) else type(exc).__name__


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one answer; (status, whether the connection can carry another request)."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError("not an HTTP/1.x status line")
        status = int(rest[:3])
        fields: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ValueError("malformed header line")
            fields[name.strip().lower()] = value.strip()
        if 100 <= status < 200:  # interim answer (100 Continue): the real one follows
            continue
        keep = version == b"HTTP/1.1" and fields.get(b"connection", b"").lower() != b"close"
        if status in (204, 304):
            return status, keep
        if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            return status, keep and await _discard_chunked(reader)
        if b"content-length" in fields:
            length = int(fields[b"content-length"])
            if length > MAX_DISCARD:
                return status, False
            await reader.readexactly(length)
            return status, keep
        return status, False  # the body runs until the connection closes: not worth reading


async def _discard_chunked(reader: asyncio.StreamReader) -> bool:
    """Read a chunked body away; False if it is too long to bother (the connection is closed)."""
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return True
        total += size
        if total > MAX_DISCARD:
            return False
        await reader.readexactly(size + 2)
