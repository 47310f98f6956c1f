"""CoAP / DTLS ingest against the real Router, with real clients on loopback.

Devices are aiocoap clients (plain and DTLS) and libcoap's ``coap-client-openssl``; frames are
real PNGs; the destination is a real HTTP server that records what the webhook delivered.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path

import aiocoap
import cbor2
import dtls_env
import numpy as np
import pytest
from aiocoap import Code
from aiocoap.optiontypes import BlockOption
from dtls_env import HTTPRecorder, wait_for
from PIL import Image

from device_sim.dtls_transport import dtls_client_context
from pipelines.ingest.coap import CoapIngest, CoapSettings
from pipelines.router import Router, RouterSettings

UUID_RE = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LIBCOAP = shutil.which("coap-client-openssl")
needs_libcoap = pytest.mark.usefixtures("require_libcoap")


@pytest.fixture
def require_libcoap() -> None:
    """A missing tool fails the test (never a silent skip): ``./dev`` installs libcoap3-bin."""
    assert LIBCOAP is not None, "coap-client-openssl not found: run ./dev setup (Debian libcoap3-bin)"

KEY_01 = "cam-01-secret"
KEY_02 = "0x" + "a1b2c3d4e5f60718293a4b5c6d7e8f90"  # a binary key, given as hex

REGISTRY = f"""\
project_id: demo
devices:
  - id: cam-01
    psk: "{KEY_01}"
  - id: cam-02
    psk: "$CAM02_PSK"
  - id: cam-03
    project_id: other
    psk: "cam-03-secret"
  - id: flood
    psk: "flood-secret"
"""


# -- helpers -----------------------------------------------------------------------------

def make_png(approx_bytes: int, seed: int = 0) -> bytes:
    """A real PNG of roughly ``approx_bytes``: a gradient with a square of noise (incompressible)."""
    rng = np.random.default_rng(seed)
    side = max(8, int((approx_bytes / 3) ** 0.5))
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) * 127 // side)], axis=-1).astype(np.uint8)
    img ^= rng.integers(0, 256, img.shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def request(method, uri: str, payload: bytes = b"", **opts) -> aiocoap.Message:
    return aiocoap.Message(code=method, uri=uri, payload=payload, **opts)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def libcoap(*args: str, timeout: float = 30.0) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(LIBCOAP, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out, err


def raw_request(mid: int, token: bytes, path: list[str], query: list[str], payload: bytes,
                content_format: int | None = None) -> bytes:
    with warnings.catch_warnings():  # setting MID, type and token by hand is what we want here
        warnings.simplefilter("ignore", DeprecationWarning)
        m = aiocoap.Message(mtype=aiocoap.CON, mid=mid, token=token, code=Code.POST, payload=payload)
    m.opt.uri_path = path
    m.opt.uri_query = query
    if content_format is not None:
        m.opt.content_format = content_format
    return m.encode()


class RawClient:
    """A bare UDP socket: for datagrams no well-behaved client library would send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(5)
        self.addr = ("127.0.0.1", port)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.addr)

    async def receive(self) -> aiocoap.Message:
        data = await asyncio.to_thread(self.sock.recv, 65536)
        return aiocoap.Message.decode(data)

    def close(self) -> None:
        self.sock.close()


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture
def hook():
    with HTTPRecorder() as server:
        yield server


@pytest.fixture
def registry_path(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("CAM02_PSK", KEY_02)
    path = tmp_path / "devices.yaml"
    path.write_text(REGISTRY)
    return path


RESULTS_PIPELINE = """\
  results:
    filter: {path: /results, content_type: application/json}
    steps:
      - name: to-device
        destination: {type: lightdb-state, version: v1, parameters: {path: /result}}
"""


def pipelines_file(tmp_path: Path, hook: HTTPRecorder) -> Path:
    return dtls_env.pipelines_file(tmp_path, hook, name="frames", more=RESULTS_PIPELINE)


@pytest.fixture
async def router(tmp_path: Path, hook: HTTPRecorder):
    settings = RouterSettings(pipelines=[pipelines_file(tmp_path, hook)], store_path=tmp_path / "s.db")
    async with Router(settings) as r:
        yield r


def coap_settings(registry_path: Path, **kw) -> CoapSettings:
    base = dict(host="127.0.0.1", port=0, dtls_port=0, plain_enabled=True, registry_path=registry_path,
                rate_limit=0)
    base.update(kw)
    return CoapSettings(**base)


@pytest.fixture
async def server(router, registry_path: Path):
    async with CoapIngest(router, coap_settings(registry_path)) as srv:
        yield srv


@pytest.fixture
async def client():
    ctx = await aiocoap.Context.create_client_context()
    yield ctx
    await ctx.shutdown()


async def post_frame(ctx: aiocoap.Context, port: int, body: bytes, device: str = "cam-01",
                     path: str = "images", szx: int | None = None, cf: int = 23,
                     **opts) -> aiocoap.Message:
    msg = request(Code.POST, f"coap://127.0.0.1:{port}/.s/{path}?d={device}", body, content_format=cf, **opts)
    if szx is not None:
        with warnings.catch_warnings():  # aiocoap takes the block size hint from an initial Block1
            warnings.simplefilter("ignore", DeprecationWarning)
            msg.opt.block1 = BlockOption.BlockwiseTuple(0, False, szx)
            return await ctx.request(msg).response
    return await ctx.request(msg).response


def delivered(hook: HTTPRecorder, message_id: str):
    for r in hook.requests:
        if r.headers.get("Ce-Id") == message_id:
            return r
    return None


async def expect_delivered(hook: HTTPRecorder, response: aiocoap.Message, body: bytes,
                           content_type: str = "image/png", device: str = "cam-01"):
    assert response.code == Code.CHANGED, (response.code, response.payload)
    message_id = response.payload.decode()
    got = await wait_for(lambda: delivered(hook, message_id), what=f"delivery of {message_id}")
    assert got.body == body
    assert got.headers["Content-Type"] == content_type
    assert got.headers["Ce-Source"] == device
    return got


# -- plain CoAP ----------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "szx"), [(1_000, 0), (5_000, 2), (20_000, 4), (60_000, 6), (300_000, 6)])
async def test_plain_png_upload_arrives_byte_identical(server, client, hook, size, szx):
    frame = make_png(size, seed=size)
    assert frame[:8] == b"\x89PNG\r\n\x1a\n"
    response = await post_frame(client, server.port, frame, szx=szx)
    await expect_delivered(hook, response, frame)
    assert server.stats["accepted"] == 1


@pytest.mark.slow
async def test_plain_one_megabyte_frame(server, client, hook):
    frame = make_png(1_000_000, seed=9)
    assert len(frame) > 900_000
    response = await post_frame(client, server.port, frame)
    await expect_delivered(hook, response, frame)


async def test_plain_needs_device_name_and_valid_path(server, client):
    base = f"coap://127.0.0.1:{server.port}"
    r = await client.request(request(Code.POST, f"{base}/.s/images", b"x")).response
    assert r.code == Code.UNAUTHORIZED and b"?d=" in r.payload
    r = await client.request(request(Code.POST, f"{base}/.s/images?d=bad/id", b"x")).response
    assert r.code == Code.BAD_REQUEST
    r = await client.request(request(Code.POST, f"{base}/.s/images/a//b?d=cam-01", b"x")).response
    assert r.code == Code.BAD_REQUEST and b"non-empty" in r.payload
    r = await client.request(request(Code.POST, f"{base}/nothing?d=cam-01", b"x")).response
    assert r.code == Code.NOT_FOUND
    r = await client.request(request(Code.GET, f"{base}/.s/images?d=cam-01")).response
    assert r.code == Code.METHOD_NOT_ALLOWED


async def test_content_formats_map_to_content_types(server, client, hook, router):
    for cf, ct in [(0, "text/plain"), (50, "application/json"), (22, "image/jpeg"),
                   (1234, "application/octet-stream")]:
        body = b'{"n": 1}' if cf == 50 else f"payload {cf}".encode()
        r = await post_frame(client, server.port, body, cf=cf)
        await expect_delivered(hook, r, body, content_type=ct)
    # no Content-Format at all: octet-stream
    r = await client.request(request(Code.POST, f"coap://127.0.0.1:{server.port}/.s/images?d=cam-01",
                                     b"raw")).response
    await expect_delivered(hook, r, b"raw", content_type="application/octet-stream")


async def test_project_comes_from_registry_over_plain(server, client, hook):
    r = await post_frame(client, server.port, b"p", device="cam-03", cf=0)
    got = await expect_delivered(hook, r, b"p", content_type="text/plain", device="cam-03")
    assert got.headers["Ce-Subject"] == "other"
    r = await post_frame(client, server.port, b"q", device="not-registered", cf=0)
    got = await expect_delivered(hook, r, b"q", content_type="text/plain", device="not-registered")
    assert got.headers["Ce-Subject"] == "demo"  # the registry's default project


async def test_plain_is_off_unless_enabled(router, registry_path):
    async with CoapIngest(router, coap_settings(registry_path, plain_enabled=False)) as srv:
        assert srv.port is None and srv.dtls_port


async def test_serve_coap_runs_until_cancelled(router, registry_path, client, hook):
    from pipelines.ingest.coap import serve_coap

    started: asyncio.Future = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_coap(router, coap_settings(registry_path), ready=started.set_result))
    srv = await asyncio.wait_for(started, 10)
    frame = make_png(2_000)
    await expect_delivered(hook, await post_frame(client, srv.port, frame), frame)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert srv.context is None  # sockets closed


# -- DTLS ----------------------------------------------------------------------------------

@needs_libcoap
@pytest.mark.parametrize(("size", "block"), [(1_000, 16), (20_000, 64), (100_000, 256), (60_000, 1024)])
async def test_libcoap_dtls_upload(server, hook, tmp_path, size, block):
    frame = make_png(size, seed=block)
    f = tmp_path / "frame.png"
    f.write_bytes(frame)
    rc, out, err = await libcoap("-m", "post", "-b", str(block), "-f", str(f), "-t", "23",
                                 "-u", "cam-01@demo", "-k", KEY_01,
                                 f"coaps://127.0.0.1:{server.dtls_port}/.s/images")
    assert rc == 0, err
    message_id = out.decode().strip()
    got = await wait_for(lambda: delivered(hook, message_id), what="delivery")
    assert got.body == frame
    assert got.headers["Ce-Source"] == "cam-01" and got.headers["Ce-Subject"] == "demo"


@needs_libcoap
@pytest.mark.slow
async def test_libcoap_dtls_one_megabyte(server, hook, tmp_path):
    frame = make_png(1_000_000, seed=3)
    f = tmp_path / "frame.png"
    f.write_bytes(frame)
    rc, out, err = await libcoap("-m", "post", "-b", "1024", "-f", str(f), "-t", "23",
                                 "-u", "cam-01@demo", "-k", KEY_01,
                                 f"coaps://127.0.0.1:{server.dtls_port}/.s/images")
    assert rc == 0, err
    got = await wait_for(lambda: delivered(hook, out.decode().strip()), what="delivery")
    assert got.body == frame


@needs_libcoap
async def test_dtls_wrong_key_and_unknown_identity_refused(server, hook, tmp_path):
    url = f"coaps://127.0.0.1:{server.dtls_port}/.s/images"
    for identity, key in [("cam-01@demo", "not-the-key"), ("ghost@demo", KEY_01),
                          ("cam-01@other", KEY_01), ("cam-01", KEY_01)]:
        rc, out, err = await libcoap("-m", "post", "-e", "sneaky", "-t", "0", "-B", "2",
                                     "-u", identity, "-k", key, url)
        # libcoap 4.3.1 exits 0 even when the handshake fails; what matters is that no
        # answer came back and nothing was accepted
        assert not UUID_RE.search(out), (identity, out)
    assert server.stats["accepted"] == 0
    # and a device with the right key is still served
    rc, out, err = await libcoap("-m", "post", "-e", "fine", "-t", "0", "-u", "cam-01@demo", "-k", KEY_01,
                                 url)
    assert rc == 0, err
    got = await wait_for(lambda: delivered(hook, out.decode().strip()), what="delivery")
    assert got.body == b"fine"
    assert not any(r.body == b"sneaky" for r in hook.requests)


@needs_libcoap
async def test_dtls_hex_key_from_secret_reference(server, hook):
    # cam-02's key is "$CAM02_PSK" in the registry, resolved from the environment, and binary.
    # libcoap 4.3.1 takes -k literally, so this device is exercised with the simulator's DTLS client.
    ctx = await dtls_client_context(b"cam-02@demo", bytes.fromhex(KEY_02[2:]))
    try:
        uri = f"coaps://127.0.0.1:{server.dtls_port}/.s/images"
        frame = make_png(10_000, seed=2)
        r = await ctx.request(request(Code.POST, uri, frame, content_format=23)).response
        await expect_delivered(hook, r, frame, device="cam-02")
    finally:
        await ctx.shutdown()


@needs_libcoap
async def test_dtls_listens_on_exactly_the_configured_port(router, registry_path, hook, tmp_path):
    # aiocoap's tinydtls transport added 1 to the port it was given; ours binds the port asked for.
    port = free_udp_port()
    async with CoapIngest(router, coap_settings(registry_path, plain_enabled=False, dtls_port=port)) as srv:
        assert srv.dtls_port == port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, pytest.raises(OSError):
            probe.bind(("127.0.0.1", port))  # taken by the server (no SO_REUSEPORT by default)
        rc, out, err = await libcoap("-m", "post", "-e", "exact", "-t", "0", "-u", "cam-01@demo",
                                     "-k", KEY_01, f"coaps://127.0.0.1:{port}/.s/images")
        assert rc == 0, err
        got = await wait_for(lambda: delivered(hook, out.decode().strip()), what="delivery")
        assert got.body == b"exact"


@needs_libcoap
async def test_dtls_junk_creates_no_session_state(router, registry_path, hook):
    async with CoapIngest(router, coap_settings(registry_path, max_dtls_sessions=4)) as srv:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(12)]
        try:
            for s in socks:  # each source port is a would-be DTLS peer
                s.sendto(b"\x16\xfe\xfd" + os.urandom(40), ("127.0.0.1", srv.dtls_port))
            await wait_for(lambda: srv.dtls.stats["datagrams_dropped"] >= 12, what="junk seen")
            assert srv.dtls.handshake_count == 0 and srv.dtls.session_count == 0
        finally:
            for s in socks:
                s.close()
        rc, out, err = await libcoap("-m", "post", "-e", "still-here", "-t", "0", "-u", "cam-01@demo",
                                     "-k", KEY_01, f"coaps://127.0.0.1:{srv.dtls_port}/.s/images")
        assert rc == 0, err
        got = await wait_for(lambda: delivered(hook, out.decode().strip()), what="delivery")
        assert got.body == b"still-here"


@needs_libcoap
async def test_dtls_on_the_any_address(router, registry_path, hook):
    async with CoapIngest(router, coap_settings(registry_path, host="0.0.0.0")) as srv:
        rc, out, err = await libcoap("-m", "post", "-e", "any", "-t", "0", "-u", "cam-01@demo",
                                     "-k", KEY_01, f"coaps://127.0.0.1:{srv.dtls_port}/.s/images")
        assert rc == 0, err
        got = await wait_for(lambda: delivered(hook, out.decode().strip()), what="delivery")
        assert got.body == b"any"


async def test_dtls_needs_a_registry(router):
    with pytest.raises(ValueError, match="registry"):
        CoapIngest(router, CoapSettings(port=0, dtls_port=0))


# -- Block1 edge cases (blocks sent one by one) ----------------------------------------------

async def send_block(ctx, port, num, more, szx, payload, *, device="cam-01", path="images",
                     size1=None, request_tag=None, cf=23) -> aiocoap.Message:
    msg = request(Code.POST, f"coap://127.0.0.1:{port}/.s/{path}?d={device}", payload, content_format=cf)
    msg.opt.block1 = BlockOption.BlockwiseTuple(num, more, szx)
    if size1 is not None:
        msg.opt.size1 = size1
    if request_tag is not None:
        msg.opt.request_tag = [request_tag]
    return await ctx.request(msg, handle_blockwise=False).response


async def test_block1_unknown_transfer_and_gap_get_4_08(server, client, router):
    r = await send_block(client, server.port, 3, True, 6, b"x" * 1024)
    assert r.code == Code.REQUEST_ENTITY_INCOMPLETE and b"block 0" in r.payload
    r = await send_block(client, server.port, 0, True, 6, b"a" * 1024)
    assert r.code == Code.CONTINUE and r.opt.block1 == (0, True, 6)
    r = await send_block(client, server.port, 2, True, 6, b"c" * 1024)  # block 1 missing
    assert r.code == Code.REQUEST_ENTITY_INCOMPLETE and b"out of order" in r.payload
    r = await send_block(client, server.port, 1, False, 6, b"b" * 10)  # transfer was dropped
    assert r.code == Code.REQUEST_ENTITY_INCOMPLETE
    assert server.stats["accepted"] == 0 and router.inbox_depth == 0


async def test_block1_short_middle_block_is_bad_request(server, client):
    r = await send_block(client, server.port, 0, True, 6, b"a" * 1000)
    assert r.code == Code.BAD_REQUEST and b"exactly 1024" in r.payload


async def test_block1_szx7_is_bad_request(server, client):
    r = await send_block(client, server.port, 0, True, 7, b"a" * 1024)
    assert r.code == Code.BAD_REQUEST and b"BERT" in r.payload


async def test_body_over_limit_gets_4_13_with_size1(router, registry_path, client, hook):
    async with CoapIngest(router, coap_settings(registry_path, max_body=8192)) as srv:
        # announced up front: refused on the first block
        r = await send_block(client, srv.port, 0, True, 6, b"a" * 1024, size1=10_000)
        assert r.code == Code.REQUEST_ENTITY_TOO_LARGE and r.opt.size1 == 8192
        # not announced: refused on the block that passes the limit
        codes = []
        for n in range(9):
            r = await send_block(client, srv.port, n, True, 6, b"a" * 1024)
            codes.append(r.code)
        assert codes[:8] == [Code.CONTINUE] * 8
        assert codes[8] == Code.REQUEST_ENTITY_TOO_LARGE and r.opt.size1 == 8192
        # aiocoap's own blockwise client sends Size1 and gets 4.13 right away
        r = await post_frame(client, srv.port, make_png(20_000))
        assert r.code == Code.REQUEST_ENTITY_TOO_LARGE
        # a body under the limit is fine, and nothing else was ingested
        frame = make_png(4_000)
        r = await post_frame(client, srv.port, frame)
        await expect_delivered(hook, r, frame)
        assert srv.stats["accepted"] == 1


async def test_server_asks_for_smaller_blocks(router, registry_path, client, hook):
    async with CoapIngest(router, coap_settings(registry_path, max_block_szx=4)) as srv:
        r = await send_block(client, srv.port, 0, True, 6, b"a" * 1024, path="raw")
        assert r.code == Code.CONTINUE and r.opt.block1 == (0, True, 4)
        # the client re-indexes: 1024 bytes = blocks 0..3 of 256, so the next one is number 4
        r = await send_block(client, srv.port, 4, False, 4, b"b" * 100, path="raw")
        assert r.code == Code.CHANGED
        # aiocoap's blockwise client follows the smaller size on its own
        frame = make_png(30_000, seed=4)
        r = await post_frame(client, srv.port, frame)
        await expect_delivered(hook, r, frame)


@needs_libcoap
async def test_libcoap_follows_smaller_block_size(router, registry_path, hook, tmp_path):
    async with CoapIngest(router, coap_settings(registry_path, max_block_szx=3)) as srv:
        frame = make_png(20_000, seed=5)
        f = tmp_path / "frame.png"
        f.write_bytes(frame)
        rc, out, err = await libcoap("-m", "post", "-b", "1024", "-f", str(f), "-t", "23",
                                     "-u", "cam-01@demo", "-k", KEY_01,
                                     f"coaps://127.0.0.1:{srv.dtls_port}/.s/images")
        assert rc == 0, err
        got = await wait_for(lambda: delivered(hook, out.decode().strip()), what="delivery")
        assert got.body == frame


async def test_abandoned_upload_expires(router, registry_path, client):
    async with CoapIngest(router, coap_settings(registry_path, block_expiry=0.3)) as srv:
        r = await send_block(client, srv.port, 0, True, 6, b"a" * 1024)
        assert r.code == Code.CONTINUE
        assert len(srv.server.uploads) == 1 and srv.server.uploads.held_bytes == 1024
        await wait_for(lambda: len(srv.server.uploads) == 0, timeout=5, what="expiry")
        assert srv.server.uploads.held_bytes == 0
        r = await send_block(client, srv.port, 1, False, 6, b"b")
        assert r.code == Code.REQUEST_ENTITY_INCOMPLETE


async def test_concurrent_uploads_from_one_endpoint_to_one_path(server, client, hook):
    a, b = make_png(20_000, seed=10), make_png(20_000, seed=11)
    ra, rb = await asyncio.gather(post_frame(client, server.port, a), post_frame(client, server.port, b))
    codes = sorted([ra.code, rb.code])
    # one goes through, the other is told clearly why not (never 5.00, never a mixed body)
    assert codes == sorted([Code.CHANGED, Code.CONFLICT]), codes
    winner, body = (ra, a) if ra.code == Code.CHANGED else (rb, b)
    loser = rb if winner is ra else ra
    assert b"Request-Tag" in loser.payload
    await expect_delivered(hook, winner, body)
    assert server.stats["accepted"] == 1


async def test_concurrent_uploads_with_request_tags(server, client, hook):
    a, b = make_png(20_000, seed=12), make_png(20_000, seed=13)
    ra, rb = await asyncio.gather(post_frame(client, server.port, a, request_tag=[b"A"]),
                                  post_frame(client, server.port, b, request_tag=[b"B"]))
    await expect_delivered(hook, ra, a)
    await expect_delivered(hook, rb, b)


async def test_upload_memory_cap_gives_5_03(router, registry_path, hook):
    async with CoapIngest(router, coap_settings(registry_path, max_held_bytes=3 * 1024)) as srv:
        clients = [await aiocoap.Context.create_client_context() for _ in range(4)]
        try:
            codes = []
            for i, ctx in enumerate(clients):
                r = await send_block(ctx, srv.port, 0, True, 6, b"x" * 1024, device=f"d{i}")
                codes.append((r.code, r.opt.max_age))
            assert [c for c, _ in codes[:3]] == [Code.CONTINUE] * 3
            assert codes[3] == (Code.SERVICE_UNAVAILABLE, 2)
            assert srv.server.uploads.held_bytes <= 3 * 1024
        finally:
            for ctx in clients:
                await ctx.shutdown()


# -- acknowledgement, duplicates, abuse ------------------------------------------------------

async def test_retransmitted_request_is_answered_from_cache_not_ingested_twice(server, hook, router):
    raw = RawClient(server.port)
    try:
        datagram = raw_request(4242, b"\x01\x02\x03\x04\x05\x06\x07\x08", [".s", "images"], ["d=cam-01"],
                               b"exactly-once", content_format=0)
        raw.send(datagram)
        first = await raw.receive()
        assert first.code == Code.CHANGED and first.mid == 4242
        raw.send(datagram)  # the device did not hear the ACK and sends the same message again
        second = await raw.receive()
        assert second.code == Code.CHANGED and second.payload == first.payload
        await wait_for(lambda: delivered(hook, first.payload.decode()), what="delivery")
        await asyncio.sleep(0.5)  # give a second copy every chance to show up
        assert [r.body for r in hook.requests].count(b"exactly-once") == 1
        assert server.stats["accepted"] == 1
    finally:
        raw.close()


async def test_repeated_block_is_answered_again_and_the_upload_goes_on(server, client, hook):
    """A block sent again with a new message id (the exchange cache cannot recognise it) is
    answered as before, and the upload carries on whole."""
    a, b, c = b"a" * 1024, b"b" * 1024, b"c" * 10
    assert (await send_block(client, server.port, 0, True, 6, a)).code == Code.CONTINUE
    assert (await send_block(client, server.port, 1, True, 6, b)).code == Code.CONTINUE
    again = await send_block(client, server.port, 0, True, 6, a)
    assert again.code == Code.CONTINUE and again.opt.block1 == (0, True, 6)
    assert (await send_block(client, server.port, 1, True, 6, b)).code == Code.CONTINUE
    different = await send_block(client, server.port, 1, True, 6, b"x" * 1024)  # not a repeat
    assert different.code == Code.REQUEST_ENTITY_INCOMPLETE
    assert (await send_block(client, server.port, 0, True, 6, a)).code == Code.CONTINUE
    assert (await send_block(client, server.port, 1, True, 6, b)).code == Code.CONTINUE
    done = await send_block(client, server.port, 2, False, 6, c)
    await expect_delivered(hook, done, a + b + c)
    assert server.stats["accepted"] == 1


async def test_duplicate_detection_table_is_capped_newest_kept(router, registry_path, hook):
    async with CoapIngest(router, coap_settings(registry_path, max_recent_exchanges=40)) as srv:
        raw = RawClient(srv.port)
        try:
            datagrams = [raw_request(1000 + i, i.to_bytes(4, "big"), [".s", "images"], ["d=cam-01"],
                                     f"m{i}".encode(), content_format=0) for i in range(100)]
            answers = []
            for d in datagrams:
                raw.send(d)
                answers.append(await raw.receive())
            assert all(a.code == Code.CHANGED for a in answers)
            assert srv.stats["recent_exchanges"] <= 40
            assert srv.stats["exchanges_evicted"] >= 60
            raw.send(datagrams[-1])  # the newest is still recognised: answered from the cache
            again = await raw.receive()
            assert again.code == Code.CHANGED and again.payload == answers[-1].payload
            assert srv.stats["accepted"] == 100
        finally:
            raw.close()


async def test_garbage_and_oversized_tokens_do_not_hurt_others(server, client, hook):
    raw = RawClient(server.port)
    try:
        for junk in [b"", b"\x00", b"\xff" * 3, os.urandom(40), b"\x40\x02\x00",  # too short
                     b"\x48\x02\x12\x34" + b"t" * 4]:  # claims an 8-byte token, has 4
            raw.send(junk)
        # a 9-byte token (TKL 9 is reserved): answered 4.00, not a crash
        bad = bytearray(raw_request(77, b"12345678", [".s", "images"], ["d=cam-01"], b"x"))
        bad = bytes([(bad[0] & 0xF0) | 9]) + bytes(bad[1:4]) + b"123456789" + bytes(bad[12:])
        raw.send(bad)
        answer = await raw.receive()
        while answer.mid != 77:  # the short-token junk above parses, and gets its own 4.04
            answer = await raw.receive()
        assert answer.code == Code.BAD_REQUEST and b"token" in answer.payload
    finally:
        raw.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # junk at the DTLS port too
        for junk in [b"\x16\xfe\xfd" + os.urandom(30), os.urandom(100), b"\x17"]:
            s.sendto(junk, ("127.0.0.1", server.dtls_port))
    frame = make_png(5_000)
    await expect_delivered(hook, await post_frame(client, server.port, frame), frame)
    assert server.stats["accepted"] == 1


async def test_keepalives_and_pings_are_quietly_handled(server, client, hook, caplog):
    raw = RawClient(server.port)
    try:
        raw.send(bytes([0x50, 0x00, 0x12, 0x35]))  # empty NON: the Golioth SDK's keep-alive
        pong = await raw.receive()
        assert pong.mtype == aiocoap.RST and pong.mid == 0x1235  # answered: the SDK stays connected
        raw.send(bytes([0x40, 0x00, 0x12, 0x36]))  # empty CON: a CoAP ping, answered with RST
        pong = await raw.receive()
        assert pong.mtype == aiocoap.RST and pong.mid == 0x1236
    finally:
        raw.close()
    frame = make_png(2_000)
    await expect_delivered(hook, await post_frame(client, server.port, frame), frame)
    assert not [r for r in caplog.records if r.levelno >= 30 and "EMPTY" in r.getMessage()]


async def test_flooding_device_gets_4_29_while_others_are_served(router, registry_path, hook):
    settings = coap_settings(registry_path, rate_limit=5, rate_burst=5)
    async with CoapIngest(router, settings) as srv:
        flood = await aiocoap.Context.create_client_context()
        good = await aiocoap.Context.create_client_context()
        try:
            responses = await asyncio.gather(*[
                flood.request(request(Code.POST, f"coap://127.0.0.1:{srv.port}/.s/images?d=flood",
                                      b"spam", content_format=0)).response for _ in range(30)])
            limited = [r for r in responses if r.code == Code.TOO_MANY_REQUESTS]
            served = [r for r in responses if r.code == Code.CHANGED]
            assert len(limited) + len(served) == 30
            # a burst of 5 goes through, then about 5/s: most of 30 quick requests are refused
            assert len(served) >= 5 and len(limited) >= 10, [r.code for r in responses]
            assert all(r.opt.max_age >= 1 for r in limited)
            frame = make_png(3_000)
            await expect_delivered(hook, await post_frame(good, srv.port, frame), frame)
        finally:
            await flood.shutdown()
            await good.shutdown()


async def test_router_overload_gives_5_03_with_max_age(tmp_path, hook, registry_path, client):
    settings = RouterSettings(pipelines=[pipelines_file(tmp_path, hook)], store_path=tmp_path / "o.db",
                              max_inbox=1, run_engine=False, overload_retry_after=7)
    async with Router(settings) as r, CoapIngest(r, coap_settings(registry_path)) as srv:
        first = await post_frame(client, srv.port, b"one", cf=0)
        assert first.code == Code.CHANGED  # stored: the router takes it before it is full

        async def overloaded():
            resp = await post_frame(client, srv.port, b"more", cf=0)
            return resp if resp.code == Code.SERVICE_UNAVAILABLE else None
        deadline = time.monotonic() + 5
        resp = None
        while resp is None and time.monotonic() < deadline:
            resp = await overloaded()
        assert resp is not None and resp.opt.max_age == 7
        # a device learns to come back later, nothing about the router's pipelines or queues
        assert resp.payload == b"router busy, retry later"


async def test_acknowledged_means_stored(tmp_path, hook, registry_path, client):
    # No engine: what the 2.04 promises must already be in the router's durable inbox.
    settings = RouterSettings(pipelines=[pipelines_file(tmp_path, hook)], store_path=tmp_path / "a.db",
                              run_engine=False)
    frame = make_png(40_000, seed=21)
    async with Router(settings) as r, CoapIngest(r, coap_settings(registry_path)) as srv:
        resp = await post_frame(client, srv.port, frame, cf=9999)
        assert resp.code == Code.CHANGED
        rows = await r.store.fetch_inbox(0)
        assert [row.message.id for row in rows] == [resp.payload.decode()]
        stored = rows[0].message
        assert stored.payload == frame and stored.path == "/images" and stored.device_id == "cam-01"
        assert stored.content_type == "application/octet-stream"
        assert stored.metadata["coap_content_format"] == 9999


# -- device state (/.d/) -------------------------------------------------------------------

async def test_state_put_get_delete_json_and_cbor(server, client, router):
    base = f"coap://127.0.0.1:{server.port}/.d"
    r = await client.request(request(Code.PUT, f"{base}/config?d=cam-01", b'{"fps": 5}',
                                     content_format=50)).response
    assert r.code == Code.CHANGED
    r = await client.request(request(Code.GET, f"{base}/config/fps?d=cam-01")).response
    assert r.code == Code.CONTENT and r.opt.content_format == 50 and json.loads(r.payload) == 5
    r = await client.request(request(Code.POST, f"{base}/mode?d=cam-01", cbor2.dumps({"night": True}),
                                     content_format=60)).response
    assert r.code == Code.CHANGED
    assert await router.get_state("demo", "cam-01", "/") == {"config": {"fps": 5}, "mode": {"night": True}}
    r = await client.request(request(Code.GET, f"{base}/mode?d=cam-01", accept=60)).response
    assert cbor2.loads(r.payload) == {"night": True} and r.opt.content_format == 60
    r = await client.request(request(Code.DELETE, f"{base}/config?d=cam-01")).response
    assert r.code == Code.DELETED
    r = await client.request(request(Code.GET, f"{base}/config?d=cam-01")).response
    assert r.code == Code.CONTENT and r.payload == b"null"
    # bad input
    r = await client.request(request(Code.PUT, f"{base}/x?d=cam-01", b"{nope", content_format=50)).response
    assert r.code == Code.BAD_REQUEST and b"JSON" in r.payload
    r = await client.request(request(Code.PUT, f"{base}/x?d=cam-01", b"\xff\xff", content_format=60)).response
    assert r.code == Code.BAD_REQUEST and b"CBOR" in r.payload
    # nesting deeper than the decoder's recursion limit is the device's mistake, not ours (5.00)
    r = await client.request(request(Code.PUT, f"{base}/x?d=cam-01", b"[" * 60_000, content_format=50)).response
    assert r.code == Code.BAD_REQUEST and b"nested too deeply" in r.payload
    r = await client.request(request(Code.PUT, f"{base}/x?d=cam-01", b"hi", content_format=0)).response
    assert r.code == Code.UNSUPPORTED_CONTENT_FORMAT
    # another device's document is separate
    assert not await router.get_state("demo", "flood", "/")


async def test_observe_gets_pipeline_results(server, client, router):
    obs_req = request(Code.GET, f"coap://127.0.0.1:{server.port}/.d/result?d=cam-01", observe=0)
    pr = client.request(obs_req)
    first = await pr.response
    assert first.code == Code.CONTENT and first.payload == b"null"
    notifications = pr.observation.__aiter__()
    # a result comes in through the pipelines (lightdb-state destination writes /result)
    r = await post_frame(client, server.port, b'{"caption": "a cat"}', path="results", cf=50)
    assert r.code == Code.CHANGED
    note = await asyncio.wait_for(notifications.__anext__(), 10)
    assert json.loads(note.payload) == {"caption": "a cat"}
    # a write elsewhere in the document is not news for this observer; a write here is
    await router.set_state("demo", "cam-01", "/other", 1)
    await router.set_state("demo", "cam-01", "/result", {"caption": "a dog"})
    note = await asyncio.wait_for(notifications.__anext__(), 10)
    assert json.loads(note.payload) == {"caption": "a dog"}
    pr.observation.cancel()


@needs_libcoap
async def test_dtls_state_is_the_authenticated_devices(server, router):
    await router.set_state("demo", "cam-01", "/greeting", "hello cam-01")
    await router.set_state("demo", "cam-02", "/greeting", "not yours")
    rc, out, err = await libcoap("-m", "get", "-u", "cam-01@demo", "-k", KEY_01,
                                 f"coaps://127.0.0.1:{server.dtls_port}/.d/greeting?d=cam-02")
    assert rc == 0, err
    assert json.loads(out) == "hello cam-01"  # ?d= means nothing over DTLS


async def test_well_known_core(server, client):
    r = await client.request(request(Code.GET, f"coap://127.0.0.1:{server.port}/.well-known/core")).response
    assert r.code == Code.CONTENT
    text = r.payload.decode()
    assert "</.s/>" in text and "</.d/>" in text and "obs" in text


# -- scale-out ---------------------------------------------------------------------------------

async def test_two_workers_share_one_port_with_reuse_port(router, registry_path, hook):
    plain, dtls = free_udp_port(), free_udp_port()
    s = coap_settings(registry_path, port=plain, dtls_port=dtls, reuse_port=True)
    async with CoapIngest(router, s) as w1, CoapIngest(router, s) as w2:
        assert (w1.port, w1.dtls_port) == (w2.port, w2.dtls_port) == (plain, dtls)
        clients = [await aiocoap.Context.create_client_context() for _ in range(8)]
        try:
            frames = [make_png(8_000, seed=i) for i in range(len(clients))]
            responses = await asyncio.gather(*[post_frame(c, plain, f, device=f"dev{i}")
                                               for i, (c, f) in enumerate(zip(clients, frames, strict=True))])
            for i, (r, f) in enumerate(zip(responses, frames, strict=True)):
                await expect_delivered(hook, r, f, device=f"dev{i}")
            assert w1.stats["accepted"] + w2.stats["accepted"] == len(clients)
        finally:
            for c in clients:
                await c.shutdown()
        if LIBCOAP:
            rc, out, err = await libcoap("-m", "post", "-e", "via-workers", "-t", "0", "-u", "cam-01@demo",
                                         "-k", KEY_01, f"coaps://127.0.0.1:{dtls}/.s/images")
            assert rc == 0, err
            got = await wait_for(lambda: delivered(hook, out.decode().strip()), what="delivery")
            assert got.body == b"via-workers"
