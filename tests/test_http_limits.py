"""Limits enforced while reading (issue 14, finding 4): a real ``pipeline serve``, raw sockets.

Before: a 1 GB unauthenticated POST to ``/v1/hooks/predictions`` was read whole (3.5 GB RSS,
``/healthz`` stalled), and chunked bodies bypassed the ``--http-ingest`` cap. Now the answer
comes before the body (authentication first), bodies are counted as they stream, and each
client has a bounded number of uploads at once. Memory is read from ``/proc/PID/status``.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httpx

from pipelines import webhook_signature
from tests.serve_process import serving

MB = 1 << 20


async def push(url: str, head: str, body_chunks, *, limit_bytes: int) -> tuple[str, int]:
    """Send ``head`` then body chunks until the server answers, closes, or ``limit_bytes``
    went out; returns (status line, body bytes sent)."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(head.encode())
    sent = 0
    answer = asyncio.ensure_future(reader.readline())
    try:
        for chunk in body_chunks:
            if answer.done() or sent >= limit_bytes:
                break
            writer.write(chunk)
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 10)
            except (ConnectionError, TimeoutError):
                break
            await asyncio.sleep(0)
        status = (await asyncio.wait_for(answer, 30)).decode().strip()
    finally:
        writer.close()
    return status, sent


def zeros(total: int, size: int = 256 << 10):
    chunk = b"0" * size
    for _ in range(total // size):
        yield chunk


def chunked(total: int, size: int = 256 << 10):
    piece = f"{size:x}\r\n".encode() + b"0" * size + b"\r\n"
    for _ in range(total // size):
        yield piece
    yield b"0\r\n\r\n"


async def test_one_gigabyte_unauthenticated_callback_is_refused_before_its_body(tmp_path):
    async with serving(tmp_path) as srv:
        before = srv.rss_kb()
        host = urlsplit(srv.url).netloc
        head = (f"POST /v1/hooks/predictions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {1 << 30}\r\n\r\n")
        started = time.monotonic()
        push_task = asyncio.create_task(push(srv.url, head, zeros(1 << 30), limit_bytes=1 << 30))
        async with httpx.AsyncClient(base_url=srv.url) as c:
            health = await c.get("/healthz")
            health_took = time.monotonic() - started
        status, sent = await push_task
        after = srv.rss_kb()
    print(f"status {status!r}, sent {sent / MB:.0f} MB, RSS {before // 1024} -> {after // 1024} MB, "
          f"/healthz in {health_took:.2f} s")
    assert status.startswith("HTTP/1.1 401")
    assert sent < 64 * MB  # the answer came long before the gigabyte: only socket buffers' worth went
    assert after - before < 40 * 1024
    assert health.status_code == 200


async def test_chunked_bodies_are_counted_as_they_stream(tmp_path):
    async with serving(tmp_path, "--http-ingest") as srv:
        before = srv.rss_kb()
        host = urlsplit(srv.url).netloc
        head = (f"POST /v1/ingest/demo/dev-1/temp HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        status, sent = await push(srv.url, head, chunked(300 * MB), limit_bytes=300 * MB)
        after = srv.rss_kb()
        # the same through the prediction callback, with fresh (unverifiable) signature headers
        signed = webhook_signature.sign("whsec_" + "A" * 43 + "=", "m1", None, b"")
        hook_head = (f"POST /v1/hooks/predictions HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                     + "".join(f"{k}: {v}\r\n" for k, v in signed.items()) + "\r\n")
        hook_status, hook_sent = await push(srv.url, hook_head, chunked(300 * MB), limit_bytes=300 * MB)
        hook_after = srv.rss_kb()
        async with httpx.AsyncClient(base_url=srv.url) as c:
            stream = (await c.get("/v1/stream")).json()
    print(f"ingest: {status!r} after {sent / MB:.0f} MB; hook: {hook_status!r} after {hook_sent / MB:.0f} MB;"
          f" RSS {before // 1024} -> {after // 1024} -> {hook_after // 1024} MB")
    assert status.startswith("HTTP/1.1 413") and sent < 100 * MB
    assert hook_status.startswith("HTTP/1.1 413") and hook_sent < 100 * MB
    assert after - before < 80 * 1024 and hook_after - before < 80 * 1024
    assert stream == []


async def test_uploads_at_once_per_client_are_bounded(tmp_path):
    async with serving(tmp_path, "--http-ingest") as srv:
        u = urlsplit(srv.url)
        head = (f"POST /v1/ingest/demo/dev-1/temp HTTP/1.1\r\nHost: {u.netloc}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        held = []
        for _ in range(16):  # sixteen slow uploads, each waiting for the rest of its body
            reader, writer = await asyncio.open_connection(u.hostname, u.port)
            writer.write(head.encode())
            await writer.drain()
            held.append((reader, writer))
        async with httpx.AsyncClient(base_url=srv.url) as c:
            for _ in range(100):  # the server has taken all sixteen in when the 17th is refused
                r = await c.post("/v1/ingest/demo/dev-1/temp", json={"t": 1})
                if r.status_code == 429:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert (await c.get("/healthz")).status_code == 200  # reading is not an upload
            for _, writer in held:
                writer.close()
            for _ in range(100):
                r = await c.post("/v1/ingest/demo/dev-1/temp", json={"t": 1})
                if r.status_code == 202:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 202
