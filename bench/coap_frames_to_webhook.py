"""Camera frames over CoAP(S) to a webhook: frames/s, CPU and memory per server (issue 13).

    python bench/coap_frames_to_webhook.py                       # DTLS and plain, baseline, 1, 2
    python bench/coap_frames_to_webhook.py --transports dtls --cases baseline,1 --frames 1000

The CoAP twin of ``bench/frames_to_webhook.py`` (whose frames, verifying sink and /proc helpers
it imports): the same unique ~44 KB PNG frames of 4 cameras (rendered once, cached), uploaded
as ``POST /.s/images`` (Content-Format 23, image/png) in Block1 blocks of 1024 bytes, into a
server that turns each frame into ``pipeline.yaml``'s ``camera-caption`` Replicate request and
POSTs it to the sink (its own process; it checks every body, the token and the frame's
identity). Closed loop: at most ``--window`` frames whose upload started but that the sink has
not seen yet. Each camera uploads over ``--sessions`` CoAP endpoints (with DTLS: that many
DTLS-PSK sessions with the camera's identity), one upload at a time on each (NSTART = 1), so
``cameras x sessions`` uploads are in flight at most. frames/s is taken between the 10% and
90% quantiles of the first arrival times of the measured frames at the sink, after a probe
and ``--warmup`` frames.

Client: aiocoap's client, one ``Context`` per session; for DTLS the simulator's OpenSSL
transport (``device_sim.dtls_transport``, TLS_PSK_WITH_AES_128_GCM_SHA256, 32-byte keys), the
same one the device simulator uses. It runs in this process (the sink is another), and its
CPU per frame is printed: on a 2-core machine it competes with the server under test.

Servers, each started fresh, all in the same run:

* ``baseline``: a bare aiocoap server (aiocoap's Block1 reassembly; for DTLS the router's
  DTLS transport, as ``bench/coap_ingest.py``'s bare server) whose resource answers 2.04 at
  once and POSTs the reassembled frame with a stock ``httpx.AsyncClient`` in a task: no
  durability (a crash loses what was acknowledged and not yet posted);
* ``1``, ``2``, ...: ``pipeline serve --workers N`` with ``pipeline.yaml`` unchanged, the
  Replicate base URL overridden to the sink, ``--rate-limit 0`` (a camera uploads far more
  than the default 20 requests/s): every frame is committed before its 2.04 and delivered at
  least once.

Columns: frames/s, ratio to the baseline of the same transport, server CPU per frame (all its
processes, from /proc), cores used, peak RSS of the largest server process, client CPU per
frame, uploads that failed, frames lost (never seen at the sink), duplicates, bad requests.

``--profile DIR`` runs py-spy on each server process during the measured run (raw collapsed
stacks, one file per process); with ``--profile-gil`` only samples holding the GIL are kept,
which shows where the Python CPU goes (threads waiting in epoll or a lock left out).

Measured here (2 cores shared with other work, so figures move from run to run; the baseline
of each run is its own): before the Block1 fast path (``pipelines/ingest/coap_fastpath.py``)
``serve --workers 1`` took 7.8-9.4 ms of server CPU per frame over DTLS and 8.7-9.7 over plain
CoAP, 0.6-0.7x the bare baseline's CPU; with it 3.1-4.1 ms over DTLS and 3.6-5.5 over plain,
0.3-0.4x the baseline's, every frame delivered, none lost. Of the rest, some 1 ms per frame is
the 43 blocks answered at the datagram (about 17 us each, decryption and encryption included),
the last block through aiocoap, and the remainder the store (writer and checkpointer threads)
and the delivery of the 60 KB Replicate request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from coap_ingest import free_udp_port, psk_for  # noqa: E402
from frames_to_webhook import (  # noqa: E402  # shared frames, sink and /proc helpers
    PREFIX,
    TOKEN,
    VERSION,
    cpu_seconds,
    load_frames,
    peak_rss_mb,
    sink_main,
    steady_rate,
    stop_all,
)

BLOCK_SZX = 6  # 1024-byte blocks
PROJECT = "bench"


def write_registry(path: Path, cameras: int) -> None:
    lines = [f"project_id: {PROJECT}", "devices:"]
    for c in range(cameras):
        lines += [f"  - id: cam-{c}", f'    psk: "{psk_for(f"cam-{c}")}"']
    path.write_text("\n".join(lines) + "\n")


# -- the baseline server -------------------------------------------------------------------

def baseline_main(port: int, dtls: bool, registry: str, url: str, concurrency: int = 64) -> None:
    """Bare aiocoap Block1 server -> httpx POST in a task, answered before the POST: no store."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    for name in ("coap", "coap-server", "httpx"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    async def main() -> None:
        import json
        from base64 import b64encode

        import aiocoap
        import httpx
        from aiocoap import resource

        from pipelines.devices import DeviceRegistry
        from pipelines.ingest.dtls_server import add_dtls_server

        headers = {"Authorization": TOKEN, "Content-Type": "application/json"}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        http = httpx.AsyncClient(limits=limits, timeout=30)
        tasks: set[asyncio.Task] = set()

        async def post(payload: bytes) -> None:
            try:
                body = json.dumps({"version": VERSION, "input": {"image": PREFIX + b64encode(payload).decode()}})
                await http.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                print("baseline POST failed:", exc, file=sys.stderr)

        class Frames(resource.Resource):
            async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
                t = asyncio.create_task(post(request.payload))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                return aiocoap.Message(code=aiocoap.CHANGED)

        site = resource.Site()
        site.add_resource([".s", "images"], Frames())
        if dtls:
            reg = DeviceRegistry.load(registry)
            ctx = aiocoap.Context(serversite=site)
            await add_dtls_server(ctx, ("127.0.0.1", port), lambda: reg)
        else:
            ctx = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port), transports=["udp6"])
        print("ready", flush=True)
        await asyncio.Event().wait()
        await ctx.shutdown()

    asyncio.run(main())


def start_server(case: str, work: Path, port: int, dtls: bool, registry: Path, sink_url: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "REPLICATE_TOKEN": TOKEN}
    log = open(work / f"server-{case}.log", "ab")  # noqa: SIM115  # the child's stderr
    if case == "baseline":
        code = (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import coap_frames_to_webhook as b; "
                f"b.baseline_main({port}, {dtls}, {str(registry)!r}, {sink_url + '/v1/predictions'!r})")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(REPO / "pipeline.yaml"),
               "--store", str(work / "store.db"), "--http-port", "0", "--workers", case,
               "--coap-dtls-port" if dtls else "--coap-port", str(port), "--registry", str(registry),
               "--rate-limit", "0", "--log-level", "WARNING", "--no-watch",
               "--override", f"https://api.replicate.com={sink_url}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log)
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if line.startswith("ready"):
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{case} server did not start: see {log.name}")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``pipeline serve --workers`` starts ingest processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


# -- the cameras (closed loop) --------------------------------------------------------------

class Cameras:
    """``cameras x sessions`` aiocoap client contexts; a session takes the next frame of its
    camera while fewer than ``window`` started frames are not yet seen at the sink."""

    def __init__(self, port: int, dtls: bool, cameras: int, sessions: int, frames: list[tuple[int, bytes]],
                 sink: Any, window: int) -> None:
        self.port, self.dtls, self.cameras, self.sessions = port, dtls, cameras, sessions
        self.frames, self.sink, self.window = frames, sink, window
        self.seen = 0
        self.started = 0
        self.failed = 0
        self.contexts: list[Any] = []
        self.changed = asyncio.Event()

    async def open(self) -> None:
        import aiocoap

        from device_sim.dtls_transport import dtls_client_context

        for s in range(self.cameras * self.sessions):
            cam = s % self.cameras
            if self.dtls:
                ctx = await dtls_client_context(f"cam-{cam}@{PROJECT}".encode(), psk_for(f"cam-{cam}").encode())
            else:
                ctx = await aiocoap.Context.create_client_context()
            self.contexts.append(ctx)
        asyncio.get_running_loop().add_reader(self.sink.fileno(), self._update)

    async def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sink.fileno())
        for ctx in self.contexts:
            await ctx.shutdown()

    def _update(self) -> None:
        while self.sink.poll():
            self.seen = self.sink.recv()
        self.changed.set()

    async def upload(self, session: int, index: int) -> bool:
        import aiocoap
        from aiocoap.optiontypes import BlockOption

        cam, png = self.frames[index]
        scheme, query = ("coaps", "") if self.dtls else ("coap", f"?d=cam-{cam}")
        msg = aiocoap.Message(code=aiocoap.POST, uri=f"{scheme}://127.0.0.1:{self.port}/.s/images{query}",
                              payload=png, content_format=23)
        with warnings.catch_warnings():  # aiocoap's documented way to pick the first block size
            warnings.simplefilter("ignore", DeprecationWarning)
            msg.opt.block1 = BlockOption.BlockwiseTuple(0, False, BLOCK_SZX)
        try:
            answer = await asyncio.wait_for(self.contexts[session].request(msg).response, 30)
        except (Exception, TimeoutError) as exc:  # counted, the run goes on
            print(f"  upload of frame {index} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.failed += 1
            return False
        if answer.code != aiocoap.CHANGED:
            print(f"  upload of frame {index} answered {answer.code}", file=sys.stderr)
            self.failed += 1
            return False
        return True

    async def probe(self, timeout: float = 60.0) -> int:
        """Upload its camera's first frame on every session, one session after another (so the DTLS handshakes
        happen one at a time, before any clock: 16 at once made first uploads time out), until
        one reached the sink; returns how many of these uploads succeeded (the warm-up uploads
        those frames again: the sink counts all but one of them as duplicates)."""
        deadline = time.monotonic() + timeout
        ok = 0
        for s in range(len(self.contexts)):
            ok += await self.upload(s, s % self.cameras)  # the session's camera's first frame
        while not self.seen:
            if time.monotonic() > deadline:
                raise RuntimeError("no frame reached the sink")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)
            self.changed.clear()
            if not self.seen:
                ok += await self.upload(0, 0)
        return ok

    async def run(self, first: int, last: int, stall: float = 10.0) -> None:
        """Upload frames first..last-1 (each by a session of its camera), then wait until the
        sink has seen them all or nothing arrived for ``stall`` seconds."""
        todo: list[list[int]] = [[] for _ in range(self.cameras)]
        for i in range(last - 1, first - 1, -1):
            todo[self.frames[i][0]].append(i)  # popped from the end: in order
        self.started = first
        room = asyncio.Condition()

        async def session(s: int) -> None:
            queue = todo[s % self.cameras]
            while queue:
                async with room:
                    await room.wait_for(lambda: self.started - self.seen < self.window)
                if not queue:
                    return
                index = queue.pop()
                self.started += 1
                await self.upload(s, index)

        async def wake() -> None:
            while True:
                await self.changed.wait()
                self.changed.clear()
                async with room:
                    room.notify_all()

        waker = asyncio.create_task(wake())
        try:
            await asyncio.gather(*(session(s) for s in range(len(self.contexts))))
            while self.seen < last:
                before = self.seen
                await asyncio.sleep(min(stall, 0.2))
                if self.seen == before:
                    try:
                        await asyncio.wait_for(self.changed.wait(), stall)
                    except TimeoutError:
                        return
        finally:
            waker.cancel()


def run_case(case: str, dtls: bool, work: Path, frames: list[tuple[int, bytes]], cameras: int, sessions: int,
             warm: int, window: int, profile: Path | None, gil: bool = False) -> dict[str, Any]:
    registry = work / "devices.yaml"
    write_registry(registry, cameras)
    parent, child = mp.Pipe()
    from tests.mqtt_broker import free_port
    sink_port = free_port()
    sink = mp.get_context("fork").Process(target=sink_main, args=(sink_port, frames, warm, child), daemon=True)
    sink.start()
    if parent.recv() != "ready":
        raise RuntimeError("sink did not start")
    sink_url = f"http://127.0.0.1:{sink_port}"
    port = free_udp_port()
    server = start_server(case, work, port, dtls, registry, sink_url)
    try:
        async def drive() -> dict[str, Any]:
            cams = Cameras(port, dtls, cameras, sessions, frames, parent, window)
            await cams.open()
            try:
                probes = await cams.probe()
                await cams.run(1, warm)
                pids = process_tree(server.pid)
                spies = [] if profile is None else [subprocess.Popen(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(p), "--rate", "200",
                     "--format", "raw", *(["--gil"] if gil else []),
                     "--output", str(profile / f"{'dtls' if dtls else 'coap'}-{case}-{i}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i, p in enumerate(pids)]
                cpu0 = sum(cpu_seconds(p) for p in pids)
                client0 = time.process_time()
                failed0 = cams.failed
                t0 = time.monotonic()
                await cams.run(warm, len(frames))
                wall = time.monotonic() - t0
                cpu = sum(cpu_seconds(p) for p in pids) - cpu0
                client = time.process_time() - client0
                rss = max(peak_rss_mb(p) for p in pids)
                for spy in spies:
                    spy.send_signal(2)
                    spy.wait(30)
                return {"cpu": cpu, "client": client, "wall": wall, "rss": rss, "procs": len(pids),
                        "failed": cams.failed - failed0, "probes": probes}
            finally:
                await cams.close()

        try:
            measured = asyncio.run(drive())
        finally:
            parent.send("stats")
            stats = parent.recv()
            if stats["bad_samples"] or not stats["seen"]:
                print("  sink:", {k: v for k, v in stats.items() if k != "main_arrivals"}, file=sys.stderr)
                for log in sorted(work.glob("*.log")):
                    print(f"  --- {log.name} (tail)\n", log.read_text(errors="replace")[-1500:], file=sys.stderr)
    finally:
        stop_all([server], parent, sink)
    arrivals = sorted(stats["main_arrivals"])
    rate = steady_rate(arrivals)
    n = max(1, len(arrivals))
    return {"case": case, "dtls": dtls, "rate": rate, "cpu_ms": 1000 * measured["cpu"] / n,
            "cores": measured["cpu"] / measured["wall"], "rss": measured["rss"], "procs": measured["procs"],
            "client_ms": 1000 * measured["client"] / n, "failed": measured["failed"],
            "lost": len(frames) - warm - len(arrivals), "dups": stats["duplicates"] - max(0, measured["probes"] - 1),
            "bad": stats["bad"],
            "bad_samples": stats["bad_samples"]}


def label(case: str, dtls: bool) -> str:
    t = "CoAPS (DTLS-PSK)" if dtls else "plain CoAP"
    if case == "baseline":
        return f"{t}: bare aiocoap -> httpx POST (no durability)"
    return f"{t}: pipeline serve --workers {case} (durable)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=800, help="frames in the measured run")
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--sessions", type=int, default=1,
                    help="CoAP endpoints (DTLS sessions) per camera; above 1, sessions after the first of an"
                         " identity time out (seen here, not investigated)")
    ap.add_argument("--warmup", type=int, default=100, help="frames before the measured run")
    ap.add_argument("--window", type=int, default=200, help="frames started but not yet at the sink")
    ap.add_argument("--cases", default="baseline,1,2", help="comma-separated: baseline, N (serve --workers N)")
    ap.add_argument("--transports", default="dtls,coap", help="comma-separated: dtls, coap")
    ap.add_argument("--rounds", type=int, default=1, help="run every case this many times; medians are shown")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="py-spy record (raw collapsed stacks) each server process during the measured run")
    ap.add_argument("--profile-gil", action="store_true",
                    help="with --profile: only samples holding the GIL (the Python CPU; idle waits left out)")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    transports = [t == "dtls" for t in args.transports.split(",") if t]
    total = args.frames + args.warmup
    frames = load_frames(args.cameras, -(-total // args.cameras))[:total]
    size = sum(len(p) for _, p in frames) / len(frames)
    runs: dict[tuple[bool, str], list[dict[str, Any]]] = {(t, c): [] for t in transports for c in cases}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            keys = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
            for dtls, case in keys:
                work = Path(tmp) / f"{'dtls' if dtls else 'coap'}-{case}-{round_}"
                work.mkdir()
                print(f"running {label(case, dtls)} (round {round_ + 1}) ...", flush=True)
                r = run_case(case, dtls, work, frames, args.cameras, args.sessions, args.warmup, args.window,
                             args.profile, args.profile_gil)
                runs[(dtls, case)].append(r)
                print(f"  {r['rate']:.0f} frames/s, server {r['cpu_ms']:.2f} CPU ms/frame, "
                      f"client {r['client_ms']:.2f}", flush=True)
                if r["bad_samples"]:
                    print("  bad requests:", r["bad_samples"])
                if r["lost"]:
                    for log in sorted(work.glob("*.log")):
                        print(f"  --- {log.name} (tail)\n", log.read_text(errors="replace")[-1500:])
    results = []
    for (dtls, case), rs in runs.items():
        results.append({"dtls": dtls, "case": case, "rate": statistics.median(r["rate"] for r in rs),
                        "cpu_ms": statistics.median(r["cpu_ms"] for r in rs),
                        "cores": statistics.median(r["cores"] for r in rs),
                        "client_ms": statistics.median(r["client_ms"] for r in rs),
                        "rss": max(r["rss"] for r in rs), "failed": sum(r["failed"] for r in rs),
                        "lost": sum(r["lost"] for r in rs), "dups": sum(r["dups"] for r in rs),
                        "bad": sum(r["bad"] for r in rs)})
    print(f"\n{args.frames} frames of {size / 1024:.1f} KB on average (after {args.warmup} warm-up), "
          f"median of {args.rounds} round(s) in alternating order; {args.cameras} cameras x {args.sessions} "
          f"sessions, Block1 {1 << (BLOCK_SZX + 4)} B, at most {args.window} in flight; loopback; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {time.monotonic() - started:.0f} s\n")
    head = (f"{'server':<56}{'frames/s':>9}{'ratio':>8}{'CPU ms/f':>10}{'cores':>7}{'peak RSS MB':>12}"
            f"{'client ms/f':>12}{'failed':>7}{'lost':>6}{'dups':>6}{'bad':>5}")
    print(head)
    print("-" * len(head))
    for r in results:
        base = next((b["rate"] for b in results if b["case"] == "baseline" and b["dtls"] == r["dtls"]), None)
        ratio = f"{r['rate'] / base:.2f}x" if base else "-"
        print(f"{label(r['case'], r['dtls']):<56}{r['rate']:>9.0f}{ratio:>8}{r['cpu_ms']:>10.2f}{r['cores']:>7.2f}"
              f"{r['rss']:>12.0f}{r['client_ms']:>12.2f}{r['failed']:>7}{r['lost']:>6}{r['dups']:>6}{r['bad']:>5}")
    print("\nmedians over the rounds; failed, lost, dups and bad: totals; CPU ms/f: server CPU (all its processes)"
          " per frame delivered; client ms/f: this process (the cameras), which shares the 2 cores")


if __name__ == "__main__":
    main()
