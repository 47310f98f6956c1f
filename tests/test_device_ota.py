"""OTA (``/.u``) against the real Router and CoAP server, with aiocoap clients on loopback.

The SDK's own Linux port is in ``test_golioth_sdk_services.py``; these are the edge cases a
well-behaved SDK never shows: resumes from new endpoints, blocks past the end, unknown
packages, manifests over one block, several observers, releases made by the CLI in another
process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import Code
from aiocoap.optiontypes import BlockOption
from pipeline_texts import RPC_RESULTS

from pipelines.device_services import ota
from pipelines.ingest.coap import CoapIngest, CoapSettings
from pipelines.router import Router, RouterSettings

REGISTRY = """\
project_id: demo
devices:
  - id: cam-01
    tags: [lobby]
  - id: cam-02
  - id: cam-03
    tags: [lobby, beta]
"""

PIPELINES = RPC_RESULTS

SEED = int(os.environ.get("TEST_SEED", "1204"))
print(f"test_device_ota seed {SEED}")


def firmware(size: int, seed: int = SEED) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "s.db"


@pytest.fixture
async def router(tmp_path: Path, store_path: Path):
    pipelines = tmp_path / "p.yaml"
    pipelines.write_text(PIPELINES)
    async with Router(RouterSettings(pipelines=[pipelines], store_path=store_path)) as r:
        yield r


@pytest.fixture
async def server(router, tmp_path: Path):
    reg = tmp_path / "devices.yaml"
    reg.write_text(REGISTRY)
    settings = CoapSettings(host="127.0.0.1", port=0, dtls_enabled=False, plain_enabled=True,
                            registry_path=reg, rate_limit=0)
    async with CoapIngest(router, settings) as srv:
        yield srv


@pytest.fixture
async def client():
    ctx = await aiocoap.Context.create_client_context()
    yield ctx
    await ctx.shutdown()


def uri(server, path: str, device: str = "cam-01") -> str:
    return f"coap://127.0.0.1:{server.port}{path}?d={device}"


async def get_block(ctx, server, path: str, num: int, szx: int = 6, device: str = "cam-01") -> aiocoap.Message:
    msg = aiocoap.Message(code=Code.GET, uri=uri(server, path, device))
    msg.opt.block2 = BlockOption.BlockwiseTuple(num, False, szx)
    return await ctx.request(msg, handle_blockwise=False).response


def run_cli(*args: str, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "ota", *args, "--store", str(store)],
                          capture_output=True, text=True, timeout=60)


async def test_download_resumes_at_any_block_from_a_new_endpoint(router, server, client):
    data = firmware(50_000)
    art = await ota.upload_artifact(router.store, data, package="main", version="1.2.3")
    await ota.release(router.store, "main", "1.2.3")
    first = await (client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.u/desired"),
                                                  accept=60))).response
    assert first.code == Code.CONTENT and first.opt.content_format == 60
    doc = cbor2.loads(first.payload)
    comp = doc[3][0]
    assert comp == {1: "main", 2: "1.2.3", 3: hashlib.sha256(data).hexdigest(), 4: 50_000,
                    5: "/.u/c/main@1.2.3"}
    assert doc[1] >= 1
    # the first half from one endpoint ...
    blocks = -(-len(data) // 1024)
    got = bytearray()
    for n in range(blocks // 2):
        r = await get_block(client, server, comp[5], n)
        assert r.code == Code.CONTENT and r.opt.block2.block_number == n and r.opt.block2.more
        assert r.opt.size2 == len(data) and r.opt.etag == bytes.fromhex(art.sha256)[:8]
        got += r.payload
    # ... the rest from a brand-new one (a reconnect), starting at block N
    other = await aiocoap.Context.create_client_context()
    try:
        for n in range(blocks // 2, blocks):
            r = await get_block(other, server, comp[5], n)
            assert r.code == Code.CONTENT, r.payload
            assert r.opt.block2.more == (n < blocks - 1)
            got += r.payload
    finally:
        await other.shutdown()
    assert hashlib.sha256(got).hexdigest() == comp[3]


async def test_block_past_the_end_unknown_package_and_version(router, server, client):
    await ota.upload_artifact(router.store, firmware(3000), package="main", version="1.0.0")
    past = await get_block(client, server, "/.u/c/main@1.0.0", 3)  # blocks 0..2
    assert past.code == Code.BAD_OPTION
    assert b"past the end" in past.payload and b"3000 bytes" in past.payload
    last = await get_block(client, server, "/.u/c/main@1.0.0", 2)
    assert last.code == Code.CONTENT and len(last.payload) == 3000 - 2048 and not last.opt.block2.more
    for path in ("/.u/c/nope@1.0.0", "/.u/c/main@9.9.9", "/.u/c/main", "/.u/other"):
        r = await get_block(client, server, path, 0)
        assert r.code == Code.NOT_FOUND, path
        assert r.payload  # a reason


async def test_smaller_blocks_and_a_whole_download_through_aiocoap(router, server, client):
    data = firmware(10_000, SEED + 1)
    await ota.upload_artifact(router.store, data, package="main", version="2.0.0")
    r = await get_block(client, server, "/.u/c/main@2.0.0", 5, szx=2)  # 64-byte blocks
    assert r.code == Code.CONTENT and r.payload == data[320:384] and r.opt.block2.size_exponent == 2
    whole = await client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.u/c/main@2.0.0"))).response
    assert whole.code == Code.CONTENT and whole.payload == data


async def test_manifest_larger_than_one_block(router, server, client):
    packages = [f"pkg{i:02d}" for i in range(12)]
    for i, p in enumerate(packages):
        await ota.upload_artifact(router.store, firmware(100 + i, SEED + i), package=p, version="10.20.30")
        await ota.release(router.store, p, "10.20.30")
    expected = ota.manifest(ota.desired(await ota.releases(router.store), "cam-01", ["lobby"]))
    assert len(expected) > 1024
    first = await get_block(client, server, "/.u/desired", 0)
    assert first.opt.block2.more and first.opt.size2 == len(expected)
    whole = await client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.u/desired"))).response
    doc = cbor2.loads(whole.payload)
    assert [c[1] for c in doc[3]] == packages
    # an observer's notification carries block 0; the rest is fetched (aiocoap does it)
    pr = client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.u/desired"), observe=0))
    assert cbor2.loads((await pr.response).payload) == doc
    pr.observation.cancel()


async def test_cli_release_notifies_two_observers_and_targets(router, server, client, store_path, tmp_path):
    fw = tmp_path / "fw.bin"
    fw.write_bytes(firmware(4096))
    observers = {}
    for dev in ("cam-01", "cam-02"):
        pr = client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.u/desired", dev),
                                            observe=0, accept=60))
        first = await pr.response
        assert cbor2.loads(first.payload) == {1: 0, 2: hashlib.sha256(cbor2.dumps([])).hexdigest(), 3: []}
        observers[dev] = (pr, pr.observation.__aiter__())
    up = run_cli("upload", str(fw), "--package", "main", "--version", "1.2.4", store=store_path)
    assert up.returncode == 0, up.stderr
    assert hashlib.sha256(fw.read_bytes()).hexdigest() in up.stdout
    rel = run_cli("release", "--version", "1.2.4", store=store_path)
    assert rel.returncode == 0, rel.stderr
    for dev, (_, it) in observers.items():
        note = await asyncio.wait_for(it.__anext__(), 10)
        doc = cbor2.loads(note.payload)
        assert doc[3][0][2] == "1.2.4", dev
    # a release for a tag: only cam-01 (tag lobby) hears of it
    fw.write_bytes(firmware(4096, SEED + 7))
    assert run_cli("upload", str(fw), "--version", "1.2.5", store=store_path).returncode == 0
    rel = run_cli("release", "--version", "1.2.5", "--tag", "lobby", store=store_path)
    assert rel.returncode == 0, rel.stderr
    note = await asyncio.wait_for(observers["cam-01"][1].__anext__(), 10)
    assert cbor2.loads(note.payload)[3][0][2] == "1.2.5"
    # cam-02 still gets 1.2.4: asked directly, after the notification above proves the release is seen
    r = await client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.u/desired", "cam-02"))).response
    assert cbor2.loads(r.payload)[3][0][2] == "1.2.4"
    for pr, _ in observers.values():
        pr.observation.cancel()


async def test_rollout_is_deterministic_per_device(router):
    await ota.upload_artifact(router.store, firmware(10), package="main", version="3.0.0")
    await ota.release(router.store, "main", "3.0.0", rollout=30)
    rels = await ota.releases(router.store)
    devices = [f"dev-{i}" for i in range(1000)]
    chosen = {d for d in devices if ota.desired(rels, d, [])}
    assert 220 < len(chosen) < 380  # about 30 %
    await ota.upload_artifact(router.store, firmware(11), package="main", version="3.0.1")
    await ota.release(router.store, "main", "3.0.1", rollout=60)
    rels = await ota.releases(router.store)
    newer = {d for d in devices if any(r.artifact.version == "3.0.1" for r in ota.desired(rels, d, []))}
    assert chosen <= newer  # raising the percentage only adds devices


async def test_reports_are_kept_and_shown(router, server, client, store_path):
    for state, reason in ((1, 0), (2, 0)):
        body = cbor2.dumps({"s": state, "r": reason, "pkg": "main", "v": "1.2.3", "t": "1.2.4"})
        r = await client.request(aiocoap.Message(code=Code.POST, uri=uri(server, "/.u/c/main"),
                                                 payload=body, content_format=60)).response
        assert r.code == Code.CHANGED
    bad = [cbor2.dumps(["s", 1]), cbor2.dumps({"s": "one", "r": 0}), b"\xff\x00",
           cbor2.dumps({"s": 1, "r": 0, "pkg": "other"})]
    for body in bad:
        r = await client.request(aiocoap.Message(code=Code.POST, uri=uri(server, "/.u/c/main"),
                                                 payload=body, content_format=60)).response
        assert r.code == Code.BAD_REQUEST and r.payload, body
    status = run_cli("status", "--json", store=store_path)
    assert status.returncode == 0, status.stderr
    assert '"state": "DOWNLOADED"' in status.stdout and '"target": "1.2.4"' in status.stdout
    history = run_cli("status", "--device", "cam-01", "--history", store=store_path)
    assert history.stdout.count("cam-01") == 2


async def test_releases_and_reports_survive_a_restart(tmp_path, store_path):
    pipelines = tmp_path / "p.yaml"
    pipelines.write_text(PIPELINES)
    settings = RouterSettings(pipelines=[pipelines], store_path=store_path)
    async with Router(settings) as r:
        await ota.upload_artifact(r.store, firmware(2000), package="main", version="1.0.1")
        await ota.release(r.store, "main", "1.0.1", devices=["cam-02"])
        await ota.add_report(r.store, "demo", "cam-02", "main", 1, 0, "1.0.0", "1.0.1")
    async with Router(settings) as r:
        rels = await ota.releases(r.store)
        assert [(x.artifact.version, x.devices) for x in rels] == [("1.0.1", ("cam-02",))]
        assert await ota.read_artifact(r.store, rels[0].artifact.id) == firmware(2000)
        assert (await ota.device_status(r.store))[0]["state"] == "DOWNLOADING"


async def test_upload_refuses_bad_input(router):
    with pytest.raises(ota.OtaError, match="1-16 letters"):
        await ota.upload_artifact(router.store, b"x", package="a/b", version="1")
    with pytest.raises(ota.OtaError, match="empty"):
        await ota.upload_artifact(router.store, b"", package="main", version="1")
    await ota.upload_artifact(router.store, b"abc", package="main", version="1")
    await ota.upload_artifact(router.store, b"abc", package="main", version="1")  # same bytes: fine
    with pytest.raises(ota.OtaError, match="new version"):
        await ota.upload_artifact(router.store, b"abd", package="main", version="1")
    with pytest.raises(ota.OtaError, match="rollout"):
        await ota.release(router.store, "main", "1", rollout=0)


async def test_sixteen_mib_artifact(router, server, client):
    data = firmware(16 << 20, SEED + 3)
    await ota.upload_artifact(router.store, data, package="big", version="1.0.0")
    n = (16 << 20) // 1024
    for num in (0, n // 2, n - 1):
        r = await get_block(client, server, "/.u/c/big@1.0.0", num)
        assert r.code == Code.CONTENT and r.payload == data[num * 1024:(num + 1) * 1024]
    assert (await get_block(client, server, "/.u/c/big@1.0.0", n)).code == Code.BAD_OPTION


async def test_old_reports_are_pruned_per_device_and_package(router, monkeypatch):
    monkeypatch.setattr(ota, "KEEP_REPORTS", 3)
    for i in range(5):
        await ota.add_report(router.store, "demo", "cam-01", "main", i % 4, i, "1.0.0", f"1.0.{i}")
    await ota.add_report(router.store, "demo", "cam-01", "walrus", 1, 0, None, None)
    history = await ota.events(router.store, "cam-01")
    assert [(e["package"], e["target"]) for e in history] == \
        [("main", "1.0.2"), ("main", "1.0.3"), ("main", "1.0.4"), ("walrus", None)]


async def test_manifest_accept_must_be_cbor(router, server, client):
    r = await client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.u/desired"), accept=50)).response
    assert r.code == Code.NOT_ACCEPTABLE and b"CBOR" in r.payload


def test_release_with_a_registry_refuses_unknown_devices_and_tags(tmp_path):
    reg = tmp_path / "devices.yaml"
    reg.write_text(REGISTRY)
    store = tmp_path / "s.db"
    fw = tmp_path / "fw.bin"
    fw.write_bytes(firmware(100))
    assert run_cli("upload", str(fw), "--version", "1.0.0", store=store).returncode == 0
    out = run_cli("release", "--version", "1.0.0", "--devices", "cam-01,cam-99", "--registry", str(reg), store=store)
    assert out.returncode == 2 and "has no device cam-99" in out.stderr
    out = run_cli("release", "--version", "1.0.0", "--tag", "nowhere", "--registry", str(reg), store=store)
    assert out.returncode == 2 and "has the tag 'nowhere'" in out.stderr
    out = run_cli("release", "--version", "1.0.0", "--tag", "beta", "--registry", str(reg), store=store)
    assert out.returncode == 0 and "for tag beta" in out.stdout
    listed = run_cli("list", store=store)
    assert "1: main@1.0.0 for tag beta" in listed.stdout


async def test_reports_and_answers_over_their_limit_are_refused(router, server, client):
    big = cbor2.dumps({"s": 1, "r": 0, "pkg": "main", "v": "x" * 3000})  # aiocoap sends it in Block1
    for path in ("/.u/c/main", "/.c/status", "/.rpc/status"):
        body = big if path == "/.u/c/main" else cbor2.dumps({"version": 1, "pad": "x" * (20 << 10)})
        r = await client.request(aiocoap.Message(code=Code.POST, uri=uri(server, path), payload=body,
                                                 content_format=60)).response
        assert r.code == Code.REQUEST_ENTITY_TOO_LARGE, path
        assert b"one message of at most" in r.payload and r.opt.size1 in (1024, 16 << 10)
    assert await ota.device_status(router.store) == []  # nothing half-taken
