"""Benchmark: N cameras → router (CoAP/DTLS) → local predictions service → back to each camera.

Three processes, as in production: the predictions service, the router (CoAP over DTLS,
the default pipeline.yaml, durable store, HTTP face for the prediction callbacks) and the
cameras (device_sim, each with its own DTLS endpoint, observing /.d/result). Prints
frames/s, p50/p99 frame-to-answer latency, and the router's CPU and memory read from
/proc. The baseline, measured in the same run against the same service: the same frames
POSTed straight to the predictions API in sync mode (Prefer: wait), i.e. the model and
HTTP alone; the difference is what the router, CoAP and the callback loop add.

    python bench/end_to_end.py [--cameras 20] [--fps 1] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

VERSION = "2e1dddc8621f72155f24cf2e0adbde548458d3cab9f00c0139eea840d0ac4746"
CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


def proc_memory_mb(pid: int) -> tuple[float, float]:
    rss = hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


# -- the router process -----------------------------------------------------------------

async def router_child(args: argparse.Namespace) -> None:
    from pipelines.ingest.coap import CoapSettings
    from pipelines.router import RouterSettings
    from pipelines.service import RouterService, ServiceSettings

    settings = ServiceSettings(
        router=RouterSettings(pipelines=[ROOT / "pipeline.yaml"], store_path=Path(args.data) / "store.db",
                              url_overrides={"https://api.replicate.com": args.api}),
        http_port=0, webhook_secret=os.environ["BENCH_WEBHOOK_SECRET"],
        coap=CoapSettings(host="127.0.0.1", dtls_port=0, registry_path=Path(args.data) / "devices.yaml"))
    async with RouterService(settings) as service:
        print(f"ready {service.coap_dtls_port}", flush=True)
        await asyncio.Event().wait()


# -- the bench --------------------------------------------------------------------------

async def wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = await asyncio.to_thread(proc.stdout.readline)
        if line.startswith(prefix):
            return line.strip()
        if proc.poll() is not None:
            raise RuntimeError(f"child exited ({proc.returncode}) before saying {prefix!r}")
    raise TimeoutError(prefix)


async def direct_baseline(api: str, token: str, frames: list[bytes], n: int) -> list[float]:
    """Sync predictions straight to the API: the model + HTTP, no router."""
    lat = []
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(n):
            png = frames[i % len(frames)]
            body = {"version": VERSION, "input": {"image": "data:image/png;base64," + base64.b64encode(png).decode()}}
            t0 = time.perf_counter()
            r = await client.post(f"{api}/v1/predictions", json=body,
                                  headers={"Authorization": f"Bearer {token}", "Prefer": "wait=30"})
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
    return lat


async def main(args: argparse.Namespace) -> None:
    from device_sim.camera import CameraConfig
    from device_sim.fleet import Fleet
    from device_sim.frames import FrameSource
    from device_sim.identity import fleet_identities, write_registry

    token = "bench-" + secrets.token_hex(8)
    from predictions_service.settings import new_webhook_secret
    whsec = new_webhook_secret()
    env = {**os.environ, "PREDICTIONS_API_TOKENS": token, "PREDICTIONS_WEBHOOK_SECRET": whsec,
           "BENCH_WEBHOOK_SECRET": whsec, "PYTHONUNBUFFERED": "1", "REPLICATE_TOKEN": f"Bearer {token}"}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as data:
        identities = fleet_identities(args.cameras, seed=11, project_id="demo")
        write_registry(Path(data) / "devices.yaml", identities)
        api_port = 18000 + os.getpid() % 2000
        api_proc = subprocess.Popen([sys.executable, "-m", "predictions_service", "serve", "--port", str(api_port),
                                     "--log-level", "warning"], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        api = f"http://127.0.0.1:{api_port}"
        router_proc = None
        try:
            async with httpx.AsyncClient() as c:
                for _ in range(300):
                    try:
                        if (await c.get(f"{api}/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
            router_proc = subprocess.Popen([sys.executable, __file__, "--router-child", "--data", data, "--api", api],
                                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                           text=True)
            port = int((await wait_line(router_proc, "ready")).split()[1])

            src = FrameSource("coffee", seed=1, label="bench")
            frames = [src.render(i, datetime.now(UTC)).payload for i in range(8)]
            base = await direct_baseline(api, token, frames, 40)

            interval = 1.0 / args.fps
            fleet = Fleet(identities, CameraConfig(host="127.0.0.1", port=port, interval=interval, jitter=0.1),
                          seed=11)
            cpu0, t0 = proc_cpu_seconds(router_proc.pid), time.monotonic()
            peak_rss = 0.0
            async with fleet:
                await asyncio.sleep(args.warmup)
                for cam in fleet.cameras:
                    cam.stats.latencies.clear()
                answered0 = fleet.totals()["frames_answered"]
                cpu0, t0 = proc_cpu_seconds(router_proc.pid), time.monotonic()
                api_cpu0, cams_cpu0 = proc_cpu_seconds(api_proc.pid), time.process_time()
                while time.monotonic() - t0 < args.seconds:
                    await asyncio.sleep(1)
                    peak_rss = max(peak_rss, proc_memory_mb(router_proc.pid)[0])
                elapsed = time.monotonic() - t0
                cpu = proc_cpu_seconds(router_proc.pid) - cpu0
                api_cpu = proc_cpu_seconds(api_proc.pid) - api_cpu0
                cams_cpu = time.process_time() - cams_cpu0
                totals = fleet.totals()
                answered = totals["frames_answered"] - answered0
                lat = [x for cam in fleet.cameras for x in cam.stats.latencies]
            rss, hwm = proc_memory_mb(router_proc.pid)
        finally:
            for p in (router_proc, api_proc):
                if p is not None:
                    p.terminate()
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
    sizes = sorted(len(f) for f in frames)
    print(f"{args.cameras} cameras at {args.fps:g} frame/s each for {args.seconds:g} s after {args.warmup:g} s warm-up;"
          f" PNG frames {sizes[0] // 1024}-{sizes[-1] // 1024} KB; CoAP/DTLS, 1024-byte blocks; "
          f"{os.cpu_count()} cpus shared by cameras, router and model")
    print()
    print("| measurement                                  | frames/s | p50 ms | p99 ms |")
    print("|----------------------------------------------|----------|--------|--------|")
    print(f"| baseline: sync prediction straight to the API | {len(base) / sum(base):8.1f} |"
          f" {pct(base, 0.5) * 1000:6.0f} | {pct(base, 0.99) * 1000:6.0f} |")
    if lat:
        print(f"| cameras → router → predictions → camera      | {answered / elapsed:8.1f} |"
              f" {pct(lat, 0.5) * 1000:6.0f} | {pct(lat, 0.99) * 1000:6.0f} |")
    print()
    print(f"router process: CPU {cpu / elapsed * 100:.0f}% of one core ({cpu / max(answered, 1) * 1000:.1f} ms/frame),"
          f" RSS {rss:.0f} MB now, {max(peak_rss, rss):.0f} MB peak sampled, high-water {hwm:.0f} MB")
    print(f"other processes: cameras {cams_cpu / elapsed * 100:.0f}% of one core, predictions service"
          f" {api_cpu / elapsed * 100:.0f}%; the machine has {os.cpu_count()} cores for all three")
    print(f"frames: {totals['frames_sent']} sent, {totals['frames_acked']} acknowledged, "
          f"{totals['frames_answered']} answered, {totals['errors']} errors")
    if lat:
        print(f"targets: 20 cameras at 1 frame/s with p99 < 500 ms: p99 = {pct(lat, 0.99) * 1000:.0f} ms;"
              f" router memory < 300 MB: {hwm:.0f} MB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cameras", type=int, default=20)
    ap.add_argument("--fps", type=float, default=1.0, help="frames per second per camera")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--router-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--api", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.router_child:
        asyncio.run(router_child(a))
    else:
        asyncio.run(main(a))
