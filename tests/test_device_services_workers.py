"""OTA, settings and RPC with ``pipeline serve --workers 2``: two processes share the CoAP port
(SO_REUSEPORT), so a device's observations live in whichever process the kernel gave it. The
operator works on the store from a third process (this one): every device hears of a release
and a setting, and every device gets its RPC call and its answer comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiocoap
import cbor2
from aiocoap import Code
from pipeline_texts import RPC_RESULTS

from pipelines.device_services import ota, rpc, settings
from pipelines.store import Store

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = RPC_RESULTS


class Device:
    """An aiocoap device on its own endpoint observing /.u/desired, /.c and /.rpc."""

    def __init__(self, port: int, name: str) -> None:
        self.port, self.name = port, name
        self.manifests: asyncio.Queue = asyncio.Queue()
        self.settings: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.observations: list = []

    def uri(self, path: str) -> str:
        return f"coap://127.0.0.1:{self.port}{path}?d={self.name}"

    async def start(self) -> None:
        self.ctx = await aiocoap.Context.create_client_context()
        for path, queue in (("/.u/desired", self.manifests), ("/.c", self.settings)):
            pr = self.ctx.request(aiocoap.Message(code=Code.GET, uri=self.uri(path), observe=0, accept=60))
            first = await asyncio.wait_for(pr.response, 15)
            assert first.code == Code.CONTENT, (path, first)
            self.observations.append(pr.observation)
            self.tasks.append(asyncio.create_task(self._pump(pr, queue)))
        pr = self.ctx.request(aiocoap.Message(code=Code.GET, uri=self.uri("/.rpc"), observe=0, accept=60))
        assert cbor2.loads((await asyncio.wait_for(pr.response, 15)).payload) == "OK"
        self.observations.append(pr.observation)
        self.tasks.append(asyncio.create_task(self._answer(pr)))

    @staticmethod
    async def _pump(pr, queue: asyncio.Queue) -> None:
        async for note in pr.observation:
            queue.put_nowait(cbor2.loads(note.payload))

    async def _answer(self, pr) -> None:
        async for note in pr.observation:
            call = cbor2.loads(note.payload)
            reply = {"id": call["id"], "statusCode": 0, "detail": {"device": self.name, "echo": call["params"]}}
            await self.ctx.request(aiocoap.Message(code=Code.POST, uri=self.uri("/.rpc/status"),
                                                   payload=cbor2.dumps(reply), content_format=60)).response

    async def stop(self) -> None:
        for obs in self.observations:
            obs.cancel()
        for t in self.tasks:
            t.cancel()
        await self.ctx.shutdown()


async def next_matching(queue: asyncio.Queue, check, timeout: float = 15):
    async def loop():
        while True:
            value = await queue.get()
            if check(value):
                return value
    return await asyncio.wait_for(loop(), timeout)


async def test_two_serving_processes_one_store(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINES)
    store_path = tmp_path / "s.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(tmp_path / "p.yaml"),
        "--store", str(store_path), "--http-port", "0", "--coap-port", "0", "--workers", "2",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    devices: list[Device] = []
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert "ingest processes 2" in line, line
        port = int(line.split("coap://127.0.0.1:")[1].split()[0])
        devices = [Device(port, f"dev-{i}") for i in range(8)]
        await asyncio.gather(*(d.start() for d in devices))
        async with Store(store_path) as store:
            await ota.upload_artifact(store, b"firmware" * 500, package="main", version="2.0.0")
            await ota.release(store, "main", "2.0.0")
            await asyncio.gather(*(next_matching(d.manifests, lambda m: m[3] and m[3][0][2] == "2.0.0")
                                   for d in devices))
            await settings.set_setting(store, "INTERVAL", "30")
            await asyncio.gather(*(next_matching(d.settings, lambda s: s["settings"] == {"INTERVAL": 30})
                                   for d in devices))
            results = await asyncio.gather(*(rpc.call(store, d.name, "echo", [i], timeout=20)
                                             for i, d in enumerate(devices)))
        assert [r.detail for r in results] == [{"device": d.name, "echo": [i]} for i, d in enumerate(devices)]
    finally:
        for d in devices:
            await d.stop()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 0
