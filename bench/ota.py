"""Benchmark: OTA artifact downloads (Block2) from the router vs. a plain aiocoap resource, same run.

N simulated devices, each with its own UDP endpoint, download the same artifact at once, one
Block2 request per 1024-byte block (what the Golioth SDK does), and check its sha256. Compared:

* ``plain aiocoap``: an aiocoap resource that returns the whole artifact from ``render_get``;
  aiocoap's own Block2 support slices it per request (its per-endpoint cache): the ceiling for
  serving these bytes over CoAP in Python on this machine.
* ``router``: ``CoapIngest`` + ``Router`` in one process (what ``pipeline serve`` runs), the
  artifact uploaded to its SQLite store with ``ota.upload_artifact`` and served by
  ``/.u/c/main@1.0.0``: stateless blocks from the block number, from the in-memory cache.

Servers and clients run in separate processes; the clients (``--client-procs``) are lean raw-UDP
devices (``bench/coap_load.py``'s exchange: retransmission, message ids, tokens) so that their
CPU does not decide the result. Prints wall time, MiB/s, the server's CPU seconds per MiB served,
and both as a ratio to the plain resource (target: at least 0.8). Usage::

    python bench/ota.py                              # 100 devices x 1 MiB
    python bench/ota.py --devices 20 --size 262144 --client-procs 1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BLOCK = 1024
SZX = 6


def artifact(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet() -> None:
    import logging
    logging.basicConfig(level=logging.ERROR)
    for name in ("coap", "coap-server", "coap-ingest", "pipelines", "httpx"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def serve_plain(port: int, size: int, seed: int, workdir: str, cpu_out, ready, stop) -> None:
    _quiet()

    async def main() -> None:
        import aiocoap
        from aiocoap import resource

        data = artifact(size, seed)

        class Firmware(resource.Resource):
            async def render_get(self, request):
                return aiocoap.Message(payload=data, content_format=42)

        site = resource.Site()
        site.add_resource(["fw"], Firmware())
        ctx = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port), transports=["udp6"])
        cpu0 = time.process_time()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        cpu_out.put(time.process_time() - cpu0)
        await ctx.shutdown()

    asyncio.run(main())


def serve_router(port: int, size: int, seed: int, workdir: str, cpu_out, ready, stop) -> None:
    _quiet()

    async def main() -> None:
        from pipelines.device_services import ota
        from pipelines.ingest.coap import CoapIngest, CoapSettings
        from pipelines.router import Router, RouterSettings

        pipelines = Path(workdir) / "p.yaml"
        pipelines.write_text("pipelines:\n  keep:\n    filter: {path: /x}\n    steps:\n"
                             "      - name: keep\n        destination: {type: lightdb-stream, version: v1}\n")
        settings = RouterSettings(pipelines=[pipelines], store_path=Path(workdir) / "store.db")
        async with Router(settings) as router:
            await ota.upload_artifact(router.store, artifact(size, seed), package="main", version="1.0.0")
            coap = CoapSettings(host="127.0.0.1", port=port, dtls_enabled=False, plain_enabled=True, rate_limit=0)
            async with CoapIngest(router, coap):
                cpu0 = time.process_time()
                ready.set()
                await asyncio.get_running_loop().run_in_executor(None, stop.wait)
                cpu_out.put(time.process_time() - cpu0)

    asyncio.run(main())


def _payload(data: bytes) -> bytes:
    """The payload of a CoAP message (options skipped by their length nibbles)."""
    i = 4 + (data[0] & 0x0F)
    n = len(data)
    while i < n and data[i] != 0xFF:
        b = data[i]
        i += 1
        delta, length = b >> 4, b & 0x0F
        i += 1 if delta == 13 else 2 if delta == 14 else 0
        if length == 13:
            length = data[i] + 13
            i += 1
        elif length == 14:
            length = int.from_bytes(data[i:i + 2], "big") + 269
            i += 2
        i += length
    return data[i + 1:] if i < n else b""


def run_clients(port: int, path: tuple[str, ...], devices: list[str], size: int, sha: str,
                ready, go, out) -> None:
    _quiet()

    async def main() -> dict:
        import aiocoap
        from aiocoap import CON, Code
        from aiocoap.optiontypes import BlockOption
        from coap_load import TOKEN_LENGTH, LeanDevice

        blocks = -(-size // BLOCK)
        links = {d: await LeanDevice.open(("127.0.0.1", port), d) for d in devices}
        requests = {}
        for d in devices:  # every block request encoded before the clock starts
            reqs = []
            for num in range(blocks):
                msg = aiocoap.Message(mtype=CON, mid=0, token=bytes(TOKEN_LENGTH), code=Code.GET,
                                      uri_path=path, uri_query=(f"d={d}",))
                msg.opt.block2 = BlockOption.BlockwiseTuple(num, False, SZX)
                reqs.append(bytearray(msg.encode()))
            requests[d] = reqs
        failures: dict[str, int] = {}

        async def download(d: str) -> None:
            parts = []
            for req in requests[d]:
                answer = await links[d]._exchange(req)
                if answer[1] != 0x45:  # 2.05 Content
                    key = f"code {answer[1] >> 5}.{answer[1] & 31:02d}"
                    failures[key] = failures.get(key, 0) + 1
                    return
                parts.append(_payload(answer))
            if hashlib.sha256(b"".join(parts)).hexdigest() != sha:
                failures["sha256 mismatch"] = failures.get("sha256 mismatch", 0) + 1

        ready.release()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        start, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(download(d) for d in devices))
        end = time.perf_counter()
        for link in links.values():
            link.close()
        return {"start": start, "end": end, "cpu": time.process_time() - cpu0, "failures": failures,
                "retransmissions": sum(link.retransmissions for link in links.values())}

    out.put(asyncio.run(main()))


def measure(name: str, server, path: tuple[str, ...], args) -> dict:
    ctx = mp.get_context("spawn")
    port = free_udp_port()
    stop, ready_server, cpu_out = ctx.Event(), ctx.Event(), ctx.Queue()
    with tempfile.TemporaryDirectory() as workdir:
        sp = ctx.Process(target=server, args=(port, args.size, args.seed, workdir, cpu_out, ready_server, stop))
        sp.start()
        try:
            if not ready_server.wait(120):
                raise RuntimeError(f"{name}: server did not start")
            sha = hashlib.sha256(artifact(args.size, args.seed)).hexdigest()
            devices = [f"dev-{i:04d}" for i in range(args.devices)]
            groups = [devices[i::args.client_procs] for i in range(args.client_procs)]
            go, ready, out = ctx.Event(), ctx.Semaphore(0), ctx.Queue()
            procs = [ctx.Process(target=run_clients, args=(port, path, g, args.size, sha, ready, go, out))
                     for g in groups if g]
            for p in procs:
                p.start()
            for _ in procs:
                if not ready.acquire(timeout=300):
                    raise RuntimeError("clients did not get ready")
            go.set()
            results = [out.get(timeout=1800) for _ in procs]
            for p in procs:
                p.join()
            stop.set()
            server_cpu = cpu_out.get(timeout=60)
        finally:
            stop.set()
            sp.join(30)
            if sp.is_alive():
                sp.kill()
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    failures: dict[str, int] = {}
    for r in results:
        for k, v in r["failures"].items():
            failures[k] = failures.get(k, 0) + v
    mib = args.devices * args.size / (1 << 20)
    return {"name": name, "wall": wall, "mib": mib, "mibps": mib / wall, "cpu": server_cpu,
            "cpu_per_mib": server_cpu / mib, "failures": failures,
            "retransmissions": sum(r["retransmissions"] for r in results),
            "client_cpu": sum(r["cpu"] for r in results)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100, help="simulated devices downloading at once (N)")
    ap.add_argument("--size", type=int, default=1 << 20, help="artifact bytes (default: 1 MiB)")
    ap.add_argument("--client-procs", type=int, default=2, help="processes the devices are spread over")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(f"{args.devices} devices x {args.size} bytes, {BLOCK}-byte blocks, seed {args.seed}, "
          f"{args.client_procs} client processes")
    base = measure("plain aiocoap", serve_plain, ("fw",), args)
    ours = measure("router /.u/c", serve_router, (".u", "c", "main@1.0.0"), args)
    print(f"\n{'server':<16} {'MiB':>7} {'wall s':>8} {'MiB/s':>8} {'srv CPU s':>10} {'CPU s/MiB':>10} "
          f"{'speed x':>8} {'CPU eff x':>9}  failures / retransmissions")
    for row in (base, ours):
        speed = row["mibps"] / base["mibps"]
        eff = base["cpu_per_mib"] / row["cpu_per_mib"]
        print(f"{row['name']:<16} {row['mib']:>7.1f} {row['wall']:>8.2f} {row['mibps']:>8.2f} {row['cpu']:>10.2f} "
              f"{row['cpu_per_mib']:>10.3f} {speed:>8.2f} {eff:>9.2f}  {row['failures'] or 'none'} / "
              f"{row['retransmissions']}")
    print("\nspeed x: MiB/s relative to plain aiocoap; CPU eff x: plain aiocoap's CPU per MiB / this one's "
          "(higher is better; target >= 0.8)")
    return 0 if not (base["failures"] or ours["failures"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
