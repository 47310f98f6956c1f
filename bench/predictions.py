"""Benchmark: the local predictions service over HTTP vs calling the model directly, same run.

    python bench/predictions.py [--n 200] [--concurrency 1 4] [--size 320x240] [--photo coffee]

Both sides do the same work per prediction: decode a PNG, resize/crop, EfficientNet-Lite0 on
onnxruntime, phrase a caption. The HTTP side adds JSON + base64 data URL, auth, the prediction
record and a sync wait (``Prefer: wait``) through uvicorn on loopback. Prints predictions/s and
p50/p99 latency per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from predictions_service import Settings, blip, running
from predictions_service.model import Classifier, ensure_model
from predictions_service.runner import PredictionRunner


def frame(photo: str, size: tuple[int, int]) -> bytes:
    """A camera frame as the simulator sends it: the scene photo, panned, stamped, with sensor
    noise, as a 256-colour PNG (20-60 KB at 320x240)."""
    from datetime import UTC, datetime

    from device_sim.frames import FrameSource

    return FrameSource(photo, seed=1, label="bench", width=size[0], height=size[1]).render(
        0, datetime.now(UTC)).payload


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(name: str, latencies: list[float], wall: float) -> tuple[str, str, str, str, str]:
    n = len(latencies)
    return (
        name,
        str(n),
        f"{n / wall:8.1f}",
        f"{pct(latencies, 0.5) * 1000:7.2f}",
        f"{pct(latencies, 0.99) * 1000:7.2f}",
    )


def bench_direct(classifier: Classifier, png: bytes, n: int) -> tuple[list[float], float, str]:
    out = ""
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        out = blip.answer(classifier, png, "image_captioning", None, None).output
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - start, out


async def bench_http(
    classifier: Classifier, png: bytes, n: int, concurrency: int
) -> tuple[list[float], float, str]:
    settings = Settings(
        port=0,
        tokens=("bench",),
        log_level="warning",
        workers=concurrency,
        create_rate_per_minute=10**9,
        other_rate_per_minute=10**9,
        max_predictions=10**6,
    )
    body = {
        "version": blip.VERSION,
        "input": {"image": "data:image/png;base64," + base64.b64encode(png).decode()},
    }
    headers = {"Authorization": "Bearer bench", "Prefer": "wait"}
    latencies: list[float] = []
    outputs: list[str] = []
    async with running(settings, PredictionRunner(settings, classifier=classifier)) as url:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:
            for _ in range(3):  # warm up connections
                await client.post("/v1/predictions", json=body)
            todo = iter(range(n))

            async def worker() -> None:
                for _ in todo:
                    t = time.perf_counter()
                    r = await client.post("/v1/predictions", json=body)
                    latencies.append(time.perf_counter() - t)
                    pred = r.json()
                    if pred["status"] != "succeeded":
                        raise RuntimeError(f"prediction {pred['status']}: {pred['error']}")
                    outputs.append(pred["output"])

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - start
    return latencies, wall, outputs[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="predictions per mode")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="HTTP clients in parallel")
    ap.add_argument("--size", default="320x240", help="frame size WxH")
    ap.add_argument("--photo", default="coffee", help="scikit-image sample photo")
    ap.add_argument("--model-dir", type=Path, help="ONNX cache dir (default: a temporary one)")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    png = frame(args.photo, (w, h))
    with tempfile.TemporaryDirectory() as tmp:
        classifier = Classifier(ensure_model(args.model_dir or Path(tmp)))
        bench_direct(classifier, png, 10)  # warm up onnxruntime
        rows = []
        lat, wall, out = bench_direct(classifier, png, args.n)
        rows.append(row("direct blip.answer() (baseline)", lat, wall))
        for c in args.concurrency:
            lat, wall, out_http = asyncio.run(bench_http(classifier, png, args.n, c))
            rows.append(row(f"HTTP POST Prefer: wait, {c} client(s)", lat, wall))
            assert out_http == out, (out_http, out)
    print(f"frame: {args.photo} {w}x{h} PNG ({len(png)} bytes); output: {out!r}")
    header = ("mode", "n", "pred/s", "p50 ms", "p99 ms")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, tuple("-" * wd for wd in widths), *rows]:
        print(
            "  ".join(
                cell.ljust(wd) if i == 0 else cell.rjust(wd)
                for i, (cell, wd) in enumerate(zip(r, widths, strict=True))
            )
        )
    direct_p50 = float(rows[0][3])
    for r in rows[1:]:
        print(f"{r[0]}: HTTP overhead at p50 {float(r[3]) - direct_p50:+.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
