"""An httpcore network backend on plain asyncio, for the router's outbound HTTP client.

Usage::

    from pipelines.http_backend import AsyncioBackend

    pool = httpcore.AsyncConnectionPool(network_backend=AsyncioBackend())
    # or, for an httpx client: pipelines.outbound_http.make_client()

httpcore's default backend goes through anyio: every read and write opens a cancel scope
and a timeout scope, and the connection pool's liveness check (``is_readable``, run for
every idle connection each time any request starts or ends) rebuilds anyio's
socket-attribute table and issues ``getpeername`` and a fresh ``poll`` object. On the
webhook delivery path that was about a quarter of the CPU per POST. This backend does the
same job with an ``asyncio.Protocol``: reads come from the protocol's buffer, writes go
straight to the transport (waiting only when asyncio says its buffer is full), timeouts use
``asyncio.timeout``, and the liveness check looks at what the protocol has seen (data, EOF,
a lost connection). Only a connection idle for ``POLL_IDLE_AFTER`` seconds or more also has
its socket polled (one ``poll`` object kept per connection, at most once per ``POLL_EVERY``),
for a FIN that arrived after the event loop last looked: that is when an idle timeout can
close a connection, and polling every idle connection each time any request starts or ends
was 8% of an mqtt-worker's CPU (``bench/frames_to_webhook.py``). The event loop itself sees
a FIN at its next turn; the poll only narrows the window before it.

Writes: httpcore writes a request's head and its body separately. A write of up to
``HOLD_SMALL_WRITES`` bytes is held and goes out together with the next write (the body), or
before the next read, so a POST is one ``send`` and one segment rather than two: on loopback
the second small segment (and the receiver's extra wake-up) was ~8% of an mqtt-worker's CPU.

``AsyncioConnectionPool`` is httpcore's pool with one method made linear: httpcore 1.0's
``_assign_requests_to_connections`` (run when any request starts or ends) asks every
connection ``is_idle()`` once per idle connection (``len([c.is_idle() for c in
connections])``, which is just the number of connections): with 16 connections in use that
was ~1,000 calls and a third of the CPU per POST. The rewrite decides exactly as httpcore does
(the same order, the same first available or idle connection), in one pass.

The HTTP itself (h11, pooling, keep-alive, TLS via ``ssl``) stays httpcore's and httpx's;
errors are httpcore's own types (``ConnectError``, ``ReadTimeout``, ...), which httpx maps
to its usual exceptions, exactly as with the default backend.
"""

from __future__ import annotations

import asyncio
import select
import ssl
import time
import typing

import httpcore

# pause reading above this much unread data; resume below half of it
READ_HIGH_WATER = 1 << 20
# poll the socket of connections idle at least this long (servers' idle timeouts are longer)
POLL_IDLE_AFTER = 0.5
POLL_EVERY = 0.01  # seconds: an idle connection's socket is polled at most this often
# a write up to this size waits for the next write (or read) and goes out with it
HOLD_SMALL_WRITES = 16 << 10


class _Protocol(asyncio.Protocol):
    """Buffers what arrives; wakes one reader and one writer waiting for the transport."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.transport: asyncio.Transport | None = None
        self.read_waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake_reader()
        if len(self.buffer) > READ_HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer()

    def _wake_reader(self) -> None:
        waiter = self.read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._poll: select.poll | None = None
        self._last_read = self._last_poll = time.monotonic()
        self._held = b""  # a small write not sent yet: it goes with the next write or read

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._protocol
        self._flush_held()
        if not p.buffer and not p.eof:
            p.read_waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await p.read_waiter
            except TimeoutError:
                raise httpcore.ReadTimeout("timed out") from None
            finally:
                p.read_waiter = None
        if p.buffer:
            self._last_read = time.monotonic()
            data = bytes(p.buffer[:max_bytes])
            del p.buffer[:max_bytes]
            if p.reading_paused and len(p.buffer) < READ_HIGH_WATER // 2:
                p.reading_paused = False
                self._transport.resume_reading()
            return data
        if p.error is not None:
            raise httpcore.ReadError(str(p.error) or type(p.error).__name__)
        return b""  # the peer closed the connection

    def _flush_held(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            if not self._transport.is_closing():
                self._transport.write(held)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        p = self._protocol
        if p.error is not None or self._transport.is_closing():
            raise httpcore.WriteError(str(p.error or "") or "connection closed")
        if self._held:
            buffer, self._held = self._held + buffer, b""
        elif len(buffer) <= HOLD_SMALL_WRITES:
            self._held = buffer  # request headers: sent with the body that follows (module docstring)
            return
        self._transport.write(buffer)
        if not p.writing_paused:
            return  # asyncio holds whatever the socket did not take yet, within its limit
        p.drain_waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await p.drain_waiter
        except TimeoutError:
            raise httpcore.WriteTimeout("timed out") from None
        finally:
            p.drain_waiter = None
        if p.error is not None or (p.writing_paused and self._transport.is_closing()):
            raise httpcore.WriteError(str(p.error or "") or "connection closed")

    async def aclose(self) -> None:
        self._flush_held()
        self._transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        self._flush_held()  # (a proxy's CONNECT): before the handshake, in the clear
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(self._transport, self._protocol, ssl_context,
                                                 server_hostname=server_hostname)
        except TimeoutError:
            self._transport.close()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        if transport is None:  # the connection closed during the handshake
            raise httpcore.ConnectError("connection closed during the TLS handshake")
        return AsyncioStream(typing.cast(asyncio.Transport, transport), self._protocol)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            return self._is_readable()
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        return None

    def _is_readable(self) -> bool:
        """True if a read would not block: for an idle connection, the server closed it (or
        sent something unasked), so the pool must not reuse it."""
        p = self._protocol
        if p.buffer or p.eof or self._transport.is_closing():
            return True
        now = time.monotonic()
        if now - self._last_read < POLL_IDLE_AFTER or now - self._last_poll < POLL_EVERY:
            return False  # answered just now (no idle timeout can have closed it), or polled just now
        self._last_poll = now
        # the event loop may not have seen the socket since the server's FIN arrived
        if self._poll is None:
            sock = self._transport.get_extra_info("socket")
            fd = -1 if sock is None else sock.fileno()
            if fd < 0:
                return True
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
        return bool(self._poll.poll(0))


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    _Protocol, host, port,
                    local_addr=(local_address, 0) if local_address else None)
        except TimeoutError:
            raise httpcore.ConnectTimeout("timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_unix_connection(_Protocol, path)
        except TimeoutError:
            raise httpcore.ConnectTimeout("timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class AsyncioConnectionPool(httpcore.AsyncConnectionPool):
    """httpcore's pool with a linear ``_assign_requests_to_connections`` (module docstring)."""

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        closing: list[httpcore.AsyncConnectionInterface] = []
        connections = self._connections
        # closed, expired, and idle ones over the keep-alive limit go (as httpcore does; only an
        # idle connection can have expired: httpcore's has_expired is False while one is busy)
        for connection in list(connections):
            if connection.is_closed():
                connections.remove(connection)
            elif connection.is_idle() and (connection.has_expired()
                                           or len(connections) > self._max_keepalive_connections):
                connections.remove(connection)
                closing.append(connection)
        for pool_request in self._requests:
            if not pool_request.is_queued():
                continue
            origin = pool_request.request.url.origin
            connection = next((c for c in connections if c.can_handle_request(origin) and c.is_available()),
                              None)
            if connection is None:
                if len(connections) >= self._max_connections:
                    idle = next((c for c in connections if c.is_idle()), None)
                    if idle is None:
                        continue  # stays queued until a connection frees up
                    connections.remove(idle)
                    closing.append(idle)
                connection = self.create_connection(origin)
                connections.append(connection)
            pool_request.assign_to_connection(connection)
        return closing


def use_asyncio_pool(pool: object) -> bool:
    """Make httpx's stock pool an ``AsyncioConnectionPool`` on an ``AsyncioBackend``; False
    (and nothing changed) when ``pool`` is not the httpcore pool this module knows."""
    if type(pool) is not httpcore.AsyncConnectionPool or not hasattr(pool, "_network_backend"):
        return False
    pool.__class__ = AsyncioConnectionPool
    pool._network_backend = AsyncioBackend()
    return True
