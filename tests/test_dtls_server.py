"""The router's DTLS 1.2 server with real clients on loopback: OpenSSL's ``s_client``, libcoap's
OpenSSL and GnuTLS clients, and the simulator's pyOpenSSL transport. Every handshake is
followed by a CoAP POST whose bytes must reach the webhook destination unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import time
import warnings
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code
from dtls_env import HTTPRecorder, delivered, dtls_router, seeded, wait_for

from device_sim.dtls_transport import dtls_client_context
from pipelines.devices import MAX_PSK_IDENTITY, MAX_PSK_KEY, DeviceRegistry, DeviceRegistryError

PSK_SUITES = ["PSK-AES128-GCM-SHA256", "PSK-AES128-CCM", "PSK-AES128-CCM8", "PSK-AES128-CBC-SHA256"]
LONG_DEVICE = "d" * 128
LONG_PROJECT = "p" * (MAX_PSK_IDENTITY - 129)        # identity of exactly MAX_PSK_IDENTITY bytes


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: ./dev installs it"
    return path


def keys(seed: int) -> dict[str, bytes]:
    rng = seeded(seed)
    return {"k32": rng.randbytes(16).hex().encode(),        # 32 characters, like `devices add`
            "k64text": rng.randbytes(32).hex().encode(),    # 64 characters
            "k64bin": rng.randbytes(64)}                     # 64 binary bytes


def registry_text(k: dict[str, bytes]) -> str:
    return f"""\
project_id: demo
devices:
  - id: cam-32
    psk: "{k['k32'].decode()}"
  - id: cam-64
    psk: "{k['k64text'].decode()}"
  - id: cam-bin
    psk: "0x{k['k64bin'].hex()}"
  - id: {LONG_DEVICE}
    project_id: {LONG_PROJECT}
    psk: "0x{k['k64bin'].hex()}"
"""


@pytest.fixture
def hook():
    with HTTPRecorder() as server:
        yield server


@pytest.fixture
def k():
    return keys(11)


@pytest.fixture
async def srv(tmp_path, hook, k):
    async with dtls_router(tmp_path, hook, registry_text(k)) as server:
        yield server


def coap_post(path: str, payload: bytes, mid: int = 7) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        m = aiocoap.Message(mtype=aiocoap.CON, mid=mid, token=b"\x01\x02\x03\x04", code=Code.POST,
                            payload=payload, content_format=42)
    m.opt.uri_path = [".s", *path.split("/")]
    return m.encode()


async def s_client(port: int, cipher: str, identity: str, key: bytes, datagram: bytes) -> aiocoap.Message:
    """One CoAP datagram through ``openssl s_client -dtls1_2`` restricted to ``cipher``."""
    proc = await asyncio.create_subprocess_exec(
        tool("openssl"), "s_client", "-dtls1_2", "-cipher", f"{cipher}:@SECLEVEL=0", "-psk", key.hex(),
        "-psk_identity", identity, "-connect", f"127.0.0.1:{port}", "-quiet",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        proc.stdin.write(datagram)
        await proc.stdin.drain()
        answer = await asyncio.wait_for(proc.stdout.read(65536), 15)
    finally:
        with contextlib.suppress(ProcessLookupError):   # it may have exited by itself
            proc.kill()
        await proc.wait()
    assert answer, f"s_client got no answer: {(await proc.stderr.read()).decode(errors='replace')}"
    return aiocoap.Message.decode(answer)


@pytest.mark.parametrize("cipher", PSK_SUITES)
async def test_each_psk_suite_with_openssl_s_client(srv, hook, k, cipher):
    payload = os.urandom(700)
    answer = await s_client(srv.dtls_port, cipher, "cam-bin@demo", k["k64bin"], coap_post("images", payload))
    assert answer.code == Code.CHANGED, answer
    got = await delivered(hook, answer.payload.decode())
    assert got.body == payload and got.headers["Ce-Source"] == "cam-bin"


@pytest.mark.parametrize("cipher", PSK_SUITES)
async def test_each_psk_suite_with_the_simulator_client_block1(srv, hook, k, cipher):
    payload = seeded(hash(cipher) & 0xFFFF).randbytes(40_000)
    ctx = await dtls_client_context(b"cam-64@demo", k["k64text"], ciphers=cipher)
    try:
        msg = aiocoap.Message(code=Code.POST, uri=f"coaps://127.0.0.1:{srv.dtls_port}/.s/images",
                              payload=payload, content_format=42)
        answer = await asyncio.wait_for(ctx.request(msg).response, 20)
    finally:
        await ctx.shutdown()
    assert answer.code == Code.CHANGED, answer
    got = await delivered(hook, answer.payload.decode())
    assert got.body == payload and got.headers["Ce-Source"] == "cam-64"


MBEDTLS_SUITES = ["TLS-PSK-WITH-AES-128-GCM-SHA256", "TLS-PSK-WITH-AES-128-CCM", "TLS-PSK-WITH-AES-128-CCM-8",
                  "TLS-PSK-WITH-AES-128-CBC-SHA256"]


def mbedtls_exchange(port: int, identity: str, key: bytes, cipher: str, datagram: bytes) -> tuple[str, bytes]:
    """One CoAP datagram through an Mbed TLS 2.28 DTLS client (python-mbedtls), blocking."""
    from mbedtls import tls

    conf = tls.DTLSConfiguration(pre_shared_key=(identity, key), ciphers=[cipher], validate_certificates=False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        client = tls.ClientContext(conf).wrap_socket(sock, server_hostname=None)
        client.do_handshake()
        client.send(datagram)
        return client.cipher(), client.recv(65536)


@pytest.mark.parametrize("cipher", MBEDTLS_SUITES)
async def test_mbedtls_client_as_zephyr_runs_it(srv, hook, k, cipher):
    # Zephyr's Golioth SDK offers TLS_PSK_WITH_AES_128_GCM_SHA256 from Mbed TLS; its build keeps
    # keys to 32 bytes (MBEDTLS_PSK_MAX_LEN), as `pipeline devices add` generates.
    payload = os.urandom(600)
    negotiated, answer = await asyncio.to_thread(mbedtls_exchange, srv.dtls_port, "cam-32@demo", k["k32"],
                                                 cipher, coap_post("images", payload))
    assert negotiated == cipher
    response = aiocoap.Message.decode(answer)
    assert response.code == Code.CHANGED, response
    got = await delivered(hook, response.payload.decode())
    assert got.body == payload and got.headers["Ce-Source"] == "cam-32"


async def libcoap(binary: str, *args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(tool(binary), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out, err


@pytest.mark.parametrize("binary", ["coap-client-openssl", "coap-client-gnutls"])
@pytest.mark.parametrize("device", ["cam-32", "cam-64"])
async def test_libcoap_clients_with_generated_keys(srv, hook, k, tmp_path, binary, device):
    key = k["k32"] if device == "cam-32" else k["k64text"]
    payload = seeded(len(device)).randbytes(20_000)
    f = tmp_path / "frame.bin"
    f.write_bytes(payload)
    rc, out, err = await libcoap(binary, "-m", "post", "-b", "1024", "-f", str(f), "-t", "42",
                                 "-u", f"{device}@demo", "-k", key.decode(),
                                 f"coaps://127.0.0.1:{srv.dtls_port}/.s/images")
    assert rc == 0 and out.strip(), err
    got = await delivered(hook, out.decode().strip())
    assert got.body == payload and got.headers["Ce-Source"] == device


async def test_longest_identity_with_a_64_byte_binary_key(srv, hook, k):
    identity = f"{LONG_DEVICE}@{LONG_PROJECT}".encode()
    assert len(identity) == MAX_PSK_IDENTITY and len(k["k64bin"]) == MAX_PSK_KEY
    ctx = await dtls_client_context(identity, k["k64bin"])
    try:
        msg = aiocoap.Message(code=Code.POST, uri=f"coaps://127.0.0.1:{srv.dtls_port}/.s/images",
                              payload=b"longest")
        answer = await asyncio.wait_for(ctx.request(msg).response, 20)
    finally:
        await ctx.shutdown()
    got = await delivered(hook, answer.payload.decode())
    assert got.body == b"longest" and got.headers["Ce-Source"] == LONG_DEVICE


def test_registry_refuses_a_65_byte_key_and_a_too_long_identity(tmp_path):
    path = tmp_path / "devices.yaml"
    path.write_text(f'project_id: demo\ndevices:\n  - id: ok\n    psk: "{"a" * 64}"\n'
                    f'  - id: cam-fat\n    psk: "0x{"ab" * 65}"\n')
    with pytest.raises(DeviceRegistryError, match=r"devices.yaml:5: device cam-fat: psk \(inline\) is 65 bytes; "
                                                  r"DTLS allows at most 64") as caught:
        DeviceRegistry.load(path)
    assert "ab" * 65 not in str(caught.value)
    path.write_text(f"project_id: demo\ndevices:\n  - id: {'d' * 128}\n    project_id: {'p' * 128}\n"
                    f"    psk: k\n")
    with pytest.raises(DeviceRegistryError, match=r"devices.yaml:3: device d+: identity .* is 257 bytes; "
                                                  r"DTLS allows at most 256"):
        DeviceRegistry.load(path)


async def _post(ctx: aiocoap.Context, port: int, payload: bytes, timeout: float = 10) -> aiocoap.Message:
    msg = aiocoap.Message(code=Code.POST, uri=f"coaps://127.0.0.1:{port}/.s/images", payload=payload)
    return await asyncio.wait_for(ctx.request(msg).response, timeout)


def rewrite_registry(srv, text: str) -> None:
    path = Path(srv.settings.registry_path)
    path.write_text(text)
    stamp = time.time() + 5  # a new mtime even within the file system's timestamp granularity
    os.utime(path, (stamp, stamp))


async def test_removed_or_rekeyed_device_loses_its_live_session(srv, hook, k):
    port = srv.dtls_port
    removed = await dtls_client_context(b"cam-32@demo", k["k32"])
    rekeyed = await dtls_client_context(b"cam-64@demo", k["k64text"])
    try:
        for ctx in (removed, rekeyed):
            assert (await _post(ctx, port, b"before")).code == Code.CHANGED
        assert srv.dtls.session_count == 2
        new_key = secrets.token_hex(16)
        text = registry_text(k).replace(f'  - id: cam-32\n    psk: "{k["k32"].decode()}"\n', "")
        rewrite_registry(srv, text.replace(k["k64text"].decode(), new_key))
        await wait_for(lambda: srv.dtls.stats["sessions_revoked"] == 2, 10, "both sessions revoked")
        assert srv.dtls.session_count == 0
        # A new handshake fails: an unknown identity gets an alert; a wrong key's Finished does not
        # decrypt and DTLS drops it silently (RFC 6347 §4.1.2.7), so that client times out.
        for ctx in (removed, rekeyed):
            with pytest.raises((aiocoap.error.NetworkError, TimeoutError)):
                await _post(ctx, port, b"after", timeout=4)
    finally:
        await removed.shutdown()
        await rekeyed.shutdown()
    # the re-keyed device's new key works at once
    ctx = await dtls_client_context(b"cam-64@demo", new_key.encode())
    try:
        answer = await _post(ctx, port, b"new key")
    finally:
        await ctx.shutdown()
    got = await delivered(hook, answer.payload.decode())
    assert got.body == b"new key"
    assert not any(r.body == b"after" for r in hook.requests)


async def test_shutdown_sends_close_notify_and_the_client_sees_it(tmp_path, hook, k):
    async with dtls_router(tmp_path, hook, registry_text(k)) as server:
        ctx = await dtls_client_context(b"cam-32@demo", k["k32"])
        assert (await _post(ctx, server.dtls_port, b"x")).code == Code.CHANGED
        link = next(iter(ctx.request_interfaces[0].token_interface.message_interface._links.values()))
    await wait_for(lambda: link._conn is None, 5, "the client to get close_notify")
    await ctx.shutdown()


def test_cookies_bind_address_and_hello_and_expire(monkeypatch):
    from pipelines.ingest import dtls_records as rec

    hello = rec.ClientHello(b"\0" * 6, b"\xfe\xfd", b"r" * 32, b"", b"")
    jar = rec.CookieJar(window=30)
    now = [1_000_000.0]
    monkeypatch.setattr(rec.time, "time", lambda: now[0])
    cookie = jar.make(("10.0.0.1", 5000), hello)
    echoed = rec.ClientHello(hello.record_seq, hello.version, hello.random, hello.session_id, cookie)
    assert jar.valid(("10.0.0.1", 5000), echoed)
    assert not jar.valid(("10.0.0.1", 5001), echoed)                      # another port
    assert not jar.valid(("10.0.0.2", 5000), echoed)                      # another address
    other = rec.ClientHello(hello.record_seq, hello.version, b"s" * 32, b"", cookie)
    assert not jar.valid(("10.0.0.1", 5000), other)                       # another ClientHello
    now[0] += 30
    assert jar.valid(("10.0.0.1", 5000), echoed)                          # the previous window
    now[0] += 30
    assert not jar.valid(("10.0.0.1", 5000), echoed)                      # expired
    assert not rec.CookieJar().valid(("10.0.0.1", 5000), echoed)         # another process's secret


def test_records_split_and_pack_within_the_mtu():
    from pipelines.ingest import dtls_records as rec

    def record(n: int) -> bytes:
        return b"\x17\xfe\xfd" + b"\0" * 8 + n.to_bytes(2, "big") + b"x" * n

    records = [record(n) for n in (100, 500, 700, 1300, 10)]
    data = b"".join(records)
    assert rec.split_records(data) == records
    assert rec.split_records(data + b"\x17\xfe\xfd\0") == records          # a cut-off tail is dropped
    datagrams = rec.pack_datagrams(records, 1232)
    assert b"".join(datagrams) == data
    assert [len(d) for d in datagrams] == [113 + 513, 713, 1313, 23]       # the big record goes alone
    assert rec.parse_client_hello(records[0]) is None
