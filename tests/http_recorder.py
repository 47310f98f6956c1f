"""A real HTTP server on loopback for tests: records every request, answers from a script.

Usage::

    with HTTPRecorder() as server:
        server.script(Reply(429, {"Retry-After": "2"}), Reply(200, body=b"ok"))
        ...  # POST to server.url("/hook")
        req = server.requests[0]   # .method .path .headers (case-insensitive) .body

Replies are used in order; when the script runs out every request gets ``default``.
``server.routes["/path"] = Reply(...)`` answers one path (without query) the same way every
time, ahead of the script. ``await server.wait_for(n)`` polls until n requests arrived.
``Reply(hang=True)`` never answers until the server stops (timeout tests).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from email.message import Message as HeaderMap
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False


@dataclass
class Recorded:
    method: str
    path: str
    headers: HeaderMap
    header_items: list[tuple[str, str]]
    body: bytes


class HTTPRecorder:
    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply(204)
        self.requests: list[Recorded] = []
        self._script: list[Reply] = []
        self.routes: dict[str, Reply] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with recorder._lock:
                    recorder.requests.append(Recorded("POST", self.path, self.headers,
                                                      list(self.headers.items()), body))
                    reply = recorder.routes.get(self.path.split("?", 1)[0])
                    if reply is None:
                        reply = recorder._script.pop(0) if recorder._script else recorder.default
                if reply.hang:
                    recorder._stop.wait(10)
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} requests, got {len(self.requests)}")
            await asyncio.sleep(0.01)
        return list(self.requests)

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def __enter__(self) -> HTTPRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
