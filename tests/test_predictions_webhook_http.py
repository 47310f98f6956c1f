"""predictions_service.webhook_http against a real TCP server on loopback that answers in every
way HTTP/1.1 allows (and some it does not): keep-alive reuse, chunked bodies with trailers,
``Connection: close``, interim 100 answers, bodies running to the close, idle connections the
receiver closed, garbage, silence, refusal; ``https://`` goes through httpx."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import pytest

from predictions_service.webhook_http import WebhookPoster, WebhookSendError

ANSWERS = {
    b"/plain": b"HTTP/1.1 204 No Content\r\n\r\n",
    b"/length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"/close": b"HTTP/1.1 202 Accepted\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    b"/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    b"/to-the-end": b"HTTP/1.1 200 OK\r\n\r\nbody until the connection closes",
    b"/redirect": b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
    b"/garbage": b"SMTP ready\r\n\r\n",
    b"/bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n",
}


class Server:
    """Reads requests (headers + Content-Length body) and answers by path; counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[bytes, bytes, bytes]] = []  # (path, head, body)
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1]
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                self.requests.append((path, head, await reader.readexactly(length)))
                if path == b"/silent":
                    await asyncio.sleep(30)
                writer.write(ANSWERS[path.split(b"?")[0]])
                await writer.drain()
                if path in (b"/close", b"/to-the-end"):
                    break
        writer.close()

    async def drop_idle_connections(self) -> None:
        for w in self.writers:
            w.close()
        await asyncio.sleep(0.05)

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server:
            self.server.close()


@pytest.fixture
async def server():
    s = Server()
    url = await s.start()
    yield s, url
    await s.close()


@pytest.fixture
async def poster():
    async with httpx.AsyncClient() as client:
        p = WebhookPoster(https_client=client, timeout=1.0)
        yield p
        await p.close()


async def test_posts_reuse_one_connection_and_carry_the_exact_body(server, poster) -> None:
    srv, url = server
    body = bytes(range(256)) * 200
    for path in ("/plain", "/length", "/chunked", "/interim", "/plain"):
        expected = {"/plain": 204, "/length": 200, "/chunked": 200, "/interim": 201}[path]
        assert await poster.post(url + path + "?a=1", body, {"content-type": "application/json"}) == expected
    assert srv.connections == 1
    path, head, got = srv.requests[0]
    assert path == b"/plain?a=1" and got == body
    assert b"content-type: application/json" in head and f"content-length: {len(body)}".encode() in head
    assert b"host: 127.0.0.1:" in head


async def test_an_answer_that_ends_the_connection_is_not_reused(server, poster) -> None:
    srv, url = server
    assert await poster.post(url + "/close", b"{}", {}) == 202
    assert await poster.post(url + "/to-the-end", b"{}", {}) == 200
    assert await poster.post(url + "/plain", b"{}", {}) == 204
    assert srv.connections == 3


async def test_a_kept_alive_connection_the_receiver_closed_is_retried_on_a_new_one(server, poster) -> None:
    srv, url = server
    assert await poster.post(url + "/plain", b"1", {}) == 204
    await srv.drop_idle_connections()
    assert await poster.post(url + "/plain", b"2", {}) == 204
    assert srv.connections == 2 and [r[2] for r in srv.requests] == [b"1", b"2"]


async def test_credentials_in_the_url_become_basic_auth(server, poster) -> None:
    srv, url = server
    assert await poster.post(url.replace("http://", "http://hook:s3cret@") + "/plain", b"{}", {}) == 204
    head = srv.requests[0][1]
    assert b"Basic aG9vazpzM2NyZXQ=" in head and b"s3cret" not in head


async def test_a_redirect_is_returned_not_followed(server, poster) -> None:
    srv, url = server
    assert await poster.post(url + "/redirect", b"{}", {}) == 307
    assert [r[0] for r in srv.requests] == [b"/redirect"]


@pytest.mark.parametrize(("path", "why"), [("/garbage", "not valid HTTP/1.1"),
                                           ("/bad-length", "not valid HTTP/1.1"),
                                           ("/silent", "timed out")])
async def test_bad_or_missing_answers_are_clear_errors(server, poster, path: str, why: str) -> None:
    _, url = server
    with pytest.raises(WebhookSendError, match=why):
        await poster.post(url + path, b"{}", {})
    assert await poster.post(url + "/plain", b"{}", {}) == 204  # and the next one works


async def test_a_refused_connection_and_https_failures_are_errors() -> None:
    with socket.socket() as s:  # bound, not listening: refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        async with httpx.AsyncClient(timeout=2) as client:
            poster = WebhookPoster(https_client=client, timeout=1.0)
            with pytest.raises(WebhookSendError, match="ConnectionRefusedError"):
                await poster.post(f"http://127.0.0.1:{port}/hook", b"{}", {})
            with pytest.raises(WebhookSendError, match="ConnectError"):  # https: httpx's error, named
                await poster.post(f"https://127.0.0.1:{port}/hook", b"{}", {})
            await poster.close()
