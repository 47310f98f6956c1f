"""``pipeline serve --workers 2``: two processes share the CoAP port (SO_REUSEPORT), one store.

Eight devices, each on its own UDP endpoint, post and observe their state; whichever process
the kernel gives a device to, its message is stored once, routed by the engine process, and
its Observe notification arrives (the ingest-only process learns of state changes from the
shared store).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiocoap
from aiocoap.numbers.contentformat import ContentFormat

ROOT = Path(__file__).resolve().parent.parent

PIPELINES = """
pipelines:
  last-reading:
    filter: {path: /temp, content_type: application/json}
    steps:
      - name: keep
        destination: {type: lightdb-state, version: v1, parameters: {path: /last}}
"""


async def one_device(port: int, device: str, value: int) -> dict:
    ctx = await aiocoap.Context.create_client_context()
    try:
        observe = aiocoap.Message(code=aiocoap.GET, uri=f"coap://127.0.0.1:{port}/.d/last?d={device}", observe=0)
        req = ctx.request(observe)
        first = await asyncio.wait_for(req.response, 15)
        assert first.code.is_successful(), first
        post = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{port}/.s/temp?d={device}",
                               payload=json.dumps({"c": value}).encode(),
                               content_format=ContentFormat.JSON)
        answer = await asyncio.wait_for(ctx.request(post).response, 15)
        assert answer.code == aiocoap.CHANGED, answer
        async def next_doc() -> dict:
            async for note in req.observation:
                doc = json.loads(note.payload or b"null")
                if doc == {"c": value}:
                    return doc
            raise AssertionError("observation ended")
        return await asyncio.wait_for(next_doc(), 20)
    finally:
        await ctx.shutdown()


async def test_two_ingest_processes_share_the_port_and_lose_nothing(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINES)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(tmp_path / "p.yaml"),
        "--store", str(tmp_path / "s.db"), "--http-port", "0", "--coap-port", "0", "--workers", "2",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert "ingest processes 2" in line, line
        port = int(line.split("coap://127.0.0.1:")[1].split()[0])
        # the second process is a child of the first, started with --ingest-only
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert any("--ingest-only" in Path(f"/proc/{c}/cmdline").read_text() for c in children)
        docs = await asyncio.gather(*(one_device(port, f"dev-{i}", i) for i in range(8)))
        assert docs == [{"c": i} for i in range(8)]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 0
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "stats", "--store", str(tmp_path / "s.db")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    books = json.loads(out.stdout)
    assert books["ingested"] == 8 and books["routed"] == 8 and books["deliveries_delivered"] == 8
