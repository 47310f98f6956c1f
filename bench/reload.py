"""Benchmark: frames/s through the default pipeline while the pipeline file is rewritten every
second (each rewrite a hot reload), against the same with no reloads, in the same run.

The router runs in this process (RouterService with the file watcher on, durable store) on
the shipped pipeline.yaml: every frame goes through the four transformers and the webhook
step; ``https://api.replicate.com`` is pointed at the benchmarks' HTTP sink (bench/http_sink.py,
its own process), so the model's time is not in the figures, only the router's. Frames are
real camera photos (device_sim/data), offered as fast as the router takes them
(``accept_many``, 50 at a time; pushed back, it waits). A run ends when the sink has received
every frame. Rounds alternate: no reloads, reloads, no reloads, ... Target: reloads >= 0.9x.

    python bench/reload.py [--frames 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
from http_sink import start_sink  # noqa: E402

from pipelines.ingest import Overloaded  # noqa: E402
from pipelines.message import Message  # noqa: E402
from pipelines.router import RouterSettings  # noqa: E402
from pipelines.service import RouterService, ServiceSettings  # noqa: E402


def photos() -> list[bytes]:
    import io

    from PIL import Image
    out = []
    for f in sorted((ROOT / "device_sim" / "data").glob("*.jpg")):
        img = Image.open(f).convert("RGB")
        img.thumbnail((320, 240))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def one_run(n: int, reload_every: float | None, sink: str, frames: list[bytes]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    try:
        pipeline = tmp / "pipeline.yaml"
        original = (ROOT / "pipeline.yaml").read_text()
        pipeline.write_text(original)
        settings = ServiceSettings(
            router=RouterSettings(pipelines=[pipeline], store_path=tmp / "store.db",
                                  url_overrides={"https://api.replicate.com": sink}),
            http_port=None, watch_config=True)
        before = int(httpx.get(sink + "/count").text.split()[0])
        async with RouterService(settings) as service:
            router = service.router
            stop = asyncio.Event()

            async def rewrite() -> None:
                i = 0
                while not stop.is_set():
                    await asyncio.sleep(reload_every)  # type: ignore[arg-type]
                    i += 1
                    tmp_file = tmp / "pipeline.yaml.new"
                    tmp_file.write_text(original + f"\n# rewrite {i}\n")
                    os.replace(tmp_file, pipeline)

            rewriter = asyncio.create_task(rewrite()) if reload_every else None
            gen0 = router.generation
            started, cpu0 = time.perf_counter(), time.process_time()
            sent = 0
            while sent < n:
                batch = [Message.new(device_id=f"cam-{(sent + i) % 20}", project_id="demo", path="/images",
                                     content_type="application/octet-stream",
                                     payload=frames[(sent + i) % len(frames)]) for i in range(min(50, n - sent))]
                try:
                    await router.accept_many(batch)
                except Overloaded:
                    await asyncio.sleep(0.05)
                    continue
                sent += len(batch)
            async with httpx.AsyncClient() as client:
                while int((await client.get(sink + "/count")).text.split()[0]) - before < n:
                    await asyncio.sleep(0.02)
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu0
            stop.set()
            if rewriter:
                rewriter.cancel()
            reloads = router.generation - gen0
            failures = router.reload_failures
        return {"seconds": seconds, "fps": n / seconds, "cpu_ms": cpu * 1000 / n, "reloads": reloads,
                "failures": failures}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    os.environ["REPLICATE_TOKEN"] = "Bearer r8_bench_reload_token"
    frames = photos()
    proc, sink = start_sink()
    try:
        await one_run(300, None, sink, frames)  # warm-up: imports, first connections
        plain, reloading = [], []
        for r in range(args.rounds):
            plain.append(await one_run(args.frames, None, sink, frames))
            reloading.append(await one_run(args.frames, 1.0, sink, frames))
            print(f"round {r + 1}: no reloads {plain[-1]['fps']:7.1f} frames/s | "
                  f"reload every 1 s {reloading[-1]['fps']:7.1f} frames/s "
                  f"({reloading[-1]['reloads']} reloads in {reloading[-1]['seconds']:.1f} s)", flush=True)
    finally:
        proc.kill()
    p = statistics.median(x["fps"] for x in plain)
    q = statistics.median(x["fps"] for x in reloading)
    reloads = sum(x["reloads"] for x in reloading)
    failures = sum(x["failures"] for x in reloading)
    pc = statistics.median(x["cpu_ms"] for x in plain)
    qc = statistics.median(x["cpu_ms"] for x in reloading)
    print()
    print(f"{'run (median of ' + str(args.rounds) + ')':<30}{'frames/s':>10}{'ratio':>8}"
          f"{'CPU ms/frame':>14}{'ratio':>8}{'reloads':>9}")
    print(f"{'no reloads (baseline)':<30}{p:>10.1f}{1.0:>8.2f}{pc:>14.3f}{1.0:>8.2f}{0:>9}")
    print(f"{'pipeline rewritten every 1 s':<30}{q:>10.1f}{q / p:>8.2f}{qc:>14.3f}{qc / pc:>8.2f}{reloads:>9}")
    print("(CPU ms/frame: this process's CPU time per frame, router threads included; steadier than\n"
          " frames/s on a machine shared with other work)")
    print(f"\n{args.frames} frames per run; refused reloads: {failures}; target >= 0.90x: "
          f"{'met' if q / p >= 0.9 else 'NOT met'}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(ap.parse_args()))
