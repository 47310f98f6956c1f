"""Durability benchmark: frames/s through the whole router, durable store vs in-memory.

Usage::

    python bench/durability.py                 # 3,000 frames of 20-60 KB, 3 rounds, best of each
    python bench/durability.py --frames 5000 --concurrency 128 --max-in-flight 8

Each run starts a fresh ``Router`` with one pipeline whose only step is a ``webhook``
destination pointing at a local HTTP sink (a minimal asyncio HTTP/1.1 server in its own
process, so it does not share our event loop or GIL). Frames go in through
``router.accept`` (what every ingest server calls: it returns once the frame is committed
to the store), the engine routes them and the delivery worker POSTs them to the sink. The
clock stops when the store's books say every frame was delivered.

Rows of the table, all measured in the same run:
- ``httpx alone (ceiling)``: the same frames POSTed straight to the sink with a stock
  ``httpx.AsyncClient`` at the same concurrency, no router: the most a delivery path on
  stock httpx can reach here;
- ``httpx, asyncio backend``: the same with ``outbound_http.make_client()`` (httpx on
  ``pipelines.http_backend``), the client the router should be built with;
- ``in-memory``: the router on ``Store(":memory:")``, the baseline;
- ``durable``: the router on a SQLite file (WAL, synchronous=NORMAL: survives a crash or
  ``kill -9`` of the process; only an OS crash may lose the last commits).
Columns: ingest f/s (how fast ``accept`` returned), end-to-end f/s, commits and store
operations, the store writer's busy time (wall / CPU, as a share of the run) and the
router process's CPU. Targets: durable >= 0.7x in-memory and >= 1,000 frames/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from http_sink import start_sink

from pipelines.message import Message
from pipelines.outbound_http import make_client
from pipelines.router import Router, RouterSettings


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

        st = router.store
        commits0, ops0, busy0, bcpu0 = st.commits, st.ops, st.busy_seconds, st.busy_cpu_seconds
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.gather(*(producer() for _ in range(concurrency)))
        t_ingest = time.perf_counter() - t0
        while True:
            books = await router.store.counters()
            if books["deliveries_delivered"] >= len(frames):
                break
            await asyncio.sleep(0.005)
        total = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        commits = router.store.commits - commits0
        ops = router.store.ops - ops0
        busy = router.store.busy_seconds - busy0
        busy_cpu = router.store.busy_cpu_seconds - bcpu0
    mb = sum(map(len, frames)) / 1e6
    return {"label": label, "frames": len(frames), "ingest_s": t_ingest, "total_s": total,
            "ingest_fps": len(frames) / t_ingest, "fps": len(frames) / total, "mbps": mb / total,
            "commits": commits, "ops": ops, "busy": busy / total, "busy_cpu": busy_cpu / total,
            "cpu": cpu / total}


async def http_only(url: str, frames: list[bytes], in_flight: int, fast: bool = False) -> dict[str, float]:
    """The ceiling: the same frames POSTed straight to the same sink with httpx, no router."""
    todo = list(frames)
    async with (make_client() if fast else httpx.AsyncClient()) as client:
        async def worker() -> None:
            while todo:
                payload = todo.pop()
                r = await client.post(url + "/frames", content=payload,
                                      headers={"content-type": "image/jpeg"})
                r.raise_for_status()
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    fps = len(frames) / total
    return {"label": "httpx, asyncio backend" if fast else "httpx alone (ceiling)",
            "frames": len(frames), "ingest_fps": float("nan"),
            "fps": fps, "mbps": sum(map(len, frames)) / 1e6 / total, "commits": 0, "ops": 0,
            "busy": 0.0, "busy_cpu": 0.0, "cpu": cpu / total}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent accept() callers")
    ap.add_argument("--max-in-flight", type=int, default=4,
                    help="deliveries in flight to the sink (the step's max_in_flight; default: 4)")
    ap.add_argument("--rounds", type=int, default=3, help="alternate the runs this many times; best counts")
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
                results.append(await http_only(url, frames, args.max_in_flight))
                results.append(await http_only(url, frames, args.max_in_flight, fast=True))
    finally:
        sink.terminate()
        sink.wait(5)

    def best(label: str) -> dict[str, float]:
        return max((r for r in results if r["label"] == label), key=lambda r: r["fps"])

    durable, memory, ceiling = best("durable (file, WAL)"), best("in-memory"), best("httpx alone (ceiling)")
    fast = best("httpx, asyncio backend")
    size = sum(map(len, frames)) / len(frames) / 1024
    print(f"\n{args.frames} frames, 20-60 KB (mean {size:.0f} KB), {args.concurrency} concurrent "
          f"accept() callers, webhook max_in_flight {args.max_in_flight}")
    print(f"{'store':<22}{'ingest f/s':>12}{'end-to-end f/s':>16}{'MB/s':>8}{'commits':>9}{'ops':>8}"
          f"{'writer busy/CPU':>16}{'router CPU':>12}{'vs memory':>11}")
    for r in (ceiling, fast, memory, durable):
        print(f"{r['label']:<22}{r['ingest_fps']:>12.0f}{r['fps']:>16.0f}{r['mbps']:>8.1f}"
              f"{r['commits']:>9.0f}{r['ops']:>8.0f}{r['busy']:>10.0%}/{r['busy_cpu']:>4.0%}{r['cpu']:>11.0%}"
              f"{r['fps'] / memory['fps']:>10.2f}x")
    ok = durable["fps"] >= 0.7 * memory["fps"] and durable["fps"] >= 1000
    print(f"target durable >= 0.7x in-memory and >= 1,000 frames/s: {'met' if ok else 'NOT met'}"
          f" (durable {durable['fps'] / memory['fps']:.2f}x, {durable['fps']:.0f} frames/s;"
          f" the HTTP client alone peaks at {ceiling['fps']:.0f}/s here, {fast['fps']:.0f}/s on the"
          f" asyncio backend; durable = {durable['fps'] / ceiling['fps']:.2f}x the stock ceiling)")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
