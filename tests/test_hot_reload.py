"""Hot reload: the pipeline file changes while frames stream in; every frame is routed exactly
once, by the old or the new pipeline; a broken file is refused and the old set keeps serving.

Real parts: the router (RouterService with its HTTP face and file watcher), its store, and an
HTTP sink (tests/delivery_sink.py) as the destination. The pipeline tags each frame with the
version of the pipeline that routed it (a json-patch step), so the sink tells which one did.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from delivery_sink import Answer, Sink

from pipelines.message import Message
from pipelines.router import RouterSettings
from pipelines.service import RouterService, ServiceSettings

PIPELINE = """
pipelines:
  frames:
    filter: {{path: /frames, content_type: application/json}}
    steps:
      - name: tag
        transformer:
          type: json-patch
          version: v1
          parameters: {{patch: '[{{"op": "add", "path": "/routed_by", "value": {version}}}]'}}
      - name: out
        destination: {{type: webhook, version: v1, parameters: {{url: "{url}"}}}}
"""

BROKEN = """
pipelines:
  frames:
    filter: {path: /frames}
    steps:
      - name: tag
        transformer: {type: no-such-transformer, version: v1}
"""


async def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def write(path: Path, text: str) -> None:
    """Replace the file the way editors do (write a new file, rename over): never half-written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


async def test_a_pipeline_change_while_frames_stream_in_routes_each_frame_exactly_once(tmp_path, sink):
    pipeline = tmp_path / "pipeline.yaml"
    write(pipeline, PIPELINE.format(version=1, url=sink.url("/out")))
    settings = ServiceSettings(
        router=RouterSettings(pipelines=[pipeline], store_path=tmp_path / "store.db"),
        http_port=0, watch_config=True)
    async with RouterService(settings) as service:
        router = service.router
        service.watcher.interval = 0.2
        sent: list[str] = []

        async def send(n: int) -> None:
            for _ in range(n):
                m = Message.new(device_id="cam-1", project_id="demo", path="/frames",
                                content_type="application/json",
                                payload=json.dumps({"i": len(sent)}).encode())
                await router.accept(m)
                sent.append(m.id)
                await asyncio.sleep(0.004)

        # 500 frames at least; the file is rewritten after 150, and the stream goes on for
        # 100 more after the new set is in (more than 500 only on a very slow machine)
        await send(150)
        write(pipeline, PIPELINE.format(version=2, url=sink.url("/out")))
        while router.generation == 1:
            await send(1)
        swapped_at = len(sent)
        await send(max(100, 500 - len(sent)))
        assert len(sent) >= 500
        print(f"\n{len(sent)} frames; the new pipeline was in after frame {swapped_at}")

        await wait_until(lambda: len(sink.got("/out")) >= len(sent), 60, "every frame delivered")
        await asyncio.sleep(0.3)  # a duplicate would have arrived by now...
        got = sink.got("/out")
        ids = [g.ce_id for g in got]
        assert sorted(ids) == sorted(sent), "each frame delivered exactly once"
        by = {g.ce_id: json.loads(g.body)["routed_by"] for g in got}
        versions = [by[i] for i in sent]
        assert set(versions) == {1, 2}
        assert versions[:150] == [1] * 150           # before the change: the old pipeline
        assert versions[swapped_at:] == [2] * (len(sent) - swapped_at)  # after it: the new one
        # the switch is one cut: never old after new in the order frames came in
        first_new = versions.index(2)
        assert versions[first_new:] == [2] * (len(sent) - first_new)
        books = await router.store.counters()
        assert books["ingested"] == books["routed"] == len(sent)
        assert books["dead_letters_open"] == 0 and books["deliveries_queued"] == 0

        # -- a broken file is refused; the last good set keeps serving -----------------------
        write(pipeline, BROKEN)
        await wait_until(lambda: router.reload_failures == 1, 10, "the broken file to be refused")
        assert router.generation == 2
        assert any("no-such-transformer" in p and f"{pipeline}:7:" in p for p in router.reload_problems)
        before = len(sent)
        await send(50)
        await wait_until(lambda: len(sink.got("/out")) == len(sent), 30, "frames after the refusal")
        assert [json.loads(g.body)["routed_by"] for g in sink.got("/out")[before:]] == [2] * 50
        async with httpx.AsyncClient(base_url=service.http_url) as client:
            metrics = (await client.get("/metrics")).text
            assert "pipeline_config_generation 2.0" in metrics
            assert "pipeline_config_reload_failures_total 1.0" in metrics
            page = (await client.get("/console/pipelines/frames")).text
            assert "The last reload was refused" in page and "no-such-transformer" in page

        # fixed again: the next save is taken
        write(pipeline, PIPELINE.format(version=3, url=sink.url("/out")))
        await wait_until(lambda: router.generation == 3, 10, "the fixed file to be taken")
        assert router.reload_problems == []


async def test_a_removed_step_leaves_its_queue_as_dead_letters_and_a_new_step_starts(tmp_path, sink):
    """Queued deliveries of a step that is gone are not lost: they become dead letters (as at
    a restart), and replaying them once the step is back delivers them."""
    pipeline = tmp_path / "pipeline.yaml"
    sink.answer("/slow", lambda n: Answer(503))  # held in retry
    write(pipeline, PIPELINE.format(version=1, url=sink.url("/slow")))
    settings = ServiceSettings(router=RouterSettings(pipelines=[pipeline], store_path=tmp_path / "s.db"),
                               http_port=None)
    async with RouterService(settings) as service:
        router = service.router
        for i in range(5):
            await router.accept(Message.new(device_id="d", project_id="p", path="/frames",
                                             content_type="application/json", payload=b'{"i": %d}' % i))

        async def queued() -> int:
            return (await router.store.counters())["deliveries_queued"]
        deadline = time.monotonic() + 10
        while await queued() < 5:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        write(pipeline, PIPELINE.format(version=2, url=sink.url("/fast")).replace("name: out", "name: out2"))
        assert await service.reload("test")
        assert ("frames", "out2") in router.delivery.workers and ("frames", "out") not in router.delivery.workers

        async def dead() -> int:
            return (await router.store.counters())["dead_letters_open"]
        deadline = time.monotonic() + 10
        while await dead() < 5:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await queued() == 0
        letters = await router.store.dead_letters()
        assert {dl.step for dl in letters} == {"out"}
        assert all("no longer in the pipelines" in dl.error for dl in letters)
        # the new step delivers new frames
        await router.accept(Message.new(device_id="d", project_id="p", path="/frames",
                                        content_type="application/json", payload=b'{"i": 99}'))
        await wait_until(lambda: len(sink.got("/fast")) == 1, 10, "the new step to deliver")


def test_sighup_reloads_a_running_serve(tmp_path, sink):
    """``pipeline serve`` reloads on SIGHUP (and says so in its log)."""
    pipeline = tmp_path / "pipeline.yaml"
    write(pipeline, PIPELINE.format(version=1, url=sink.url("/out")))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(pipeline),
                             "--store", str(tmp_path / "s.db"), "--http-port", "0", "--no-watch",
                             "--log-level", "INFO"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready http://"), line
        url = line.split()[1]
        write(pipeline, PIPELINE.format(version=2, url=sink.url("/out")))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "pipeline_config_generation 2.0" not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "configuration reloaded (SIGHUP): generation 2" in err


async def test_a_delivery_waiting_for_a_retry_keeps_the_request_of_the_pipeline_that_routed_it(tmp_path, sink):
    """Deliveries made by deterministic steps are stored as the routed frame and their request
    is made again when sent (pipelines.engine.rebuild_message). A frame routed by version 1 and
    still waiting for its retry when version 2 comes in is sent as version 1 made it."""
    pipeline = tmp_path / "pipeline.yaml"
    sink.answer("/out", lambda n: Answer(503, {"Retry-After": "1"}) if n < 3 else Answer(204))
    write(pipeline, PIPELINE.format(version=1, url=sink.url("/out")))
    settings = ServiceSettings(router=RouterSettings(pipelines=[pipeline], store_path=tmp_path / "s.db"),
                               http_port=None)
    async with RouterService(settings) as service:
        router = service.router
        sent = []
        for i in range(3):
            m = Message.new(device_id="d", project_id="p", path="/frames",
                            content_type="application/json", payload=b'{"i": %d}' % i)
            await router.accept(m)
            sent.append(m.id)
        await wait_until(lambda: len(sink.got("/out")) >= 3, 10, "the first attempts (503)")
        write(pipeline, PIPELINE.format(version=2, url=sink.url("/out")))
        assert await service.reload("test")
        await wait_until(lambda: len(sink.got("/out")) >= 6, 20, "the retries")
        retried = {g.ce_id: json.loads(g.body)["routed_by"] for g in sink.got("/out")[3:]}
        assert retried == dict.fromkeys(sent, 1)
        m = Message.new(device_id="d", project_id="p", path="/frames", content_type="application/json",
                        payload=b'{"i": 3}')
        await router.accept(m)  # routed by the new set
        await wait_until(lambda: len(sink.got("/out")) >= 7, 10, "the new frame")
        assert json.loads(sink.got("/out")[6].body)["routed_by"] == 2
