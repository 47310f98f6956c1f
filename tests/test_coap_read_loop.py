"""Plain CoAP's read loop (``coap_datagrams.IngestUDP6.read_ready``): several datagrams per
wake-up of the event loop, and the socket's error queue read only when the kernel signals an
error, yet every ICMP error still reaches aiocoap.

A real ``CoapIngest`` on a real ``Router`` (webhook to a real HTTP server), raw UDP sockets and
aiocoap's client on loopback.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code
from dtls_env import HTTPRecorder
from test_coap_robustness import REGISTRY, Raw, block, datagram, expect_delivered, pipelines_yaml

from pipelines.ingest.coap import CoapIngest, CoapSettings
from pipelines.router import Router, RouterSettings


@pytest.fixture
def hook():
    with HTTPRecorder() as server:
        yield server


@pytest.fixture
async def server(tmp_path: Path, hook: HTTPRecorder):
    registry = tmp_path / "devices.yaml"
    registry.write_text(REGISTRY)
    registry.chmod(0o600)
    settings = RouterSettings(pipelines=[pipelines_yaml(tmp_path, hook)], store_path=tmp_path / "s.db")
    async with Router(settings) as router:
        coap = CoapSettings(host="127.0.0.1", port=0, plain_enabled=True, dtls_enabled=False,
                            registry_path=registry, rate_limit=0)
        async with CoapIngest(router, coap) as srv:
            yield srv


def closed_udp_port() -> int:
    """A loopback UDP port nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_burst_is_answered_in_full(server):
    """300 Block1 first blocks (each its own upload) sent back to back, faster than the server
    answers: each gets its 2.31 Continue, none is lost or answered twice."""
    raw = Raw(server.port)
    try:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        n = 300
        burst = [block(1000 + i, i.to_bytes(2, "big"), 0, True, bytes([i % 251]) * 1024, path=f"cam{i}")
                 for i in range(n)]

        def collect() -> list[aiocoap.Message]:
            got: list[aiocoap.Message] = []
            raw.sock.settimeout(10)
            while len(got) < n:
                got.append(aiocoap.Message.decode(raw.sock.recv(65536)))
            return got

        answers = asyncio.create_task(asyncio.to_thread(collect))
        await raw.burst(burst)
        got = await answers
        assert sorted(m.mid for m in got) == [1000 + i for i in range(n)]
        assert {m.code for m in got} == {Code.CONTINUE}
    finally:
        raw.close()


async def test_a_whole_frame_still_goes_through(server, hook):
    """Block1 upload over the read loop: stored, answered 2.04, delivered byte for byte."""
    raw = Raw(server.port)
    try:
        body = bytes(range(256)) * 12
        parts = [body[i:i + 1024] for i in range(0, len(body), 1024)]
        answer = None
        for i, part in enumerate(parts):
            answer = await raw.ask(block(50 + i, b"tok", i, i < len(parts) - 1, part))
        assert answer is not None
        await expect_delivered(hook, answer, body)
    finally:
        raw.close()


async def test_icmp_port_unreachable_reaches_aiocoap(server):
    """A request the server's context sends (over the same socket) to a port nobody listens
    on fails at once with the kernel's ICMP error (read from the error queue), not after
    CoAP's retransmissions (some 90 s); and the server keeps answering devices."""
    port = closed_udp_port()
    before = server.plain.errqueue_reads
    request = aiocoap.Message(code=Code.GET, uri=f"coap://127.0.0.1:{port}/x")
    started = time.monotonic()
    with pytest.raises(aiocoap.error.NetworkError) as caught:
        await asyncio.wait_for(server.context.request(request).response, 20)
    assert time.monotonic() - started < 10
    assert "received through errqueue" in repr(caught.value), caught.value
    assert server.plain.errqueue_reads > before
    raw = Raw(server.port)
    try:
        answer = await raw.ask(datagram(77, b"t", [".s", "after"], b"still here"))
        assert answer.code == Code.CHANGED
    finally:
        raw.close()
