"""Benchmark: the engine running the default pipeline vs a hand-written function, same run.

Both turn a 320x240 camera PNG (device_sim's real scenes, 20-60 KB) into the create-prediction
request of pipeline.yaml and POST it through httpx to a destination answered in-process
(httpx's MockTransport, a 201 with a prediction object):

* engine: ``Engine.route`` over the steps of pipeline.yaml as loaded by the router
  (change-content-type -> data-url -> embed-in-json -> json-patch), then the webhook
  destination's ``deliver`` (CloudEvents headers, secrets, URL override) for each delivery;
* hand-written: base64 + byte concatenation of the same JSON body, the same headers, the same
  POST. No engine, no parsing: the fastest honest way to do this work in Python.

One process, one event loop, so one core. Prints frames/s for each and the ratio.

    python bench/engine.py [--seconds 5] [--frames 24]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from device_sim.frames import FrameSource  # noqa: E402
from device_sim.scenes import SCENE_NAMES  # noqa: E402
from pipelines.components import ComponentContext  # noqa: E402
from pipelines.config import load_pipelines  # noqa: E402
from pipelines.engine import Engine, build_pipelines  # noqa: E402
from pipelines.message import Message  # noqa: E402
from pipelines.outbound_http import cloudevents_headers, request_headers, rewrite_url  # noqa: E402
from pipelines.secrets import SecretSource  # noqa: E402

VERSION = "2e1dddc8621f72155f24cf2e0adbde548458d3cab9f00c0139eea840d0ac4746"
URL = "https://api.replicate.com/v1/predictions"
ANSWER = b'{"id":"abc","status":"starting"}'


def frames(count: int) -> list[bytes]:
    out = []
    names = list(SCENE_NAMES)
    for i in range(count):
        src = FrameSource(names[i % len(names)], seed=i, label=f"cam-{i:02d}")
        out.append(src.render(i, datetime.now(UTC)).payload)
    return out


def handler(request: httpx.Request) -> httpx.Response:
    return httpx.Response(201, content=ANSWER, headers={"Content-Type": "application/json"})


def load_engine(ctx) -> Engine:
    """pipeline.yaml as the router loads it, with its secret given."""
    loaded = load_pipelines([ROOT / "pipeline.yaml"], SecretSource({"REPLICATE_TOKEN": "Bearer r8_bench"}))
    assert not loaded.problems, loaded.problems
    return Engine(build_pipelines(loaded.pipelines, ctx))


def new_frame(png: bytes) -> Message:
    return Message.new(device_id="cam-01", project_id="demo", path="/images",
                       content_type="application/octet-stream", payload=png)


async def timed(pngs: list[bytes], seconds: float, per_frame) -> tuple[int, float]:
    """Frames done by ``await per_frame(png)`` in about ``seconds``, and the time taken."""
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for png in pngs:
            await per_frame(png)
            n += 1
    return n, time.perf_counter() - start


HEAD = b'{"version":"' + VERSION.encode() + b'","input":{"image":"data:image/png;base64,'


def handwritten_request(png: bytes) -> tuple[dict[str, str], bytes]:
    """The same request as the pipeline's, built by hand: CloudEvents headers and concatenation."""
    headers = cloudevents_headers(new_frame(png))
    headers["Content-Type"] = "application/json"
    headers["Authorization"] = "Bearer r8_bench"
    return headers, HEAD + base64.b64encode(png) + b'"}}'


class InProcessAnswer:
    """The destination answered in-process: takes the request's URL, headers and body."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, url: str, headers: object, body: bytes) -> int:
        self.bytes += len(body)
        return 201


async def engine_run(client: httpx.AsyncClient, pngs: list[bytes], seconds: float) -> tuple[int, float]:
    engine = load_engine(lambda pc, sc: ComponentContext(http=client, pipeline=pc.name, step=sc.name,
                                                        extra={"timeout": 30}))
    dest = {(p.name, s.name): s.destination for p in engine.pipelines for s in p.steps if s.destination}

    async def frame(png: bytes) -> None:
        outcome, _ = await engine.route(new_frame(png))
        for d in outcome.deliveries:
            await dest[(d.pipeline, d.step)].deliver(d.message)
    return await timed(pngs, seconds, frame)


async def engine_bytes_run(pngs: list[bytes], seconds: float) -> tuple[int, float]:
    """Engine.route, then the request the webhook destination sends (its URL rewriting, and the
    CloudEvents and user headers as ``post_message`` builds them), handed to an in-process answer."""
    engine = load_engine(lambda pc, sc: ComponentContext())
    webhooks = [(p.name, s) for p in engine.pipelines for s in p.steps
                if s.destination is not None and s.destination.type == "webhook"]
    user_headers = {(p, s.name): s.destination.params.headers for p, s in webhooks}
    urls = {(p, s.name): s.destination.params.url for p, s in webhooks}
    answer = InProcessAnswer()

    async def frame(png: bytes) -> None:
        outcome, _ = await engine.route(new_frame(png))
        for d in outcome.deliveries:
            key = (d.pipeline, d.step)
            answer(rewrite_url(urls[key], {}), request_headers(d.message, user_headers[key]), d.message.payload)
    return await timed(pngs, seconds, frame)


async def handwritten_bytes_run(pngs: list[bytes], seconds: float) -> tuple[int, float]:
    answer = InProcessAnswer()

    async def frame(png: bytes) -> None:
        headers, body = handwritten_request(png)
        answer(URL, headers, body)
    return await timed(pngs, seconds, frame)


async def handwritten_run(client: httpx.AsyncClient, pngs: list[bytes], seconds: float) -> tuple[int, float]:
    async def frame(png: bytes) -> None:
        headers, body = handwritten_request(png)
        r = await client.post(URL, content=body, headers=headers)
        assert r.status_code == 201
    return await timed(pngs, seconds, frame)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement (default 4)")
    ap.add_argument("--frames", type=int, default=24, help="distinct frames (default 24)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    args = ap.parse_args()
    pngs = frames(args.frames)
    sizes = sorted(len(p) for p in pngs)
    rows = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        pairs = [
            ("bytes to request, answered in-process", engine_bytes_run, handwritten_bytes_run, False),
            ("the same through httpx (MockTransport)", engine_run, handwritten_run, True),
        ]
        for title, eng_fn, hand_fn, uses_client in pairs:
            eargs = (client, pngs) if uses_client else (pngs,)
            await eng_fn(*eargs, 0.3)  # warm up both
            await hand_fn(*eargs, 0.3)
            eng, hand = [], []
            for _ in range(args.rounds):  # alternate so machine noise hits both alike
                n, t = await eng_fn(*eargs, args.seconds)
                eng.append(n / t)
                n, t = await hand_fn(*eargs, args.seconds)
                hand.append(n / t)
            rows.append((title, statistics.median(eng), statistics.median(hand)))
    print(f"frames: {len(pngs)} PNGs 320x240 from device_sim, {sizes[0] / 1024:.0f}-{sizes[-1] / 1024:.0f} KB"
          f" (median {statistics.median(sizes) / 1024:.0f} KB); one process, one core; median of"
          f" {args.rounds} alternating rounds of {args.seconds:g} s; machine: {os.cpu_count()} cpus")
    print()
    print(f"| {'measurement':<40} | {'engine f/s':>10} | {'hand f/s':>9} | {'engine µs':>9} |"
          f" {'hand µs':>8} | {'ratio':>5} |")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 7}|")
    for title, e, h in rows:
        print(f"| {title:<40} | {e:>10.0f} | {h:>9.0f} | {1e6 / e:>9.0f} | {1e6 / h:>8.0f} | {h / e:>5.2f} |")
    print()
    print("ratio = engine time per frame / hand-written time per frame (target <= 1.25);"
          " target >= 5000 frames/s for the engine on one core")


if __name__ == "__main__":
    asyncio.run(main())
