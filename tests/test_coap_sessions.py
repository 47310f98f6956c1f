"""CoAP sessions the way Golioth devices expect them (issue 11), with real clients on loopback.

* the Zephyr SDK's keep-alive, a NON Empty message, gets a datagram back (an RST with its
  Message ID), over plain CoAP and inside a DTLS session (``openssl s_client``);
* the Linux SDK's keep-alive, a path-less CON DELETE, gets 4.04 and never spends rate tokens;
* ``POST /.s/`` is a stream message at path ``/`` that a ``path: /`` filter routes;
* an Observe registration gets one answer, then only real changes;
* ``--rate-limit`` / ``--rate-burst`` reach the ingest, and ``/metrics`` counts 4.29s per device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import warnings
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code

from pipelines.commands import serve as serve_cmd
from pipelines.ingest.coap import CoapIngest, CoapSettings
from pipelines.ingest.rate_limit import DEFAULT_BURST, DEFAULT_RATE
from pipelines.metrics import RouterMetrics
from pipelines.router import Router, RouterSettings

KEY = "keepalive-key-16"  # 16 bytes: any DTLS stack the router has had takes it
REGISTRY = f"""\
project_id: demo
devices:
  - id: zephyr-1
    psk: "{KEY}"
"""
PIPELINES = """\
pipelines:
  root-stream:
    filter: {path: /, content_type: application/json}
    steps:
      - name: keep
        destination: {type: lightdb-stream, version: v1}
"""


@pytest.fixture
async def router(tmp_path: Path):
    (tmp_path / "p.yaml").write_text(PIPELINES)
    async with Router(RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=tmp_path / "s.db")) as r:
        yield r


def settings(tmp_path: Path, **kw) -> CoapSettings:
    (tmp_path / "devices.yaml").write_text(REGISTRY)
    base = dict(host="127.0.0.1", port=0, dtls_port=0, plain_enabled=True,
                registry_path=tmp_path / "devices.yaml")
    base.update(kw)
    return CoapSettings(**base)


@pytest.fixture
async def client():
    ctx = await aiocoap.Context.create_client_context()
    yield ctx
    await ctx.shutdown()


class Raw:
    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(5)
        self.addr = ("127.0.0.1", port)

    async def exchange(self, data: bytes) -> aiocoap.Message:
        self.sock.sendto(data, self.addr)  # the server runs in this event loop: wait in a thread
        return aiocoap.Message.decode(await asyncio.to_thread(self.sock.recv, 65536))

    def close(self) -> None:
        self.sock.close()


def raw(mtype, code, mid: int, token: bytes = b"", path: tuple[str, ...] = (), query: tuple[str, ...] = ()) -> bytes:
    with warnings.catch_warnings():  # setting MID and type by hand is what we want here
        warnings.simplefilter("ignore", DeprecationWarning)
        m = aiocoap.Message(mtype=mtype, mid=mid, token=token, code=code)
    m.opt.uri_path = path
    m.opt.uri_query = query
    return m.encode()


# -- keep-alives -----------------------------------------------------------------------------

async def test_non_empty_keepalive_gets_an_rst_with_its_message_id(router, tmp_path):
    seed = random.randrange(1 << 16)
    print("seed", seed)
    rng = random.Random(seed)
    async with CoapIngest(router, settings(tmp_path, dtls_enabled=False)) as srv:
        sock = Raw(srv.port)
        try:
            for _ in range(3):  # every keep-alive is answered, not only the first
                mid = rng.randrange(1 << 16)
                answer = await sock.exchange(bytes([0x50, 0x00, mid >> 8, mid & 0xFF]))  # the Zephyr SDK's bytes
                assert (answer.mtype, answer.code, answer.mid, answer.token) == (aiocoap.RST, Code.EMPTY, mid, b"")
        finally:
            sock.close()
        assert srv.stats["keepalives"] == 3


async def test_pathless_keepalive_gets_4_04_and_spends_no_rate_tokens(router, tmp_path, client):
    s = settings(tmp_path, dtls_enabled=False, rate_limit=0.001, rate_burst=1)
    async with CoapIngest(router, s) as srv:
        sock = Raw(srv.port)
        try:
            for mid in range(10):  # the Linux SDK's keep-alive: CON DELETE, a token, no path
                answer = await sock.exchange(raw(aiocoap.CON, Code.DELETE, 100 + mid, token=b"\x01\x02\x03\x04",
                                           query=("d=zephyr-1",)))
                assert answer.code == Code.NOT_FOUND and answer.mid == 100 + mid
        finally:
            sock.close()
        assert srv.stats["keepalives"] == 10
        # the one token of the bucket is still there for real work
        r = await client.request(aiocoap.Message(code=Code.POST, payload=b'{"a": 1}', content_format=50,
                                                 uri=f"coap://127.0.0.1:{srv.port}/.s/x?d=zephyr-1")).response
        assert r.code == Code.CHANGED, r.payload


OPENSSL = shutil.which("openssl")


async def test_non_empty_keepalive_inside_a_dtls_session_gets_a_datagram(router, tmp_path):
    assert OPENSSL, "openssl (the command-line tool) is needed: apt-get install openssl"
    async with CoapIngest(router, settings(tmp_path, plain_enabled=False)) as srv:
        proc = await asyncio.create_subprocess_exec(
            OPENSSL, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{srv.dtls_port}", "-quiet",
            "-psk_identity", "zephyr-1@demo", "-psk", KEY.encode().hex(),
            "-cipher", "PSK-AES128-GCM-SHA256:PSK-AES128-CCM8:PSK-AES128-CCM",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            # one write = one DTLS record = one CoAP message: the Zephyr SDK's NON Empty keep-alive
            proc.stdin.write(bytes([0x50, 0x00, 0xBE, 0xEF]))
            await proc.stdin.drain()
            answer = await asyncio.wait_for(proc.stdout.readexactly(4), 20)
        finally:
            proc.kill()
            _, err = await proc.communicate()
        assert answer == bytes([0x70, 0x00, 0xBE, 0xEF]), (answer, err[-500:])  # RST, same Message ID
        assert srv.stats["keepalives"] == 1


# -- stream to the root path -------------------------------------------------------------------

async def test_stream_to_the_root_path_is_routed_by_a_root_filter(router, tmp_path, client):
    async with CoapIngest(router, settings(tmp_path, dtls_enabled=False, rate_limit=0)) as srv:
        for uri in ("/.s/", "/.s"):  # golioth_stream_set(client, "/", ...) and without the slash
            r = await client.request(aiocoap.Message(
                code=Code.POST, payload=json.dumps({"uri": uri}).encode(), content_format=50,
                uri=f"coap://127.0.0.1:{srv.port}{uri}?d=zephyr-1")).response
            assert r.code == Code.CHANGED, r.payload
        for _ in range(200):
            rows = await router.store.query_stream(device_id="zephyr-1")
            if len(rows) == 2:
                break
            await asyncio.sleep(0.05)
        assert sorted((r["path"], r["data"]["uri"]) for r in rows) == [("/", "/.s"), ("/", "/.s/")]


# -- Observe ---------------------------------------------------------------------------------

async def test_observe_registration_gets_one_answer_then_only_changes(router, tmp_path, client):
    async with CoapIngest(router, settings(tmp_path, dtls_enabled=False, rate_limit=0)) as srv:
        await router.set_state("demo", "zephyr-1", "/desired/my_config", 1)
        obs = client.request(aiocoap.Message(code=Code.GET, observe=0,
                                             uri=f"coap://127.0.0.1:{srv.port}/.d/desired/my_config?d=zephyr-1"))
        first = await obs.response
        assert first.code == Code.CONTENT and json.loads(first.payload) == 1
        notes = obs.observation.__aiter__()
        # a write elsewhere in the document wakes the observer; it is not news for this path
        await router.set_state("demo", "zephyr-1", "/counter", 7)
        await asyncio.sleep(0.5)  # time for the observer to re-read (and, before the fix, re-send)
        await router.set_state("demo", "zephyr-1", "/desired/my_config", 2)
        # the next notification is the change, not a second copy of the first answer
        note = await asyncio.wait_for(notes.__anext__(), 10)
        assert json.loads(note.payload) == 2
        obs.observation.cancel()


# -- limits ----------------------------------------------------------------------------------

async def test_metrics_count_rate_limited_requests_per_device(router, tmp_path, client):
    s = settings(tmp_path, dtls_enabled=False, rate_limit=0.001, rate_burst=2)
    async with CoapIngest(router, s) as srv:
        codes = []
        for device in ("zephyr-1",) * 5 + ("other-1",) * 3:
            r = await client.request(aiocoap.Message(code=Code.POST, payload=b"{}", content_format=50,
                                                     uri=f"coap://127.0.0.1:{srv.port}/.s/x?d={device}")).response
            codes.append(r.code)
        assert codes.count(Code.TOO_MANY_REQUESTS) == 3 + 1
        text = (await RouterMetrics(router).render())[0].decode()
    assert 'pipeline_coap_rate_limited_total{device="zephyr-1",project="demo"} 3.0' in text
    assert 'pipeline_coap_rate_limited_total{device="other-1",project="demo"} 1.0' in text
    assert 'pipeline_coap_rate_limit{setting="burst"} 2.0' in text
    # once the ingest stops, its series go with it
    assert "pipeline_coap_rate_limited_total{" not in (await RouterMetrics(router).render())[0].decode()


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    serve_cmd.add_parser(sub)
    return parser.parse_args(["serve", *argv])


def test_serve_rate_flags_reach_the_ingest_and_its_workers():
    args = _serve_args("--coap-port", "0", "--rate-limit", "50", "--rate-burst", "500")
    coap = serve_cmd.settings_from(args).coap
    assert (coap.rate_limit, coap.rate_burst) == (50.0, 500.0)
    worker = serve_cmd._worker_command(args, None, 5683)
    assert worker[worker.index("--rate-limit") + 1] == "50.0" and worker[worker.index("--rate-burst") + 1] == "500.0"
    defaults = serve_cmd.settings_from(_serve_args("--coap-port", "0")).coap
    assert (defaults.rate_limit, defaults.rate_burst) == (DEFAULT_RATE, DEFAULT_BURST)
    assert serve_cmd.settings_from(_serve_args("--coap-port", "0", "--rate-limit", "0")).coap.rate_limit == 0


@pytest.mark.parametrize("flag,value", [("--rate-limit", "-1"), ("--rate-limit", "fast"), ("--rate-limit", "inf"),
                                        ("--rate-burst", "0"), ("--rate-burst", "nan"), ("--rate-burst", "")])
def test_bad_rate_flags_are_refused_with_a_clear_error(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        _serve_args("--coap-port", "0", flag, value)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and ("not a rate" in err or "not a burst size" in err), err


def test_run_takes_the_same_rate_flags():
    from pipelines.commands import run as run_cmd

    parser = argparse.ArgumentParser()
    run_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["run", "--rate-limit", "5", "--rate-burst", "50"])
    assert (args.rate_limit, args.rate_burst) == (5.0, 50.0)
    args = parser.parse_args(["run"])
    assert (args.rate_limit, args.rate_burst) == (DEFAULT_RATE, DEFAULT_BURST)
