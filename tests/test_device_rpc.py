"""RPC (``/.rpc``) against the real router service (CoAP + HTTP face), aiocoap devices on
loopback, ``pipeline rpc`` as a real subprocess, the HTTP endpoint through httpx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import aiocoap
import cbor2
import httpx
import pytest
from aiocoap import Code

from pipelines.device_services import rpc
from pipelines.ingest.coap import CoapSettings
from pipelines.router import RouterSettings
from pipelines.service import RouterService, ServiceSettings

try:
    from tests.test_device_ota import PIPELINES, REGISTRY, client, uri
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from test_device_ota import PIPELINES, REGISTRY, client, uri  # noqa: F401 - fixture


@pytest.fixture
async def service(tmp_path: Path):
    (tmp_path / "p.yaml").write_text(PIPELINES)
    (tmp_path / "devices.yaml").write_text(REGISTRY)
    settings = ServiceSettings(
        router=RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=tmp_path / "s.db"), http_port=0,
        coap=CoapSettings(port=0, dtls_enabled=False, plain_enabled=True,
                          registry_path=tmp_path / "devices.yaml", rate_limit=0))
    async with RouterService(settings) as svc:
        svc.coap.port = svc.coap_port  # for uri()
        yield svc


def rpc_cli(*args: str, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "rpc", *args, "--store", str(store)],
                          capture_output=True, text=True, timeout=60)


@contextlib.asynccontextmanager
async def device(ctx: aiocoap.Context, svc, name: str = "cam-01", answer: bool = True):
    """An aiocoap device that observes /.rpc and answers ``multiply`` (others: NOT_FOUND, 5)."""
    pr = ctx.request(aiocoap.Message(code=Code.GET, uri=uri(svc.coap, "/.rpc", name), observe=0, accept=60))
    first = await pr.response
    assert first.code == Code.CONTENT and cbor2.loads(first.payload) == "OK"
    seen: list[dict] = []

    async def serve() -> None:
        async for note in pr.observation:
            call = cbor2.loads(note.payload)
            seen.append(call)
            if not answer:
                continue
            if call["method"] == "multiply":
                a, b = call["params"]
                reply = {"id": call["id"], "statusCode": 0, "detail": {"value": float(a * b)}}
            else:
                reply = {"id": call["id"], "statusCode": 5}
            r = await ctx.request(aiocoap.Message(code=Code.POST, uri=uri(svc.coap, "/.rpc/status", name),
                                                  payload=cbor2.dumps(reply), content_format=60)).response
            assert r.code == Code.CHANGED, r.payload

    task = asyncio.create_task(serve())
    try:
        yield seen
    finally:
        pr.observation.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def test_cli_and_http_calls_return_the_devices_answer(service, client, tmp_path):
    store = tmp_path / "s.db"
    async with device(client, service) as seen:
        out = await asyncio.to_thread(rpc_cli, "cam-01", "multiply", "3", "4", store=store)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"statusCode": 0, "status": "OK", "detail": {"value": 12.0}}
        assert seen[-1]["params"] == [3, 4]
        async with httpx.AsyncClient(base_url=service.http_url) as http:
            r = await http.post("/v1/devices/cam-01/rpc", json={"method": "multiply", "params": [2.5, 2]})
            assert r.status_code == 200 and r.json()["detail"] == {"value": 5.0}
            r = await http.post("/v1/devices/cam-01/rpc", json={"method": "reboot", "params": []})
            assert r.status_code == 200 and r.json()["status"] == "NOT_FOUND"
            r = await http.post("/v1/devices/cam-01/rpc", json={"params": []})
            assert r.status_code == 400
        unknown = await asyncio.to_thread(rpc_cli, "cam-01", "reboot", store=store)
        assert unknown.returncode == 1 and '"NOT_FOUND"' in unknown.stdout
    # each answer also entered the pipelines, on /.rpc/result (routed to lightdb-stream here)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = await service.router.store.query_stream(device_id="cam-01", path="/.rpc/result")
        if len(rows) >= 4:
            break
        await asyncio.sleep(0.05)
    results = [row["data"] for row in rows]
    assert {"method": "multiply", "params": [3, 4], "statusCode": 0, "status": "OK",
            "detail": {"value": 12.0}}.items() <= next(r for r in results if r["params"] == [3, 4]).items()


async def test_offline_and_silent_devices_time_out_clearly(service, client, tmp_path):
    store = tmp_path / "s.db"
    started = time.monotonic()
    out = await asyncio.to_thread(rpc_cli, "cam-02", "multiply", "1", "2", "--timeout", "700ms", store=store)
    assert out.returncode == 2
    assert "did not answer multiply within 0.7s" in out.stderr and "not observing" in out.stderr
    assert time.monotonic() - started < 10  # process start included; the wait itself is 0.7 s
    async with device(client, service, "cam-03", answer=False) as seen:
        with pytest.raises(rpc.RpcTimeout, match="was sent to it"):
            await rpc.call(service.router.store, "cam-03", "multiply", [1, 2], timeout=1)
        assert seen and seen[0]["method"] == "multiply"
        # the device answers late: refused, the caller is gone
        late = {"id": seen[0]["id"], "statusCode": 0}
        r = await client.request(aiocoap.Message(code=Code.POST, uri=uri(service.coap, "/.rpc/status", "cam-03"),
                                                 payload=cbor2.dumps(late), content_format=60)).response
        assert r.code == Code.NOT_FOUND and b"timed out" in r.payload
    async with httpx.AsyncClient(base_url=service.http_url) as http:
        r = await http.post("/v1/devices/cam-02/rpc", json={"method": "multiply", "params": [], "timeout": 0.3})
        assert r.status_code == 504 and "not observing" in r.json()["detail"]


async def test_a_call_made_while_offline_is_sent_when_the_device_observes(service, client):
    waiting = asyncio.create_task(rpc.call(service.router.store, "cam-01", "multiply", [6, 7], timeout=10))
    await asyncio.sleep(0.3)  # the call is stored and waits; nobody observes yet
    assert not waiting.done()
    async with device(client, service):
        result = await asyncio.wait_for(waiting, 10)
    assert result.detail == {"value": 42.0}


async def test_answers_the_router_never_asked_for_are_refused(service, client):
    async def post(body: bytes, name: str = "cam-01") -> aiocoap.Message:
        return await client.request(aiocoap.Message(code=Code.POST, uri=uri(service.coap, "/.rpc/status", name),
                                                    payload=body, content_format=60)).response

    r = await post(cbor2.dumps({"id": "never-issued", "statusCode": 0}))
    assert r.code == Code.NOT_FOUND and b"never issued" in r.payload
    # a real call for cam-01 cannot be answered by cam-02
    async with device(client, service, "cam-01", answer=False) as seen:
        waiting = asyncio.create_task(rpc.call(service.router.store, "cam-01", "multiply", [1, 1], timeout=5))
        while not seen:
            await asyncio.sleep(0.02)
        r = await post(cbor2.dumps({"id": seen[0]["id"], "statusCode": 0}), name="cam-02")
        assert r.code == Code.NOT_FOUND
        r = await post(cbor2.dumps({"id": seen[0]["id"], "statusCode": 0, "detail": {"ok": True}}))
        assert r.code == Code.CHANGED
        assert (await waiting).detail == {"ok": True}
        r = await post(cbor2.dumps({"id": seen[0]["id"], "statusCode": 0}))  # a repeat
        assert r.code == Code.CHANGED
    for bad in (b"\xff", cbor2.dumps(["id"]), cbor2.dumps({"id": 5, "statusCode": 0}),
                cbor2.dumps({"id": "x", "statusCode": "ok"})):
        r = await post(bad)
        assert r.code == Code.BAD_REQUEST and r.payload, bad


async def test_bad_calls_are_refused(service):
    store = service.router.store
    with pytest.raises(rpc.RpcError, match="method"):
        await rpc.call(store, "cam-01", "bad method", [])
    with pytest.raises(rpc.RpcError, match="timeout"):
        await rpc.call(store, "cam-01", "m", [], timeout=0)
    with pytest.raises(rpc.RpcError, match="JSON"):
        await rpc.call(store, "cam-01", "m", [float("nan")])


async def test_calls_to_one_device_go_one_at_a_time_and_all_arrive(service, client):
    async with device(client, service) as seen:
        calls = [asyncio.create_task(rpc.call(service.router.store, "cam-01", "multiply", [i, 2], timeout=20))
                 for i in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*calls), 30)
    assert [r.detail for r in results] == [{"value": float(i * 2)} for i in range(5)]
    assert [c["params"] for c in seen] == [[i, 2] for i in range(5)]  # in order, none lost


async def test_a_call_the_device_dropped_is_sent_again_when_it_observes_again(service, client):
    waiting = None
    async with device(client, service, "cam-01", answer=False) as seen:
        waiting = asyncio.create_task(rpc.call(service.router.store, "cam-01", "multiply", [5, 5], timeout=20))
        while not seen:
            await asyncio.sleep(0.02)
    # the observation ended without an answer (the device went away): the call waits again ...
    async with device(client, service, "cam-01") as seen_again:
        result = await asyncio.wait_for(waiting, 20)
    assert result.detail == {"value": 25.0}
    assert seen_again[0]["id"] == seen[0]["id"]  # ... and the same call is sent to the next observation


async def test_finished_calls_are_pruned(service, monkeypatch):
    store = service.router.store
    with pytest.raises(rpc.RpcTimeout):
        await rpc.call(store, "cam-02", "m", [], timeout=0.1)
    assert len(await rpc.calls(store)) == 1
    monkeypatch.setattr(rpc, "KEEP_CALLS", 0.0)
    with pytest.raises(rpc.RpcTimeout):
        await rpc.call(store, "cam-02", "n", [], timeout=0.1)
    assert [c["method"] for c in await rpc.calls(store)] == ["n"]
