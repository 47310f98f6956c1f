"""Benchmark: the predictions service over HTTP vs calling the model directly, same run.

    python bench/predictions.py --model-dir ~/.cache/iot-pipelines [--n 300] [--concurrency 1 4]
                                [--workers 2] [--block 25] [--size 320x240] [--photo coffee]

The service runs as a user runs it: its own process, started through the real CLI
(``python -m predictions_service serve``) on loopback, with the model dir given here (default: a
temporary one, where the model is built first). This process times ``blip.answer()`` directly
(the baseline: decode the PNG, resize/crop, EfficientNet-Lite0 on onnxruntime, phrase a caption)
and drives the service in three modes:

- sync, lean client: ``POST /v1/predictions`` with ``Prefer: wait`` over keep-alive raw asyncio
  streams, on uvloop when installed. The request bytes are encoded once, as a camera gateway
  sending frames would: the time measured is the service's and loopback's, not this client's.
- sync, httpx: the same through ``httpx.AsyncClient.post(json=body)`` and ``.json()`` on asyncio's
  own loop, to show what a typical Python client adds (encoding the ~56 KB body each time, httpx).
- async: create without ``Prefer: wait`` but with a ``webhook`` (events filter ``["completed"]``)
  to a small receiver in this process; latency is create sent -> signed completed webhook read.
  And the same create followed by ``GET /v1/predictions/{id}`` every 2 ms until it is done.

Floor rows show what each client costs by itself: the same request against a canned server
(its own process, uvloop) that waits as long as a direct call takes (p50 of 50 calls made just
before, as if a model ran) and then answers with the bytes the service answered, with no model
and no service behind it. Their overhead is p50 minus that wait: the client's own cost (and a
timer's wake-up), measured as it is with the service, after the client idled for a model's time
(the same code costs far more CPU then than back to back, on a shared machine). A mode's
overhead minus its client's floor is the service's own share (rough: the load moves between rows).
A third floor row puts the httpx client against the service's HTTP stack without the service:
uvicorn (httptools, uvloop) and a starlette route that parses the JSON body, holds the loop for
the same wait and answers the service's bytes: what the stack costs before any of our code runs.
On the 2-core VM this was written on, the httpx client's floor alone is ~20-25 % of bare (its
``json=`` encoding and request building before the send, h11 and ``Response`` after the answer),
so the httpx row cannot get under the 20 % target whatever the service does; the lean client's
floor is ~5 %.

Then a second table with the official ``replicate`` client (``--client-n`` calls each, 0 skips it):
``run()`` with a data URL (its baseline) against ``run()`` with an open file (uploaded through the
Files API first), and ``stream()``: time to the first output token against the whole answer.

Columns: ``bare p50`` is the p50 of direct calls interleaved with that mode in blocks of
``--block`` (the machine is shared, so baseline and mode see the same load); ``overhead`` = mode
p50 - bare p50, also as % of bare (the target: under 20 %); ``predict_time`` is the service's own
``metrics.predict_time`` (image decode and model, plus the hops to a pool thread and back when the
run is not inline: a lone held prediction of a small image runs on the service's event loop thread,
see ``predictions_service/runner.py``); ``svc CPU`` is the service
process's CPU per prediction (from /proc), ``client CPU`` this process's. With more than one
request in flight the p50 includes queueing for the ``--workers`` model threads, so only
predictions/s is meaningful there. Every output must equal the direct output.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from predictions_service import blip
from predictions_service.model import Classifier, ensure_model

ROOT = Path(__file__).resolve().parent.parent

TOKEN = "bench"
TARGET_OVERHEAD = 0.20


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


# -- the service, as its own process ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service(model_dir: Path, workers: int) -> Iterator[tuple[str, int, int]]:
    """``python -m predictions_service serve`` on a free port; yields (host, port, pid) once /healthz
    answers."""
    port = free_port()
    # PYTHONPATH: the repo last, so PYTHONPATH=/other/checkout benchmarks another version of the service.
    paths = [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PREDICTIONS_API_TOKENS": TOKEN}
    cmd = [
        sys.executable, "-m", "predictions_service", "serve", "--port", str(port),
        "--model-dir", str(model_dir), "--workers", str(workers), "--log-level", "warning",
        "--create-rate", str(10**9), "--other-rate", str(10**9),
    ]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, env=env, cwd=tempfile.gettempdir(), stdout=errors, stderr=errors)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    errors.seek(0)
                    raise RuntimeError(f"service exited with {proc.returncode}: {errors.read().decode()[-2000:]}")
                with contextlib.suppress(OSError):
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/healthz")
                    if conn.getresponse().status == 200:
                        conn.close()
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("service did not answer /healthz within 60 s")
                time.sleep(0.05)
            yield "127.0.0.1", port, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux; 0 where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- a lean HTTP/1.1 client: pre-encoded requests, keep-alive, Content-Length framing ------------


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        return cls(*await asyncio.open_connection(host, port))

    async def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(request)
        return await read_message(self.reader)

    def close(self) -> None:
        self.writer.close()


async def read_message(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 message with a Content-Length body: (status or 0 for a request, headers, body)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    first = head[0].split(" ", 2)
    status = int(first[1]) if first[0].startswith("HTTP/") else 0
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def post_bytes(host: str, port: int, path: str, body: dict, headers: dict[str, str]) -> bytes:
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


# -- modes ----------------------------------------------------------------------------------------


PREDICT_TIMES: list[float] = []  # metrics.predict_time of the answers read in the current mode


@dataclass
class Result:
    latencies: list[float]  # seconds, one per prediction through the service (or direct call)
    wall: float  # seconds spent on those predictions, for predictions/s
    output: str
    bare: list[float] = field(default_factory=list)  # direct calls interleaved with this mode
    service_cpu: float = 0.0  # CPU seconds of the service process per prediction
    bare_cpu: float = 0.0  # CPU seconds of one interleaved direct call
    client_cpu: float = 0.0  # CPU seconds of this process per prediction (service calls only)
    predict_times: list[float] = field(default_factory=list)  # the service's metrics.predict_time
    floor: float | None = None  # a canned answer after this many seconds, no service (the floor rows)
    floor_kind: str = ""  # whose floor: "lean", "httpx", or "stack" (httpx on uvicorn+starlette)


class Direct:
    """``blip.answer()`` in this process: the baseline every mode is compared with."""

    def __init__(self, classifier: Classifier, png: bytes) -> None:
        self.classifier, self.png = classifier, png

    def one(self) -> tuple[float, str]:
        t = time.perf_counter()
        out = blip.answer(self.classifier, self.png, "image_captioning", None, None).output
        return time.perf_counter() - t, out

    def run(self, n: int) -> Result:
        cpu, start = time.process_time(), time.perf_counter()
        results = [self.one() for _ in range(n)]
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return Result([r[0] for r in results], wall, results[-1][1], service_cpu=cpu / n)


async def measure(n: int, concurrency: int, one, pid: int, direct: Direct, block: int) -> Result:
    """``concurrency`` workers run ``one(worker)`` (-> latency, output) until n predictions are done.

    With one in flight, blocks of ``block`` direct calls alternate with blocks of ``block``
    predictions through the service, so both see the same load on a shared machine; the mode's
    overhead is judged against its own interleaved direct calls.
    """
    for _ in range(3):  # warm up: connections, the service's code paths
        await one(0)
    PREDICT_TIMES.clear()
    latencies: list[float] = []
    outputs: list[str] = []
    bare: list[float] = []
    wall = cpu = svc_cpu = bare_cpu = 0.0

    async def worker(i: int, todo: Iterator[int]) -> None:
        for _ in todo:
            latency, output = await one(i)
            latencies.append(latency)
            outputs.append(output)

    while len(latencies) < n:
        size = min(block, n - len(latencies)) if concurrency == 1 else n
        if concurrency == 1:
            mine = time.process_time()
            for _ in range(size):
                latency, output = direct.one()
                bare.append(latency)
                outputs.append(output)
            bare_cpu += time.process_time() - mine
        svc, mine, start = cpu_seconds(pid), time.process_time(), time.perf_counter()
        todo = iter(range(size))
        await asyncio.gather(*(worker(i, todo) for i in range(concurrency)))
        wall += time.perf_counter() - start
        cpu += time.process_time() - mine
        svc_cpu += cpu_seconds(pid) - svc
    if len(set(outputs)) != 1:
        raise AssertionError(f"HTTP output differs from the direct output: {sorted(set(outputs))[:3]}")
    return Result(latencies, wall, outputs[-1], bare, svc_cpu / n, bare_cpu / n, cpu / n, PREDICT_TIMES[:])


def succeeded(body: bytes) -> str:
    pred = json.loads(body)
    if pred["status"] != "succeeded":
        raise RuntimeError(f"prediction {pred['status']}: {pred['error']}")
    PREDICT_TIMES.append(pred["metrics"]["predict_time"])
    return pred["output"]


async def sync_lean(host: str, port: int, body: dict, concurrency: int, run) -> Result:
    request = post_bytes(host, port, "/v1/predictions", body, {"Authorization": f"Bearer {TOKEN}", "Prefer": "wait"})
    conns = [await Conn.open(host, port) for _ in range(concurrency)]

    async def one(i: int) -> tuple[float, str]:
        t = time.perf_counter()
        status, _, answer = await conns[i].exchange(request)
        latency = time.perf_counter() - t
        if status != 201:
            raise RuntimeError(f"HTTP {status}: {answer[:300]!r}")
        return latency, succeeded(answer)  # decoding the answer is the client's business: not timed

    try:
        return await run(one)
    finally:
        for c in conns:
            c.close()


async def sync_httpx(host: str, port: int, body: dict, concurrency: int, run) -> Result:
    headers = {"Authorization": f"Bearer {TOKEN}", "Prefer": "wait"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=f"http://{host}:{port}", headers=headers, timeout=60, limits=limits
    ) as client:

        async def one(i: int) -> tuple[float, str]:
            t = time.perf_counter()
            r = await client.post("/v1/predictions", json=body)
            pred = r.json()  # as a typical client does, inside the timed call
            latency = time.perf_counter() - t
            if pred.get("status") != "succeeded":
                raise RuntimeError(f"HTTP {r.status_code}: {pred}")
            PREDICT_TIMES.append(pred["metrics"]["predict_time"])
            return latency, pred["output"]

        return await run(one)


class WebhookReceiver:
    """A keep-alive HTTP server that notes when each prediction's webhook arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, tuple[float, bytes]] = {}
        self.waiters: dict[str, asyncio.Future] = {}
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                _, headers, body = await read_message(reader)
                t = time.perf_counter()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                pred_id = json.loads(body)["id"]
                if "webhook-signature" not in headers:
                    body = b'{"status": "failed", "error": "the webhook came without a signature"}'
                self.arrived[pred_id] = (t, body)
                waiter = self.waiters.pop(pred_id, None)
                if waiter and not waiter.done():
                    waiter.set_result(None)
        self.writers.discard(writer)
        writer.close()

    async def wait(self, pred_id: str) -> tuple[float, bytes]:
        if pred_id not in self.arrived:
            self.waiters[pred_id] = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.waiters[pred_id], 60)
        return self.arrived.pop(pred_id)

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()  # ends the handlers (keep-alive connections of the service's webhook client)
        if self.server:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


async def create(conn: Conn, request: bytes) -> str:
    """Send a prepared create request without Prefer: wait; the new prediction's Location."""
    status, headers, answer = await conn.exchange(request)
    if status != 201:
        raise RuntimeError(f"HTTP {status}: {answer[:300]!r}")
    return headers["location"]


async def async_webhook(host: str, port: int, body: dict, concurrency: int, run) -> Result:
    receiver = WebhookReceiver()
    hook_port = await receiver.start()
    body = {**body, "webhook": f"http://127.0.0.1:{hook_port}/hook", "webhook_events_filter": ["completed"]}
    request = post_bytes(host, port, "/v1/predictions", body, {"Authorization": f"Bearer {TOKEN}"})
    conns = [await Conn.open(host, port) for _ in range(concurrency)]

    async def one(i: int) -> tuple[float, str]:
        t = time.perf_counter()
        location = await create(conns[i], request)
        pred_id = location.rsplit("/", 1)[1]  # no need to decode the 56 KB answer for it
        arrived, hook_body = await receiver.wait(pred_id)
        return arrived - t, succeeded(hook_body)

    try:
        return await run(one)
    finally:
        for c in conns:
            c.close()
        await receiver.close()


POLL_INTERVAL = 0.002  # seconds between GETs (Replicate's clients wait 0.5 s: far coarser)


async def async_poll(host: str, port: int, body: dict, concurrency: int, run) -> Result:
    request = post_bytes(host, port, "/v1/predictions", body, {"Authorization": f"Bearer {TOKEN}"})
    conns = [await Conn.open(host, port) for _ in range(concurrency)]

    async def one(i: int) -> tuple[float, str]:
        t = time.perf_counter()
        path = (await create(conns[i], request)).split("/", 3)[3]
        get = f"GET /{path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            status, _, answer = await conns[i].exchange(get)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {answer[:300]!r}")
            if json.loads(answer)["status"] not in ("starting", "processing"):
                return time.perf_counter() - t, succeeded(answer)

    try:
        return await run(one)
    finally:
        for c in conns:
            c.close()


CANNED_SERVER = r"""
import asyncio, sys, time
answer = sys.stdin.buffer.read()  # the whole HTTP response, sent for every request
delay = float(sys.argv[1])  # seconds between reading a request and answering it


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            time.sleep(delay)  # blocking, but one request is in flight: nanosleep's precision, not the loop's ms
            writer.write(answer)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


# The same canned answer from the service's own HTTP stack, with none of the service: uvicorn
# (httptools, uvloop) and a starlette route that reads the JSON body, holds the loop for the wait
# (as an inline run does) and answers the service's status, headers and body.
STACK_SERVER = r"""
import json, socket, sys, time
import uvicorn, uvloop
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

answer = sys.stdin.buffer.read()
delay = float(sys.argv[1])
head, _, payload = answer.partition(b"\r\n\r\n")
status = int(head.split(b" ", 2)[1])
skip = {b"content-length", b"content-type", b"date", b"server"}
headers = {k.decode(): v.strip().decode() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
           if k.lower() not in skip}


async def create(request):
    json.loads(await request.body())
    time.sleep(delay)
    return Response(payload, status_code=status, media_type="application/json", headers=headers)


app = Starlette(routes=[Route("/v1/predictions", create, methods=["POST"])])
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
config = uvicorn.Config(app, log_level="warning", access_log=False, http="httptools", lifespan="off")
uvloop.run(uvicorn.Server(config).serve(sockets=[sock]))
"""


@contextlib.contextmanager
def canned_server(host: str, port: int, body: dict, delay: float,
                  script: str = CANNED_SERVER) -> Iterator[tuple[int, int]]:
    """A server in its own process answering every request ``delay`` seconds after reading it with
    the bytes the service answered to one ``Prefer: wait`` create (same status, headers and body);
    yields (port, pid). ``script``: ``CANNED_SERVER`` (raw asyncio streams) or ``STACK_SERVER``."""

    async def capture() -> bytes:
        conn = await Conn.open(host, port)
        try:
            request = post_bytes(host, port, "/v1/predictions", body,
                                 {"Authorization": f"Bearer {TOKEN}", "Prefer": "wait"})
            status, headers, answer = await conn.exchange(request)
        finally:
            conn.close()
        succeeded(answer)
        lines = [f"HTTP/1.1 {status} {http.client.responses[status]}", *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + answer

    response = asyncio.run(capture())
    proc = subprocess.Popen([sys.executable, "-c", script, str(delay)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(response)
        proc.stdin.close()
        yield int(proc.stdout.readline()), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


# (label, mode, lean): lean modes run on uvloop when it is installed (a dependency of the service),
# so the client's own reading costs little; the httpx row stays on asyncio's loop, as typical code.
MODES = [
    ("sync  Prefer: wait, lean client", sync_lean, True),
    ("sync  Prefer: wait, httpx client", sync_httpx, False),
    ("async create -> completed webhook", async_webhook, True),
    (f"async create -> GET every {POLL_INTERVAL * 1000:g} ms", async_poll, True),
]


# (label, mode, lean, server script, kind): kind names the client whose floor it is ("stack": the
# httpx client against the service's HTTP stack without the service)
FLOORS = [
    ("floor: lean client, canned answer", sync_lean, True, CANNED_SERVER, "lean"),
    ("floor: httpx client, canned answer", sync_httpx, False, CANNED_SERVER, "httpx"),
    ("floor: httpx client, uvicorn+starlette, canned", sync_httpx, False, STACK_SERVER, "stack"),
]


def lean_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# -- the official replicate client: file inputs and streaming -------------------------------------


def bench_official_client(host: str, port: int, png: bytes, n: int, block: int) -> list[tuple[str, list[float]]]:
    """What a user of the official client (``replicate`` 1.0.7, httpx underneath) sees, in this
    process, each way interleaved in blocks so all see the same load:

    - ``run()`` with a data URL (one create with ``Prefer: wait``; the baseline of this table);
    - ``run()`` with an open file (the client uploads it to ``POST /v1/files``, then creates with
      the file's URL, which the service reads from disk);
    - ``stream()``: time to the first ``output`` event, and to ``done`` (the whole answer).
    """
    import io

    from replicate import Client

    client = Client(api_token=TOKEN, base_url=f"http://{host}:{port}")
    ref = f"{blip.MODEL}:{blip.VERSION}"
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()

    def run_data_url() -> tuple[float, str]:
        t = time.perf_counter()
        out = client.run(ref, input={"image": data_url})
        return time.perf_counter() - t, out

    def run_file() -> tuple[float, str]:
        t = time.perf_counter()
        out = client.run(ref, input={"image": io.BytesIO(png)})
        return time.perf_counter() - t, out

    first_token: list[float] = []

    def stream() -> tuple[float, str]:
        t = time.perf_counter()
        pieces = []
        for event in client.stream(ref, input={"image": data_url}):
            if event.event.value == "output":
                if not pieces:
                    first_token.append(time.perf_counter() - t)
                pieces.append(str(event))
        return time.perf_counter() - t, "".join(pieces)

    ways = [("run(), data URL input (baseline)", run_data_url), ("run(), open file input (Files API)", run_file),
            ("stream(), whole answer (to done)", stream)]
    times: dict[str, list[float]] = {name: [] for name, _ in ways}
    outputs = set()
    for fn in (w[1] for w in ways):  # warm up: connections, code paths
        fn()
    first_token.clear()
    while len(times[ways[0][0]]) < n:
        for name, fn in ways:
            for _ in range(min(block, n - len(times[name]))):
                latency, out = fn()
                times[name].append(latency)
                outputs.add(out)
    if len(outputs) != 1:
        raise AssertionError(f"outputs differ between the ways of calling: {sorted(outputs)}")
    return [*times.items(), ("stream(), first output token", first_token)]


def print_client_table(rows: list[tuple[str, list[float]]]) -> None:
    base = pct(rows[0][1], 0.5)
    header = ("official client (replicate 1.0.7)", "n", "p50 ms", "p99 ms", "vs baseline")
    cells = [header] + [
        (name, str(len(v)), ms(pct(v, 0.5)), ms(pct(v, 0.99)), f"{pct(v, 0.5) / base:.2f}x") for name, v in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    stream = dict(rows)
    ttft, whole = pct(stream["stream(), first output token"], 0.5), pct(stream["stream(), whole answer (to done)"], 0.5)
    print(f"streaming: first token at {ms(ttft)} ms, whole answer at {ms(whole)} ms "
          f"(p50; first/whole = {ttft / whole:.2f})")


# -- table ----------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def row(name: str, r: Result) -> tuple[str, ...]:
    n = len(r.latencies)
    p50 = pct(r.latencies, 0.5)
    cells = [name, str(n), f"{n / r.wall:.1f}", ms(p50), ms(pct(r.latencies, 0.99))]
    if r.bare:
        bare = pct(r.bare, 0.5)
        over = p50 - (bare if r.floor is None else r.floor)  # a floor: all but its wait is overhead
        cells += [ms(bare), f"{over * 1000:+.2f}", f"{over / bare:+.0%}"]
    else:
        cells += ["", "", ""]
    cells += [ms(pct(r.predict_times, 0.5)) if r.predict_times and r.floor is None else ""]
    cells += [ms(r.service_cpu), ms(r.client_cpu) if r.client_cpu else ""]
    return tuple(cells)


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("mode", "n", "pred/s", "p50 ms", "p99 ms", "bare p50", "overhead ms", "% of bare",
              "predict_time", "svc CPU ms", "client CPU ms")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * wd for wd in widths), *rows]:
        print(
            "  ".join(
                cell.ljust(wd) if i == 0 else cell.rjust(wd)
                for i, (cell, wd) in enumerate(zip(r, widths, strict=True))
            )
        )


def bench_service(host: str, port: int, pid: int, png: bytes, direct: Direct, args) -> list[tuple[str, Result]]:
    body = {"version": blip.VERSION, "input": {"image": "data:image/png;base64," + base64.b64encode(png).decode()}}
    results = []
    for label, mode, lean in MODES:
        for c in args.concurrency:

            async def run(one, c=c):
                return await measure(args.n, c, one, pid, direct, args.block)

            with asyncio.Runner(loop_factory=lean_loop() if lean else None) as runner:
                results.append((f"{label}, {c} in flight", runner.run(mode(host, port, body, c, run))))
    model_time = pct(direct.run(50).latencies, 0.5)  # as loaded as the machine is now
    for label, mode, lean, script, kind in FLOORS:
        with canned_server(host, port, body, model_time, script) as (canned_port, canned_pid):

            async def run_floor(one, canned_pid=canned_pid):
                return await measure(args.n, 1, one, canned_pid, direct, args.block)

            with asyncio.Runner(loop_factory=lean_loop() if lean else None) as runner:
                r = runner.run(mode(host, canned_port, body, 1, run_floor))
        r.floor, r.floor_kind = model_time, kind
        results.append((f"{label} after {ms(model_time)} ms", r))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="predictions per mode")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="requests in flight")
    ap.add_argument("--size", default="320x240", help="frame size WxH")
    ap.add_argument("--photo", default="coffee", help="scikit-image sample photo")
    ap.add_argument("--model-dir", type=Path, help="ONNX cache dir (default: a temporary one)")
    ap.add_argument("--workers", type=int, default=2, help="the service's model threads (--workers)")
    ap.add_argument("--block", type=int, default=25, help="direct calls and predictions alternate in blocks of this")
    ap.add_argument("--client-n", type=int, default=100,
                    help="calls per way with the official replicate client (0: skip that table)")
    args = ap.parse_args()
    if 1 not in args.concurrency:
        args.concurrency.insert(0, 1)  # the overhead target is judged with one request in flight
    w, h = (int(v) for v in args.size.split("x"))
    png = frame(args.photo, (w, h))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp)
        direct = Direct(Classifier(ensure_model(model_dir)), png)
        direct.run(20)  # warm up onnxruntime
        with service(model_dir, args.workers) as (host, port, pid):
            baseline = direct.run(args.n)
            results = bench_service(host, port, pid, png, direct, args)
            client_rows = bench_official_client(host, port, png, args.client_n, args.block) if args.client_n else []
    out = baseline.output
    for name, r in results:
        assert r.output == out, f"{name}: HTTP output {r.output!r} != direct output {out!r}"
    print(
        f"frame: {args.photo} {w}x{h} PNG ({len(png)} bytes); output: {out!r}; service: "
        f"python -m predictions_service --workers {args.workers}; lean clients on "
        f"{'uvloop' if lean_loop() else 'asyncio'}; load: {os.getloadavg()[0]:.2f}"
    )
    print_table([row("direct blip.answer() (baseline)", baseline), *(row(name, r) for name, r in results)])
    print("bare p50: direct calls interleaved with that mode (blocks of --block); predict_time: p50 of the "
          "service's own metrics.predict_time (processing -> succeeded: image decode, model, thread hops if "
          "not inline); "
          "svc CPU: service process CPU per prediction (direct row: the call's own CPU)")
    floors = {"lean": 0.0, "httpx": 0.0, "stack": 0.0}
    for _, r in results:
        if r.floor is not None:
            floors[r.floor_kind] = (pct(r.latencies, 0.5) - r.floor) / pct(r.bare, 0.5)
    for name, r in results:
        if not r.bare or r.floor is not None:
            continue
        bare = pct(r.bare, 0.5)
        over = pct(r.latencies, 0.5) - bare
        verdict = "met" if over < TARGET_OVERHEAD * bare else "NOT met"
        client = "httpx" if "httpx" in name else "lean"
        print(f"{name}: overhead at p50 {over * 1000:+.2f} ms = {over / bare:+.0%} of bare "
              f"(target < {TARGET_OVERHEAD:.0%}: {verdict}); the {client} client's own floor "
              f"{floors[client]:.0%}, so the service's share ~{over / bare - floors[client]:+.0%}"
              + (f" (the same client on uvicorn+starlette alone: {floors['stack']:.0%})" if client == "httpx" else "")
              + f"; service CPU beyond the model {(r.service_cpu - r.bare_cpu) * 1000:+.2f} ms")
    if client_rows:
        print()
        print_client_table(client_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
