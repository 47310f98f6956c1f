"""kill -9 of an mqtt-worker while camera frames stream in at full rate: nothing acknowledged is lost.

The workload of ``bench/frames_to_webhook.py``, smaller: 4 cameras publish unique PNG frames
(``device_sim``) with QoS 1 to a real mosquitto as fast as the broker takes them; one real
``pipeline mqtt-worker`` process runs ``pipeline.yaml``'s ``camera-caption`` pipeline unchanged
(the API base URL overridden to a real HTTP server). Twice, at seeded random points of the
stream, the worker gets SIGKILL and is started again under the same client id on the same store
(deliveries stored as the routed frame and rebuilt at delivery survive the restart). In the end
every frame the broker acknowledged to a camera reached the server at least once, as the exact
create request with the token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt

from device_sim.frames import FrameSource
from tests.http_recorder import HTTPRecorder
from tests.mqtt_broker import Mosquitto
from tests.test_mqtt_ingest import wait_for
from tests.test_mqtt_workers import REPO, Worker

FRAMES = 400
CAMERAS = 4
KILLS = 2
TOKEN = "Token r8_crash_test"
PREFIX = "data:image/png;base64,"


def render(cam: int, count: int) -> list[bytes]:
    source = FrameSource(("coffee", "rocket", "chelsea", "astronaut")[cam], seed=cam, label=f"cam-{cam}")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return [source.render(i, t0 + timedelta(seconds=i)).payload for i in range(count)]


async def test_sigkill_at_full_rate_loses_no_acknowledged_frame(tmp_path: Path, monkeypatch) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    per_cam = await asyncio.gather(*(asyncio.to_thread(render, c, FRAMES // CAMERAS) for c in range(CAMERAS)))
    frames = [(c, per_cam[c][i]) for i in range(FRAMES // CAMERAS) for c in range(CAMERAS)]
    assert len({png for _, png in frames}) == FRAMES
    monkeypatch.setenv("REPLICATE_TOKEN", TOKEN)
    with Mosquitto(tmp_path / "broker") as broker, HTTPRecorder() as api:
        worker = Worker(tmp_path, "worker-a", broker.port, REPO / "pipeline.yaml",
                        "--override", f"https://api.replicate.com={api.url('')}")
        worker.cmd[worker.cmd.index("--max-inflight") + 1] = "256"  # the default: full rate
        kill_at = sorted(rng.sample(range(60, FRAMES - 60), KILLS))
        acked: set[int] = set()
        try:
            worker.start()
            await wait_for(worker.subscriptions, timeout=30, what="the worker subscribed")

            async def camera(cam: int) -> None:
                async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"cam-{cam}",
                                          protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=64) as dev:
                    async def one(i: int) -> None:
                        await dev.publish(f"demo/cam-{cam}/stream/images", frames[i][1], qos=1)
                        acked.add(i)  # the broker acknowledged it: it must reach the API
                    await asyncio.gather(*(one(i) for i, (c, _) in enumerate(frames) if c == cam))

            cameras = asyncio.gather(*(camera(c) for c in range(CAMERAS)))
            for n, threshold in enumerate(kill_at, 1):
                await wait_for(lambda t=threshold: len(api.requests) >= t, timeout=60,
                               what=f"{threshold} requests before kill {n}")
                await asyncio.to_thread(worker.kill)
                print(f"kill {n} at {len(api.requests)} requests, {len(acked)} frames acknowledged")
                worker.start()
                await wait_for(lambda n=n: worker.subscriptions() > n, timeout=30,
                               what=f"the worker back after kill {n}")
            await asyncio.wait_for(cameras, 120)
            assert len(acked) == FRAMES

            def delivered() -> set[int]:
                index = {png: i for i, (_, png) in enumerate(frames)}
                seen = set()
                for r in list(api.requests):
                    doc = json.loads(r.body)
                    image = doc["input"]["image"]
                    assert image.startswith(PREFIX) and r.headers["Authorization"] == TOKEN
                    seen.add(index[base64.b64decode(image[len(PREFIX):])])
                return seen

            await wait_for(lambda: delivered() >= acked, timeout=120, what="every acknowledged frame at the API")
            print(f"{len(api.requests)} requests for {FRAMES} frames ({len(api.requests) - FRAMES} duplicates)")
            assert worker.subscriptions() == KILLS + 1  # it really was killed and came back
        finally:
            worker.stop()
