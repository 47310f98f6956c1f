"""pipelines.http_backend (via outbound_http.make_client) against real servers on loopback:
same bytes on the wire as stock httpx, keep-alive, a server closing idle connections,
refused connections, timeouts, bodies bigger than the socket buffers, TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from pipelines.components import DeliveryError
from pipelines.http_backend import AsyncioBackend
from pipelines.message import Message
from pipelines.outbound_http import build_headers, make_client, post_message

try:
    from tests.http_recorder import HTTPRecorder, Reply
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from http_recorder import HTTPRecorder, Reply

WHEN = datetime(2026, 11, 23, 1, 2, 3, 456789, tzinfo=UTC)


def message(payload: bytes = b"\x00\x01frame\xff", path: str = "frames") -> Message:
    return Message.new(device_id="cam-1", project_id="demo", path=path, content_type="image/jpeg",
                       payload=payload, timestamp=WHEN, id="6f1c7a52-0000-4000-8000-000000000002")


def test_make_client_uses_the_asyncio_backend(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = make_client()
    assert isinstance(client._transport._pool._network_backend, AsyncioBackend)
    # a proxy in the environment must keep working: then it is stock httpx
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    proxied = make_client()
    assert not isinstance(getattr(proxied._transport._pool, "_network_backend", None), AsyncioBackend)


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": "Bearer t0ken", "CE-TYPE": "custom.type", "X-Extra": "é"},
    {"x-a": "1", "content-type": "text/plain", "X-A": "2", "ce-id": "mine"},
    {"User-Agent": "cam-router/1", "accept": "application/json"},  # replace httpx's defaults
])
async def test_same_request_on_the_wire_as_stock_httpx_with_build_headers(headers):
    """post_message's cached header building gives what build_headers + stock httpx gave."""
    msg = message()
    with HTTPRecorder() as server:
        async with httpx.AsyncClient() as stock, make_client() as fast:
            await stock.post(server.url("/hook?a=1"), content=msg.payload,
                             headers=build_headers(msg, headers))
            await post_message(fast, server.url("/hook?a=1"), msg, headers=headers)
            await post_message(fast, server.url("/hook?a=1"), msg, headers=headers)  # cached
        a, b, c = await server.wait_for(3)
    assert a.path == b.path == c.path == "/hook?a=1"
    assert a.body == b.body == c.body == msg.payload
    assert a.header_items == b.header_items == c.header_items
    assert b.headers["Ce-Source"] == "cam-1" and b.headers["Ce-Type"] == (
        "custom.type" if "CE-TYPE" in headers else "io.golioth.data.v1/.s/frames")


class _Server:
    """An HTTP/1.1 server on loopback recording each request's client port. ``close_after``:
    close the connection after answering, without saying so (as an idle timeout would)."""

    def __init__(self, close_after: bool = False, delay: float = 0.0, tls: ssl.SSLContext | None = None):
        self.ports: list[int] = []
        self.sizes: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.ports.append(self.client_address[1])
                outer.sizes.append(len(body))
                if delay:
                    threading.Event().wait(delay)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                self.wfile.flush()
                if close_after:
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


async def test_keep_alive_reuses_one_connection():
    with _Server() as srv:
        async with make_client() as client:
            for _ in range(20):
                r = await client.post(f"http://127.0.0.1:{srv.port}/", content=b"x" * 100)
                assert r.status_code == 200 and r.content == b"ok"
    assert len(srv.ports) == 20 and len(set(srv.ports)) == 1


async def test_a_connection_the_server_closed_is_not_reused():
    with _Server(close_after=True) as srv:
        async with make_client() as client:
            for _ in range(5):
                r = await client.post(f"http://127.0.0.1:{srv.port}/", content=b"x")
                assert r.status_code == 200
                await asyncio.sleep(0.05)  # the FIN arrives while the connection is idle
    assert len(set(srv.ports)) == 5


async def test_big_bodies_arrive_whole_with_concurrent_requests():
    sizes = [8_000_000, 3_000_000, 65_537, 1]
    with _Server() as srv:
        async with make_client() as client:
            answers = await asyncio.gather(*(client.post(f"http://127.0.0.1:{srv.port}/",
                                                         content=b"z" * n) for n in sizes))
    assert all(r.status_code == 200 for r in answers)
    assert sorted(srv.sizes) == sorted(sizes)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_refused_connection_is_a_retryable_connect_error():
    async with make_client() as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{_closed_port()}/", content=b"x")
        with pytest.raises(DeliveryError) as info:
            await post_message(client, f"http://127.0.0.1:{_closed_port()}/secret", message())
    assert info.value.retryable and "ConnectError" in info.value.reason
    assert "secret" not in info.value.reason


async def test_read_timeout_is_a_retryable_delivery_error():
    with HTTPRecorder(default=Reply(hang=True)) as server:
        async with make_client() as client:
            with pytest.raises(DeliveryError) as info:
                await post_message(client, server.url("/slow"), message(), extra={"timeout": 0.3})
            with pytest.raises(httpx.ReadTimeout):
                await client.post(server.url("/slow"), content=b"x", timeout=0.2)
    assert info.value.retryable and "timed out after 0.3 s" in info.value.reason


async def test_cancelled_request_leaves_the_pool_usable():
    with _Server(delay=0.5) as srv:
        async with make_client() as client:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.post(f"http://127.0.0.1:{srv.port}/", content=b"x"), 0.1)
            r = await client.post(f"http://127.0.0.1:{srv.port}/", content=b"y")
            assert r.status_code == 200


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_https_with_a_trusted_and_an_untrusted_certificate(certificate):
    cert, key = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    with _Server(tls=server_ctx) as srv:
        url = f"https://127.0.0.1:{srv.port}/"
        async with make_client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            for _ in range(3):
                r = await client.post(url, content=b"secure")
                assert r.status_code == 200 and r.content == b"ok"
        async with make_client() as untrusting:
            with pytest.raises(DeliveryError) as info:
                await post_message(untrusting, url, message())
    assert srv.sizes == [6, 6, 6] and len(set(srv.ports)) == 1
    assert info.value.retryable and "ConnectError" in info.value.reason


async def test_changed_url_overrides_are_not_served_from_the_cache():
    overrides: dict[str, str] = {}
    with HTTPRecorder() as one, HTTPRecorder() as two:
        async with make_client() as client:
            for target in (one, two, one):
                overrides["https://hooks.example.com"] = target.url("/base")
                await post_message(client, "https://hooks.example.com/x?k=1", message(),
                                   extra={"url_overrides": overrides})
        first, third = await one.wait_for(2)
        (second,) = await two.wait_for(1)
    assert first.path == second.path == third.path == "/base/x?k=1"
