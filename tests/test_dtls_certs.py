"""Certificate devices: ``pipeline certs init-ca`` / ``pipeline devices add-cert`` make the PKI,
and the router's DTLS server authenticates devices by their certificate (CN = device, O =
project) with OpenSSL's ``s_client``, libcoap's OpenSSL and GnuTLS clients and the simulator's
client; unknown devices and foreign CAs are refused while PSK devices keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code
from cryptography import x509
from cryptography.x509.oid import NameOID
from dtls_env import HTTPRecorder, delivered, dtls_router, seeded, wait_for
from test_dtls_server import coap_post, libcoap, tool

from device_sim.dtls_transport import dtls_client_context
from pipelines.certs import init_ca, issue_device_cert
from pipelines.devices import DeviceRegistry
from pipelines.ingest.dtls_server import DtlsOptions

CERT_SUITES = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-CCM", "ECDHE-ECDSA-AES128-CCM8"]
REGISTRY = """\
project_id: demo
devices:
  - id: cam-c
  - id: cam-psk
    psk: "psk-device-key"
"""


ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def hook():
    with HTTPRecorder() as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    init_ca("demo", root / "ca")
    issue_device_cert("cam-c", "demo", root / "ca", root / "devices")
    issue_device_cert("stranger", "demo", root / "ca", root / "devices")        # not in the registry
    init_ca("demo", root / "other-ca")
    issue_device_cert("cam-c", "demo", root / "other-ca", root / "foreign")     # right name, wrong CA
    return root


def options(pki: Path) -> DtlsOptions:
    ca = pki / "ca"
    return DtlsOptions(cert=str(ca / "server.pem"), key=str(ca / "server.key"), ca=[str(ca / "ca.pem")],
                       handshake_timeout=3)


@pytest.fixture
async def srv(tmp_path, hook, pki):
    async with dtls_router(tmp_path, hook, REGISTRY, dtls=options(pki)) as server:
        yield server


def test_cli_makes_the_ca_and_device_certificates(tmp_path):
    r = cli("certs", "init-ca", "--project", "demo", "--out", "pki", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--dtls-cert pki/server.pem --dtls-key pki/server.key --dtls-ca pki/ca.pem" in r.stdout
    r = cli("devices", "add-cert", "cam-09", "--project", "demo", "--ca-dir", "pki", "--out", "pki/devices",
            "--registry", "devices.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for key in ("pki/ca.key", "pki/server.key", "pki/devices/cam-09.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600, key
        assert "PRIVATE KEY" not in r.stdout
    ca = x509.load_pem_x509_certificate((tmp_path / "pki/ca.pem").read_bytes())
    dev = x509.load_pem_x509_certificate((tmp_path / "pki/devices/cam-09.pem").read_bytes())
    dev.verify_directly_issued_by(ca)
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-09"
    assert dev.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "demo"
    entry = DeviceRegistry.load(tmp_path / "devices.yaml").lookup("demo", "cam-09")
    assert entry is not None and entry.psk is None
    listing = cli("devices", "list", "--registry", "devices.yaml", cwd=tmp_path)
    assert "cam-09@demo  key: none (certificate)" in listing.stdout
    again = cli("certs", "init-ca", "--project", "demo", "--out", "pki", cwd=tmp_path)
    assert again.returncode == 1 and "exists already: not overwriting it" in again.stderr
    wrong = cli("devices", "add-cert", "cam-10", "--project", "other", "--ca-dir", "pki", "--out", "x",
                cwd=tmp_path)
    assert wrong.returncode == 1 and "project 'demo''s, not 'other''s" in wrong.stderr
    missing = cli("devices", "add-cert", "cam-10", "--project", "demo", "--ca-dir", "nowhere", "--out", "x",
                  cwd=tmp_path)
    assert missing.returncode == 1 and "no project CA in nowhere" in missing.stderr


async def s_client_cert(port: int, cipher: str, cert: Path, key: Path, ca: Path, datagram: bytes) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        tool("openssl"), "s_client", "-dtls1_2", "-cipher", f"{cipher}:@SECLEVEL=0", "-cert", str(cert),
        "-key", str(key), "-CAfile", str(ca), "-verify_return_error", "-connect", f"127.0.0.1:{port}", "-quiet",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        proc.stdin.write(datagram)
        await proc.stdin.drain()
        return await asyncio.wait_for(proc.stdout.read(65536), 10)
    except TimeoutError:
        return b""
    finally:
        with contextlib.suppress(ProcessLookupError):   # it may have exited by itself
            proc.kill()
        await proc.wait()


@pytest.mark.parametrize("cipher", CERT_SUITES)
async def test_each_certificate_suite_with_openssl_s_client(srv, hook, pki, cipher):
    payload = seeded(len(cipher)).randbytes(900)
    answer = await s_client_cert(srv.dtls_port, cipher, pki / "devices/cam-c.pem", pki / "devices/cam-c.key",
                                 pki / "ca/ca.pem", coap_post("images", payload))
    response = aiocoap.Message.decode(answer)
    assert response.code == Code.CHANGED, response
    got = await delivered(hook, response.payload.decode())
    assert got.body == payload and got.headers["Ce-Source"] == "cam-c" and got.headers["Ce-Subject"] == "demo"


@pytest.mark.parametrize("cipher", CERT_SUITES)
async def test_each_certificate_suite_with_the_simulator_client_block1(srv, hook, pki, cipher):
    payload = seeded(len(cipher) + 1).randbytes(30_000)
    ctx = await dtls_client_context(ciphers=cipher, cert=str(pki / "devices/cam-c.pem"),
                                    key_file=str(pki / "devices/cam-c.key"), ca=str(pki / "ca/ca.pem"))
    try:
        msg = aiocoap.Message(code=Code.POST, uri=f"coaps://127.0.0.1:{srv.dtls_port}/.s/images", payload=payload)
        response = await asyncio.wait_for(ctx.request(msg).response, 20)
    finally:
        await ctx.shutdown()
    got = await delivered(hook, response.payload.decode())
    assert got.body == payload and got.headers["Ce-Source"] == "cam-c"


@pytest.mark.parametrize("binary", ["coap-client-openssl", "coap-client-gnutls"])
async def test_libcoap_pki_clients(srv, hook, pki, tmp_path, binary):
    payload = seeded(len(binary)).randbytes(20_000)
    f = tmp_path / "frame.bin"
    f.write_bytes(payload)
    rc, out, err = await libcoap(binary, "-m", "post", "-b", "1024", "-f", str(f), "-t", "42",
                                 "-c", str(pki / "devices/cam-c.pem"), "-j", str(pki / "devices/cam-c.key"),
                                 "-C", str(pki / "ca/ca.pem"), f"coaps://127.0.0.1:{srv.dtls_port}/.s/images")
    assert rc == 0 and out.strip(), err
    got = await delivered(hook, out.decode().strip())
    assert got.body == payload and got.headers["Ce-Source"] == "cam-c"


async def test_unknown_device_and_foreign_ca_are_refused_psk_still_works(srv, hook, pki):
    for cert in ("devices/stranger", "foreign/cam-c"):
        answer = await s_client_cert(srv.dtls_port, CERT_SUITES[0], pki / f"{cert}.pem", pki / f"{cert}.key",
                                     pki / "ca/ca.pem", coap_post("images", b"sneaky"))
        assert answer == b"", cert
    assert srv.dtls.session_count == 0 and srv.dtls.stats["handshakes_failed"] >= 2
    ctx = await dtls_client_context(b"cam-psk@demo", b"psk-device-key")
    try:
        msg = aiocoap.Message(code=Code.POST, uri=f"coaps://127.0.0.1:{srv.dtls_port}/.s/images", payload=b"psk")
        response = await asyncio.wait_for(ctx.request(msg).response, 10)
    finally:
        await ctx.shutdown()
    got = await delivered(hook, response.payload.decode())
    assert got.body == b"psk" and got.headers["Ce-Source"] == "cam-psk"
    assert not any(r.body == b"sneaky" for r in hook.requests)


def test_serve_flags_need_all_three_and_readable_files(tmp_path, pki):
    from pipelines.commands import serve

    parser = __import__("argparse").ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    ca = pki / "ca"
    args = parser.parse_args(["serve", "--coap-dtls-port", "0", "--registry", "r.yaml", "--dtls-cert",
                              str(ca / "server.pem"), "--dtls-key", str(ca / "server.key"),
                              "--dtls-ca", str(ca / "ca.pem")])
    dtls = serve.settings_from(args).coap.dtls
    assert (dtls.cert, dtls.key, dtls.ca) == (str(ca / "server.pem"), str(ca / "server.key"), [str(ca / "ca.pem")])
    partial = parser.parse_args(["serve", "--coap-dtls-port", "0", "--dtls-cert", str(ca / "server.pem")])
    with pytest.raises(ValueError, match="need all of --dtls-cert, --dtls-key and --dtls-ca"):
        serve.settings_from(partial)


async def test_bad_certificate_files_fail_clearly(tmp_path, hook, pki):
    ca = pki / "ca"
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    cases = [(DtlsOptions(cert=str(bad), key=str(ca / "server.key"), ca=[str(ca / "ca.pem")]),
              "router certificate: .*bad.pem"),
             (DtlsOptions(cert=str(ca / "server.pem"), key=str(pki / "other-ca/server.key"), ca=[str(ca / "ca.pem")]),
              "router key: .*other-ca/server.key"),
             (DtlsOptions(cert=str(ca / "server.pem"), key=str(ca / "server.key"), ca=[str(tmp_path / "none.pem")]),
              "project CA: .*none.pem is not a readable file")]
    for opts, message in cases:
        with pytest.raises(ValueError, match=message):
            async with dtls_router(tmp_path, hook, REGISTRY, dtls=opts):
                pass


def mbedtls_cert_exchange(port: int, pki: Path, cipher: str, datagram: bytes) -> tuple[str, bytes]:
    """An Mbed TLS 2.28 DTLS client with the device certificate, verifying the router's (blocking)."""
    from mbedtls import pk, tls
    from mbedtls import x509 as mx509

    conf = tls.DTLSConfiguration(
        certificate_chain=([mx509.CRT.from_PEM((pki / "devices/cam-c.pem").read_text())],
                           pk.ECC.from_PEM((pki / "devices/cam-c.key").read_text())),
        trust_store=tls.TrustStore([mx509.CRT.from_PEM((pki / "ca/ca.pem").read_text())]),
        ciphers=[cipher], validate_certificates=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        client = tls.ClientContext(conf).wrap_socket(sock, server_hostname="localhost")
        client.do_handshake()
        client.send(datagram)
        return client.cipher(), client.recv(65536)


@pytest.mark.parametrize("cipher", ["TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256", "TLS-ECDHE-ECDSA-WITH-AES-128-CCM",
                                    "TLS-ECDHE-ECDSA-WITH-AES-128-CCM-8"])
async def test_mbedtls_certificate_client(srv, hook, pki, cipher):
    payload = seeded(len(cipher) + 2).randbytes(700)
    negotiated, answer = await asyncio.to_thread(mbedtls_cert_exchange, srv.dtls_port, pki, cipher,
                                                 coap_post("images", payload))
    assert negotiated == cipher
    response = aiocoap.Message.decode(answer)
    assert response.code == Code.CHANGED, response
    got = await delivered(hook, response.payload.decode())
    assert got.body == payload and got.headers["Ce-Source"] == "cam-c"


async def test_a_certificate_device_removed_from_the_registry_loses_its_session(srv, hook, pki):
    ctx = await dtls_client_context(cert=str(pki / "devices/cam-c.pem"), key_file=str(pki / "devices/cam-c.key"),
                                    ca=str(pki / "ca/ca.pem"))
    uri = f"coaps://127.0.0.1:{srv.dtls_port}/.s/images"
    try:
        first = await asyncio.wait_for(
            ctx.request(aiocoap.Message(code=Code.POST, uri=uri, payload=b"in")).response, 10)
        assert first.code == Code.CHANGED
        path = Path(srv.settings.registry_path)
        path.write_text(REGISTRY.replace("  - id: cam-c\n", ""))
        stamp = time.time() + 5
        os.utime(path, (stamp, stamp))
        await wait_for(lambda: srv.dtls.stats["sessions_revoked"] == 1, 10, "the session to be revoked")
        with pytest.raises((aiocoap.error.NetworkError, TimeoutError)):   # and a new handshake is refused
            await asyncio.wait_for(ctx.request(aiocoap.Message(code=Code.POST, uri=uri, payload=b"out")).response, 4)
    finally:
        await ctx.shutdown()
    assert not any(r.body == b"out" for r in hook.requests)
