"""Benchmark: Block1 frame uploads into the router vs. a bare aiocoap resource, same run.

K simulated cameras, each with its own UDP endpoint (its own aiocoap client context), upload
20-60 KB PNG frames one after another at 1024-byte blocks. The clients run in separate
processes from the servers. Compared, in one run:

* ``bare aiocoap``: an aiocoap resource that only reassembles (aiocoap's own Block1 spool)
  and discards: the ceiling for CoAP in Python on this machine.
* ``router (1 process)``: ``CoapIngest`` + ``Router`` in one process, pipelines running
  (a webhook to a local HTTP sink): what ``pipeline serve`` runs.
* ``router, N ingest workers``: N processes each running ``CoapIngest`` on the same port
  (SO_REUSEPORT) with an ingest-only ``Router`` (``run_engine=False``) writing the shared
  SQLite store, plus one engine process routing the inbox.

Hostile traffic (``--junk-rate``, default 1,000/s): the one-process router measured again while
a junk sender (its own process, bounded: it stops with the run or after ``--junk-seconds`` at
the latest) sends random and malformed datagrams (random bytes, Uri-Path bytes that are not
UTF-8, cut options, unknown critical options, orphan Block1 blocks, 8 KB datagrams) from 64
source ports. One router process; runs without and with junk alternate (``--hostile-rounds``
pairs), so load from outside the bench falls on both alike; printed as the ratio of honest
frames/s with junk to without (target: 0.9x or better).

A frame counts when its 2.04 arrived (the router has stored it durably). Prints frames/s,
blocks/s, p50/p99 upload time and the ratio to the bare resource. Usage::

    python bench/coap_ingest.py                          # 16 devices x 8 frames, plain CoAP
    python bench/coap_ingest.py --devices 32 --frames 10 --workers 1,2 --dtls

With ``--dtls`` the servers run the router's DTLS server (``pipelines/ingest/dtls_server.py``,
OpenSSL) and the clients the simulator's DTLS transport (TLS_PSK_WITH_AES_128_GCM_SHA256, 32-byte
keys); the same run also measures the router over plain CoAP with the same aiocoap clients (the
DTLS cost is the ratio of the two) and DTLS handshakes per second (full PSK handshakes with the
cookie exchange, each on a new UDP port, ended with close_notify).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_sink import start_sink

BLOCK_SZX = 6  # 1024-byte blocks


def make_png(approx_bytes: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = max(8, int((approx_bytes / 3) ** 0.5))
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) * 127 // side)], axis=-1).astype(np.uint8)
    img ^= rng.integers(0, 256, img.shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def psk_for(device: str) -> str:
    return f"bench-key-{device}".ljust(32, "k")[:32]  # 32 bytes, as `pipeline devices add` makes


def write_registry(path: Path, devices: list[str]) -> None:
    lines = ["project_id: bench", "devices:"]
    for d in devices:
        lines += [f"  - id: {d}", f'    psk: "{psk_for(d)}"']
    path.write_text("\n".join(lines) + "\n")


# -- servers (each in its own process) ---------------------------------------------------------

def _quiet() -> None:
    import logging
    logging.basicConfig(level=logging.ERROR)
    for name in ("coap", "coap-server", "coap-ingest", "pipelines", "httpx"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def serve_bare(port: int, dtls: bool, registry: str, shortcuts: bool, cpu_out, ready, stop) -> None:
    """aiocoap's Block1 spool behind a resource that discards. With ``shortcuts``, served the way
    the router serves ``/.s``: no per-request path-stripping copy in the Site, no request repr."""
    _quiet()

    async def main() -> None:
        import aiocoap
        from aiocoap import resource

        from pipelines.devices import DeviceRegistry
        from pipelines.ingest.dtls_server import add_dtls_server

        class Discard(resource.Resource):
            async def render_post(self, request):
                return aiocoap.Message(code=aiocoap.CHANGED)

        from pipelines.ingest.coap import _IngestContext

        discard = Discard()

        class DirectSite(resource.Site):
            async def render_to_pipe(self, pipe):
                if tuple(pipe.request.opt.uri_path) == (".s", "images"):
                    return await discard.render_to_pipe(pipe)
                return await super().render_to_pipe(pipe)

        site = DirectSite() if shortcuts else resource.Site()
        site.add_resource([".s", "images"], discard)
        context_class = _IngestContext if shortcuts else aiocoap.Context
        if dtls:
            reg = DeviceRegistry.load(registry)
            ctx = context_class(serversite=site)
            await add_dtls_server(ctx, ("127.0.0.1", port), lambda: reg)
        else:
            ctx = await context_class.create_server_context(site, bind=("127.0.0.1", port),
                                                            transports=["udp6"])
        cpu0 = time.process_time()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        cpu_out.put(("ingest", time.process_time() - cpu0))
        await ctx.shutdown()

    asyncio.run(main())


def write_pipelines(path: Path, sink_url: str) -> None:
    path.write_text(f"""\
pipelines:
  frames:
    filter: {{path: /images}}
    steps:
      - name: out
        destination: {{type: webhook, version: v1, parameters: {{url: "{sink_url}"}}}}
""")


def serve_router(port: int, dtls: bool, registry: str, workdir: str, run_engine: bool, with_coap: bool,
                 reuse_port: bool, cpu_out, ready, stop) -> None:
    _quiet()

    async def main() -> None:
        from pipelines.gc_tuning import tune_for_serving
        from pipelines.ingest.coap import CoapIngest, CoapSettings
        from pipelines.router import Router, RouterSettings

        pipelines = Path(workdir) / "pipelines.yaml"
        if run_engine:
            sink, url = start_sink()
            sinks.append(sink)
            write_pipelines(pipelines, url + "/sink")
        else:
            while not pipelines.exists():  # the engine process writes it
                await asyncio.sleep(0.05)
        settings = RouterSettings(pipelines=[pipelines], store_path=Path(workdir) / "store.db",
                                  run_engine=run_engine)
        async with Router(settings) as router:
            coap = None
            if with_coap:
                cs = CoapSettings(host="127.0.0.1", port=port, dtls_port=port, plain_enabled=not dtls,
                                  dtls_enabled=dtls, registry_path=registry, reuse_port=reuse_port)
                coap = await CoapIngest(router, cs).start()
            tune_for_serving()  # as pipeline serve does once it is up
            cpu0 = time.process_time()
            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)
            if run_engine:  # count the pipeline work for every frame: wait until it is all done
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and (
                        await router.store.inbox_size() or any((await router.store.queue_depths()).values())):
                    await asyncio.sleep(0.05)
            role = "both" if run_engine and with_coap else "engine" if run_engine else "ingest"
            cpu_out.put((role, time.process_time() - cpu0))
            if coap is not None:
                await coap.stop()

    sinks: list = []
    try:
        asyncio.run(main())
    finally:
        for sink in sinks:
            sink.kill()


# -- junk (hostile traffic) ---------------------------------------------------------------------

def junk_datagrams(seed: int, n: int = 4096) -> list[bytes]:
    """Malformed and hostile datagrams: what the router must answer or drop without harm."""
    import random
    import struct

    rnd = random.Random(seed)
    out = []
    for i in range(n):
        mid = struct.pack("!H", i & 0xFFFF)
        kind = i % 7
        if kind == 0:
            out.append(rnd.randbytes(rnd.randint(0, 60)))                           # noise
        elif kind == 1:
            out.append(b"\x40\x02" + mid + b"\xb1\xff")                             # Uri-Path 0xFF
        elif kind == 2:
            out.append(b"\x40\x02" + mid + b"\xbd\x05.s")                           # option cut short
        elif kind == 3:                                                              # option 2049
            out.append(b"\x40\x02" + mid + b"\xb2.s\xe1\x06\xe9x")
        elif kind == 4:                                                              # orphan block 5
            out.append(b"\x41\x02" + mid + b"j\xb2.s\x06images\x47d=junk0\xc1\x5e\xff" + b"x" * 1024)
        elif kind == 5:
            out.append(b"\x60\x45" + mid)                                            # stray ACK
        else:
            out.append(b"\x50\x02" + mid + b"\xb2.s\x04junk\xff" + rnd.randbytes(8000))  # 8 KB NON
    return out


def send_junk(port: int, rate: float, max_seconds: float, seed: int, stop, sent_out) -> None:
    """``rate`` junk datagrams/s from 64 ports until ``stop`` or ``max_seconds``, whichever first."""
    datagrams = junk_datagrams(seed)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
    for s in socks:
        s.setblocking(False)
    sent = 0
    t0 = time.monotonic()
    try:
        while not stop.is_set() and time.monotonic() - t0 < max_seconds:
            due = int((time.monotonic() - t0) * rate)
            while sent < due:
                with contextlib.suppress(OSError):
                    socks[sent % 64].sendto(datagrams[sent % len(datagrams)], ("127.0.0.1", port))
                sent += 1
            time.sleep(0.005)  # answers are never read: the kernel drops them when the queue is full
    finally:
        for s in socks:
            s.close()
        sent_out.put((sent, time.monotonic() - t0))


# -- clients ----------------------------------------------------------------------------------

@dataclass
class ClientResult:
    latencies: list[float]
    blocks: int
    bytes: int
    failures: dict[str, int]
    start: float
    end: float
    cpu: float = 0.0  # the client process's CPU seconds while uploading


async def _drive(devices: list[str], plan: dict[str, list[bytes]], send, ready, go) -> ClientResult:
    """Each device uploads its frames one after another, from the go signal; ``send(d, i)``
    uploads frame i of device d and returns the answer's code (or the exception's name)."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    blocks = nbytes = 0

    async def device(d: str) -> None:
        nonlocal blocks, nbytes
        for i, frame in enumerate(plan[d]):
            t0 = time.perf_counter()
            try:
                code = await send(d, i)
            except Exception as exc:
                code = type(exc).__name__
            if code.startswith("2.04"):
                latencies.append(time.perf_counter() - t0)
                blocks += -(-len(frame) // 1024)
                nbytes += len(frame)
            else:
                failures[code] = failures.get(code, 0) + 1

    ready.release()  # frames rendered, endpoints open: ready for the clock
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    start, cpu0 = time.time(), time.process_time()
    await asyncio.gather(*(device(d) for d in devices))
    end, cpu = time.time(), time.process_time() - cpu0
    return ClientResult(latencies, blocks, nbytes, failures, start, end, cpu)


def run_clients(port: int, dtls: bool, lean: bool, devices: list[str], frames: int, seed: int,
                ready, go, out) -> None:
    _quiet()
    import random

    rnd = random.Random(seed)
    plan = {d: [make_png(rnd.randint(20_000, 60_000), seed=rnd.randrange(1 << 16)) for i in range(frames)]
            for d in devices}

    async def main_lean() -> ClientResult:
        from coap_load import LeanDevice

        links = {d: await LeanDevice.open(("127.0.0.1", port), d) for d in devices}
        prepared = {d: [links[d].prepare("images", frame, content_format=23, szx=BLOCK_SZX) for frame in plan[d]]
                    for d in devices}

        async def send(d: str, i: int) -> str:
            code, _ = await links[d].upload(prepared[d][i])
            return str(code)

        result = await _drive(devices, plan, send, ready, go)
        retransmissions = sum(link.retransmissions for link in links.values())
        if retransmissions:
            result.failures["retransmissions (not failures)"] = retransmissions
        for link in links.values():
            link.close()
        return result

    async def main_aiocoap() -> ClientResult:
        import warnings

        import aiocoap
        from aiocoap.optiontypes import BlockOption

        from device_sim.dtls_transport import dtls_client_context

        scheme = "coaps" if dtls else "coap"
        contexts = {}
        for d in devices:
            if dtls:
                contexts[d] = await dtls_client_context(f"{d}@bench".encode(), psk_for(d).encode())
            else:
                contexts[d] = await aiocoap.Context.create_client_context()

        async def send(d: str, i: int) -> str:
            query = "" if dtls else f"?d={d}"
            msg = aiocoap.Message(code=aiocoap.POST, uri=f"{scheme}://127.0.0.1:{port}/.s/images{query}",
                                  payload=plan[d][i], content_format=23)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                msg.opt.block1 = BlockOption.BlockwiseTuple(0, False, BLOCK_SZX)
            return str((await contexts[d].request(msg).response).code)

        result = await _drive(devices, plan, send, ready, go)
        for ctx in contexts.values():
            await ctx.shutdown()
        return result

    out.put(asyncio.run(main_lean() if lean else main_aiocoap()))


def handshake_clients(port: int, devices: list[str], seconds: float, ready, go, out) -> None:
    """Full DTLS-PSK handshakes one after another, each from a new UDP port; counts completed ones."""
    _quiet()
    import itertools

    from OpenSSL import SSL
    from OpenSSL._util import ffi, lib

    current = {"identity": b"", "key": b""}

    def psk(ssl, hint, identity_out, max_identity, psk_out, max_psk):
        ffi.memmove(identity_out, current["identity"] + b"\0", len(current["identity"]) + 1)
        ffi.memmove(psk_out, current["key"], len(current["key"]))
        return len(current["key"])

    callback = ffi.callback(
        "unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *, unsigned int)", psk)
    tls = SSL.Context(SSL.DTLS_METHOD)
    tls.set_cipher_list(b"PSK-AES128-GCM-SHA256")
    tls.set_options(SSL.OP_NO_TICKET)
    lib.SSL_CTX_set_psk_client_callback(tls._context, callback)

    def flush(conn, sock) -> None:
        data = b""
        while True:
            try:
                data += conn.bio_read(65536)
            except SSL.WantReadError:
                break
        if data:
            sock.sendto(data, ("127.0.0.1", port))

    def one(device: str) -> bool:
        current["identity"], current["key"] = f"{device}@bench".encode(), psk_for(device).encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            conn = SSL.Connection(tls, None)
            conn.set_connect_state()
            while True:
                try:
                    conn.do_handshake()
                    break
                except SSL.WantReadError:
                    flush(conn, sock)
                try:
                    conn.bio_write(sock.recv(65536))
                except TimeoutError:
                    return False
            conn.shutdown()   # close_notify: the server frees the session
            flush(conn, sock)
            return True

    ready.release()
    go.wait()
    done = failed = 0
    start = time.time()
    for device in itertools.cycle(devices):
        if time.time() - start >= seconds:
            break
        if one(device):
            done += 1
        else:
            failed += 1
    out.put((done, failed, start, time.time()))


def measure_handshakes(port: int, args, devices: list[str]) -> dict:
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    ready = ctx.Semaphore(0)
    out = ctx.Queue()
    procs = [ctx.Process(target=handshake_clients, args=(port, devices, args.handshake_seconds, ready, go, out))
             for _ in range(args.client_procs)]
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=120):
            raise RuntimeError("handshake clients did not get ready")
    go.set()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    wall = max(r[3] for r in results) - min(r[2] for r in results)
    done = sum(r[0] for r in results)
    return {"name": "DTLS-PSK handshakes (router, 1 process)", "frames": done, "fps": done / wall,
            "failed": sum(r[1] for r in results)}


def measure(name: str, port: int, args, devices: list[str], dtls: bool | None = None,
            junk_rate: float = 0.0) -> dict:
    ctx = mp.get_context("spawn")
    junk_stop = ctx.Event()
    junk_out = ctx.Queue()
    junk = None
    if junk_rate:
        junk = ctx.Process(target=send_junk, args=(port, junk_rate, args.junk_seconds, args.seed,
                                                   junk_stop, junk_out))
        junk.start()
    try:
        row = _measure(ctx, name, port, args, devices, args.dtls if dtls is None else dtls)
    finally:
        junk_stop.set()
        if junk is not None:
            sent, seconds = junk_out.get(timeout=30)
            junk.join(10)
            row["junk_per_s"] = sent / seconds if seconds else 0.0
    return row


def _measure(ctx, name: str, port: int, args, devices: list[str], dtls: bool) -> dict:
    go = ctx.Event()
    ready = ctx.Semaphore(0)
    out = ctx.Queue()
    groups = [devices[i::args.client_procs] for i in range(args.client_procs)]
    procs = [ctx.Process(target=run_clients,
                         args=(port, dtls, args.client == "lean", g, args.frames, args.seed + i,
                               ready, go, out))
             for i, g in enumerate(groups) if g]
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=120):
            raise RuntimeError("clients did not get ready")
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(x for r in results for x in r.latencies)
    wall = max(r.end for r in results) - min(r.start for r in results)
    failures: dict[str, int] = {}
    for r in results:
        for k, v in r.failures.items():
            failures[k] = failures.get(k, 0) + v
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"name": name, "frames": len(lat), "fps": len(lat) / wall,
            "bps": sum(r.blocks for r in results) / wall,
            "mbps": sum(r.bytes for r in results) / wall / 1e6,
            "p50": q[49] * 1000, "p99": q[98] * 1000, "failures": failures,
            "client_cpu_ms": sum(r.cpu for r in results) * 1000 / max(len(lat), 1)}


def with_servers(targets: list[tuple], fn):
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    cpu_out = ctx.Queue()
    procs = []
    try:
        for target, targs in targets:
            ready = ctx.Event()
            p = ctx.Process(target=target, args=(*targs, cpu_out, ready, stop))
            p.start()
            procs.append(p)
            if not ready.wait(60):
                raise RuntimeError(f"server {target.__name__} did not start")
        row = fn()
        stop.set()
        by_role: dict[str, float] = {}
        for _ in procs:
            role, seconds = cpu_out.get(timeout=90)
            by_role[role] = by_role.get(role, 0.0) + seconds
        per_frame = {role: sec * 1000 / max(row["frames"], 1) for role, sec in by_role.items()}
        row["cpu_ms"] = sum(per_frame.values())
        row["cpu_by_role"] = per_frame
        return row
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=16, help="simulated cameras (K)")
    ap.add_argument("--frames", type=int, default=8, help="frames per camera")
    ap.add_argument("--client-procs", type=int, default=2, help="processes the cameras are spread over")
    ap.add_argument("--workers", default="1", help="comma list of ingest worker counts, e.g. 1,2")
    ap.add_argument("--dtls", action="store_true", help="CoAP over DTLS-PSK instead of plain CoAP")
    ap.add_argument("--client", choices=["lean", "aiocoap"], default=None,
                    help="load generator: lean (bench/coap_load.py, little CPU per device; the default "
                         "for plain CoAP) or aiocoap's client (the default with --dtls)")
    ap.add_argument("--handshake-seconds", type=float, default=5.0, help="with --dtls: how long to measure handshakes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--junk-rate", type=float, default=1000.0,
                    help="junk datagrams/s for the hostile-traffic row (0: no such row; plain CoAP only)")
    ap.add_argument("--hostile-rounds", type=int, default=2,
                    help="pairs of runs without / with junk, alternating (default: %(default)s)")
    ap.add_argument("--junk-seconds", type=float, default=300.0,
                    help="the junk sender stops after this long at the latest")
    args = ap.parse_args()
    if args.client is None:
        args.client = "aiocoap" if args.dtls else "lean"
    if args.client == "lean" and args.dtls:
        ap.error("the lean load generator speaks plain CoAP only: use --client aiocoap with --dtls")
    devices = [f"cam-{i:03d}" for i in range(1, args.devices + 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "devices.yaml"
        write_registry(registry, devices)

        port = free_udp_port()
        rows.append(with_servers([(serve_bare, (port, args.dtls, str(registry), False))],
                                 lambda: measure("bare aiocoap (reassemble, discard)", port, args, devices)))
        port = free_udp_port()
        rows.append(with_servers([(serve_bare, (port, args.dtls, str(registry), True))],
                                 lambda: measure("bare, router's two shortcuts", port, args, devices)))

        work = Path(tmp) / "inproc"
        work.mkdir()
        port = free_udp_port()
        rows.append(with_servers(
            [(serve_router, (port, args.dtls, str(registry), str(work), True, True, False))],
            lambda: measure("router (1 process, pipelines running)", port, args, devices)))
        hostile = None
        if args.junk_rate and not args.dtls:
            work = Path(tmp) / "hostile"
            work.mkdir()
            port = free_udp_port()

            def pairs(port: int = port) -> dict:
                # one router process; runs without and with junk alternate, so load from outside
                # the bench (a shared machine) falls on both alike
                out = []
                for _ in range(args.hostile_rounds):
                    out.append(measure("router, no junk", port, args, devices))
                    out.append(measure(f"router + {args.junk_rate:,.0f} junk/s", port, args, devices,
                                       junk_rate=args.junk_rate))
                return {"frames": sum(r["frames"] for r in out), "pairs": out}

            hostile = with_servers(
                [(serve_router, (port, args.dtls, str(registry), str(work), True, True, False))], pairs)

        dtls_extra = []
        if args.dtls:   # the same router and clients over plain CoAP, and handshakes/s
            work = Path(tmp) / "plain"
            work.mkdir()
            port = free_udp_port()
            plain = with_servers(
                [(serve_router, (port, False, str(registry), str(work), True, True, False))],
                lambda: measure("router over plain CoAP (same clients)", port, args, devices, dtls=False))
            work = Path(tmp) / "handshakes"
            work.mkdir()
            port = free_udp_port()
            handshakes = with_servers(
                [(serve_router, (port, True, str(registry), str(work), True, True, False))],
                lambda: measure_handshakes(port, args, devices))
            port = free_udp_port()
            bare_plain = with_servers([(serve_bare, (port, False, str(registry), False))],
                                      lambda: measure("bare aiocoap over plain CoAP", port, args, devices, dtls=False))
            dtls_extra = [plain, handshakes, bare_plain]

        for n in [int(x) for x in args.workers.split(",") if x.strip()]:
            work = Path(tmp) / f"workers{n}"
            work.mkdir()
            port = free_udp_port()
            servers = [(serve_router, (port, args.dtls, str(registry), str(work), True, False, False))]
            servers += [(serve_router, (port, args.dtls, str(registry), str(work), False, True, True))] * n
            rows.append(with_servers(servers, lambda n=n, port=port: measure(
                f"router, {n} ingest worker(s) + engine", port, args, devices)))

    base = rows[0]
    transport = "CoAP over DTLS-PSK" if args.dtls else "plain CoAP"
    print(f"\n{args.devices} devices x {args.frames} frames of 20-60 KB PNG, 1024-byte blocks, {transport}, "
          f"{os.cpu_count()} CPUs, {args.client} clients in {args.client_procs} processes")
    print("server CPU/frame: CPU time of all server processes (ingest, and for the router the engine and\n"
          "webhook delivery of every frame) per frame; the fairest figure when clients share the CPUs.\n"
          "client CPU/frame: the load generator's, on the same cores. \"bare, router's two shortcuts\": the\n"
          "bare resource without the Site's per-request copy and request repr, which the router skips.\n")
    header = (f"{'server':<40} {'frames':>6} {'frames/s':>8} {'blocks/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'CPU ms/frame':>12} {'client CPU':>10} {'fps vs bare':>11} {'CPU vs bare':>11}  failures")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<40} {r['frames']:>6} {r['fps']:>8.1f} {r['bps']:>8.0f} {r['p50']:>7.0f} "
              f"{r['p99']:>7.0f} {r['cpu_ms']:>12.1f} {r['client_cpu_ms']:>10.1f} {r['fps'] / base['fps']:>11.2f} "
              f"{r['cpu_ms'] / base['cpu_ms']:>11.2f}  {r['failures'] or '-'}")
    if dtls_extra:
        plain, handshakes, bare_plain = dtls_extra
        dtls_router, bare_dtls = rows[2], rows[0]
        print("\nDTLS against plain CoAP, same router (1 process, pipelines running) and the same aiocoap clients:")
        print(f"{'transport':<40} {'frames':>6} {'frames/s':>8} {'p50 ms':>7} {'CPU ms/frame':>12}")
        for r in (plain, dtls_router, bare_plain, bare_dtls):
            print(f"{r['name']:<40} {r['frames']:>6} {r['fps']:>8.1f} {r['p50']:>7.0f} {r['cpu_ms']:>12.1f}")
        print(f"router: DTLS throughput = {dtls_router['fps'] / plain['fps']:.2f}x plain (cost "
              f"{(1 - dtls_router['fps'] / plain['fps']) * 100:.0f}%); server CPU per frame "
              f"{dtls_router['cpu_ms'] / plain['cpu_ms']:.2f}x plain")
        print(f"bare:   DTLS throughput = {bare_dtls['fps'] / bare_plain['fps']:.2f}x plain; server CPU per frame "
              f"{bare_dtls['cpu_ms'] / bare_plain['cpu_ms']:.2f}x plain")
        print("(plain CoAP runs aiocoap's udp6 transport at both ends, which does more per datagram than the\n"
              " DTLS transports' plain asyncio datagram endpoints; so these are whole-stack ratios.)")
        print(f"handshakes: {handshakes['frames']} in {args.handshake_seconds:g} s from {args.client_procs} "
              f"client processes = {handshakes['fps']:.0f}/s ({handshakes['failed']} failed); server CPU "
              f"{handshakes['cpu_ms']:.2f} ms per handshake")
    if hostile is not None and hostile["pairs"]:
        runs = hostile["pairs"]
        junk_rate = statistics.mean(r.get("junk_per_s", 0.0) for r in runs[1::2])
        print(f"\nHostile traffic: one router process, runs without and with a junk sender "
              f"({junk_rate:,.0f} junk datagrams/s measured) alternating, same run.")
        h = f"{'run':<40} {'frames':>6} {'frames/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'fps vs no junk':>14}  failures"
        print(h)
        print("-" * len(h))
        ratios = []
        for clean, junk in zip(runs[0::2], runs[1::2], strict=True):
            ratios.append(junk["fps"] / clean["fps"])
            for r in (clean, junk):
                print(f"{r['name']:<40} {r['frames']:>6} {r['fps']:>8.1f} {r['p50']:>7.0f} {r['p99']:>7.0f} "
                      f"{r['fps'] / clean['fps']:>14.2f}  {r['failures'] or '-'}")
        total = statistics.median(ratios)
        print(f"honest frames/s with junk vs without: median {total:.2f} over {len(ratios)} pairs "
              f"(per pair {', '.join(f'{x:.2f}' for x in ratios)}); target 0.90 or better. Server CPU of the\n"
              f"whole hostile run: {hostile['cpu_ms']:.1f} ms per frame (frames with and without junk together)")
    print("\nWith cores to spare (each server process on a core of its own, the load generator elsewhere):\n"
          "frames/s a process can take = 1000 / its CPU ms per frame; N ingest workers share the frames,\n"
          "the one engine process routes them all. A projection from measured CPU, not a measurement:\n"
          "it leaves out the store's single write lock, which the ingest processes share.\n")
    print(f"{'server':<40} {'ingest ms/frame':>15} {'engine ms/frame':>15} {'capacity fps':>12} {'vs bare':>8}")
    base_capacity = 1000 / base["cpu_ms"]
    one_worker = None
    for r in rows:
        roles = r["cpu_by_role"]
        n = int(r["name"].split(",")[1].split()[0]) if "ingest worker" in r["name"] else 1
        ingest = roles.get("ingest", 0.0) + roles.get("both", 0.0)
        engine = roles.get("engine", 0.0)
        capacity = min(n * 1000 / ingest, 1000 / engine if engine else float("inf"))
        if n == 1 and "ingest worker" in r["name"]:
            one_worker = capacity
        extra = f"   {capacity / one_worker:.2f}x 1 worker" if n > 1 and one_worker else ""
        print(f"{r['name']:<40} {ingest:>15.1f} {engine or float('nan'):>15.1f} {capacity:>12.0f} "
              f"{capacity / base_capacity:>8.2f}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
