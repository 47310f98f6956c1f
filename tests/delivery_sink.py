"""HTTP sinks for delivery fault tests: real servers on loopback that tests can break.

Usage::

    sink = Sink().start()                      # uvicorn + starlette in a thread, a free port
    sink.answer("/a", lambda n: Answer(429, {"Retry-After": "2"}) if n == 0 else Answer(204))
    url = sink.url("/a")
    ...
    sink.stop(); sink.start()                  # down, then back on the same port
    sink.got("/a")                             # [Got(path, headers, body, t)] in arrival order

    resets = ResetServer(resets=3).start()     # closes the first 3 connections with a TCP RST,
    resets.url("/r")                           # then answers 204 and records like Sink

``answer(path, fn)``: ``fn(n)`` gets how many requests that path had before this one and
returns an ``Answer`` (status, headers, body, delay before answering). Paths with no rule
get 204.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Answer:
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0


@dataclass
class Got:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    t: float  # time.monotonic() on arrival

    @property
    def ce_id(self) -> str:
        return self.headers.get("ce-id", "")


class _Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[Got] = []
        self.rules: dict[str, Callable[[int], Answer]] = {}

    def answer(self, path: str, fn: Callable[[int], Answer]) -> None:
        with self.lock:
            self.rules[path] = fn

    def record(self, got: Got) -> Answer:
        with self.lock:
            n = sum(1 for g in self.requests if g.path == got.path)
            self.requests.append(got)
            rule = self.rules.get(got.path)
        return rule(n) if rule else Answer()

    def got(self, path: str | None = None) -> list[Got]:
        with self.lock:
            return [g for g in self.requests if path is None or g.path == path]

    def ids(self, path: str | None = None, status_ok: bool = False) -> list[str]:
        return [g.ce_id for g in self.got(path)]


class Sink(_Recorder):
    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        self.port = port or free_port()
        self.in_flight = 0  # requests being answered now, and the most there ever were
        self.max_in_flight = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

        async def endpoint(request: Request) -> Response:
            got = Got(request.url.path, {k.lower(): v for k, v in request.headers.items()},
                      await request.body(), time.monotonic())
            ans = self.record(got)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if ans.delay:
                    await asyncio.sleep(ans.delay)
            finally:
                self.in_flight -= 1
            return Response(ans.body, status_code=ans.status, headers=ans.headers)

        self.app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["POST"])])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> Sink:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # → TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        config = uvicorn.Config(self.app, log_level="critical", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("sink did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(10)
            self._server = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ResetServer(_Recorder):
    """A raw asyncio HTTP/1.1 server whose first ``resets`` connections are reset."""

    def __init__(self, resets: int) -> None:
        super().__init__()
        self.resets = resets
        self.connections = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        sock = writer.get_extra_info("socket")
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                got = Got(path, headers, body, time.monotonic())
                if self.resets > 0:
                    self.resets -= 1
                    self.record(got)
                    # SO_LINGER 0: close() sends RST, the client sees "connection reset"
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                ans = self.record(got)
                writer.write(f"HTTP/1.1 {ans.status} X\r\ncontent-length: {len(ans.body)}\r\n\r\n".encode()
                             + ans.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def start(self) -> ResetServer:
        def main() -> None:
            async def serve() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
                self.port = server.sockets[0].getsockname()[1]
                self._started.set()
                async with server:
                    await self._stop.wait()
            asyncio.run(serve())

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> ResetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BooksSampler:
    """Reads the store's books every ``every`` seconds while a test runs and remembers any
    moment where an identity of ``pipelines.store.BOOKS`` did not hold.

        async with BooksSampler(router.store) as books:
            ...
        assert books.samples > 0 and not books.broken
    """

    def __init__(self, store, every: float = 0.02) -> None:
        self.store = store
        self.every = every
        self.samples = 0
        self.broken: list[tuple[dict[str, int], dict[str, int]]] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        from pipelines.store import books_gaps
        while True:
            books = await self.store.counters()
            gaps = books_gaps(books)
            self.samples += 1
            if any(gaps.values()):
                self.broken.append((gaps, books))
            await asyncio.sleep(self.every)

    async def __aenter__(self) -> BooksSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
