"""Durability benchmark: frames/s through the whole router, durable store vs in-memory.

Usage::

    python bench/durability.py                 # 3,000 frames of 20-60 KB, both stores
    python bench/durability.py --frames 5000 --concurrency 128

Each run starts a fresh ``Router`` with one pipeline whose only step is a ``webhook``
destination pointing at a local HTTP sink (uvicorn, in its own process so it does not
share our event loop). Frames go in through ``router.accept`` (what every ingest server
calls: it returns once the frame is committed to the store), then the engine routes them
and the delivery worker POSTs them to the sink. The clock stops when the store's books say
every frame was delivered. The same run measures the durable store (a SQLite file, WAL,
synchronous=NORMAL: survives a process crash) and ``Store(":memory:")`` as the baseline,
and prints a table. Targets: durable >= 0.7x in-memory and >= 1,000 frames/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.message import Message
from pipelines.router import Router, RouterSettings

SINK = r"""
import sys, uvicorn
count = 0
byte_count = 0
async def app(scope, receive, send):
    global count, byte_count
    if scope["type"] != "http":
        return
    size = 0
    more = True
    while more:
        event = await receive()
        size += len(event.get("body", b""))
        more = event.get("more_body", False)
    if scope["method"] == "POST":
        count += 1
        byte_count += size
        body = b""
    else:
        body = f"{count} {byte_count}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, lifespan="off", backlog=4096)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sink() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SINK, str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            httpx.get(url + "/count", timeout=0.5)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the sink did not start")


def make_frames(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    blob = os.urandom(60 * 1024)  # incompressible, like JPEG frames
    return [blob[: rng.randint(20 * 1024, 60 * 1024)] for _ in range(n)]


async def run_once(label: str, store_path: str, pipeline_file: Path, frames: list[bytes],
                   concurrency: int) -> dict[str, float]:
    settings = RouterSettings(pipelines=[pipeline_file], store_path=store_path,
                              max_inbox=10**9, max_queue=10**9)
    async with Router(settings) as router:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for f in frames:
            queue.put_nowait(f)

        async def producer() -> None:
            while not queue.empty():
                payload = queue.get_nowait()
                await router.accept(Message.new(device_id="cam-1", path="/frames",
                                                content_type="image/jpeg", payload=payload))

        commits0 = router.store.commits
        t0 = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(concurrency)))
        t_ingest = time.perf_counter() - t0
        while True:
            books = await router.store.counters()
            if books["deliveries_delivered"] >= len(frames):
                break
            await asyncio.sleep(0.005)
        total = time.perf_counter() - t0
        commits = router.store.commits - commits0
    mb = sum(map(len, frames)) / 1e6
    return {"label": label, "frames": len(frames), "ingest_s": t_ingest, "total_s": total,
            "ingest_fps": len(frames) / t_ingest, "fps": len(frames) / total, "mbps": mb / total,
            "commits": commits}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent accept() callers")
    ap.add_argument("--max-in-flight", type=int, default=64, help="deliveries in flight to the sink")
    ap.add_argument("--rounds", type=int, default=1, help="alternate durable/memory this many times")
    args = ap.parse_args()

    sink, url = start_sink()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pipeline_file = Path(tmp) / "bench.yaml"
            pipeline_file.write_text(
                "pipelines:\n  frames:\n    filter: {path: /frames}\n    steps:\n"
                "      - name: sink\n"
                f"        max_in_flight: {args.max_in_flight}\n"
                "        destination:\n          type: webhook\n"
                f"          parameters: {{url: '{url}/frames'}}\n")
            frames = make_frames(args.frames)
            # warm-up: imports, connections, SQLite page cache
            await run_once("warm-up", ":memory:", pipeline_file, frames[:200], args.concurrency)
            results = []
            for r in range(args.rounds):
                results.append(await run_once("durable (file, WAL)", str(Path(tmp) / f"d{r}.db"),
                                              pipeline_file, frames, args.concurrency))
                results.append(await run_once("in-memory", ":memory:", pipeline_file, frames,
                                              args.concurrency))
    finally:
        sink.terminate()
        sink.wait(5)

    def best(label: str) -> dict[str, float]:
        return max((r for r in results if r["label"] == label), key=lambda r: r["fps"])

    durable, memory = best("durable (file, WAL)"), best("in-memory")
    size = sum(map(len, frames)) / len(frames) / 1024
    print(f"\n{args.frames} frames, 20-60 KB (mean {size:.0f} KB), {args.concurrency} concurrent "
          f"accept() callers, webhook max_in_flight {args.max_in_flight}")
    print(f"{'store':<22}{'ingest f/s':>12}{'end-to-end f/s':>16}{'MB/s':>8}{'commits':>9}{'vs memory':>11}")
    for r in (memory, durable):
        print(f"{r['label']:<22}{r['ingest_fps']:>12.0f}{r['fps']:>16.0f}{r['mbps']:>8.1f}"
              f"{r['commits']:>9.0f}{r['fps'] / memory['fps']:>10.2f}x")
    ok = durable["fps"] >= 0.7 * memory["fps"] and durable["fps"] >= 1000
    print(f"target durable >= 0.7x in-memory and >= 1,000 frames/s: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
