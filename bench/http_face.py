"""Benchmark: what authentication costs the router's HTTP face, against the same face open, same run.

    python bench/http_face.py [--seconds 1] [--rounds 9] [--concurrency 8]

One real ``pipeline serve`` process on loopback, started through the CLI with
``--protect-metrics``, measured in two states that alternate round by round: no API key in its
store (open on loopback, as the demo runs) and one admin key (every request checked:
``Authorization: Bearer``, hash, constant-time compare; a read key is made and revoked with ``pipeline
keys`` between blocks, and the block starts once the router answers accordingly). The same
process, store and connections' code in both states, so only the check differs; the machine is
shared, so blocks are short and many and the median is reported. Load: ``--concurrency``
keep-alive connections of raw asyncio streams, each request encoded once (so the time measured
is the server's, not this client's), for ``--seconds`` per block.

Rows:
- ``GET /healthz``: the cheapest endpoint, where the check's cost shows most;
- ``GET /v1/devices/demo/dev-1/state``: a typical read (a store round trip);
- ``POST /v1/hooks/predictions``: a signed prediction callback with its ``?c=`` token, checked the
  same way in both states (signature and token are its authentication, never an API key), so
  this row is the control: its change is the run's noise. The same prediction each time: after
  the first, each is recognised as a duplicate (a store round trip, no new message).

Columns: requests/s (median over rounds) open and keyed, and keyed/open - 1 (target: under 10 %
slower). Then the checks on their own, in this process: ``Authenticator.authenticate`` and
``webhook_signature.verify`` per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import webhook_signature
from pipelines.http_auth import Authenticator
from pipelines.message import Message
from pipelines.predictions_results import callback_token, token_key

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.10
PIPELINES = """
pipelines:
  keep:
    filter: {path: /temp}
    steps:
      - name: keep
        destination: {type: lightdb-state, version: v1}
"""


def cli(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True,
                         cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out.stdout.strip()


class Router:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.store = folder / "store.db"
        folder.mkdir(mode=0o700, exist_ok=True)
        (folder / "p.yaml").write_text(PIPELINES)
        self.key: str | None = None
        self.last_key = "iotp_00000000_none"
        self.secret = cli("keys", "webhook-secret", "--store", str(self.store))
        cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(folder / "p.yaml"),
               "--store", str(self.store), "--http-port", "0", "--protect-metrics"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("ready "), line
        self.url = line.split()[1]

    def headers(self) -> str:
        return f"Authorization: Bearer {self.key}\r\n" if self.key else ""

    async def keyed(self, on: bool) -> None:
        """Make (or revoke) the key, then wait until the router answers accordingly."""
        if on:
            self.key = self.key or cli("keys", "create", "--scope", "read", "--store", str(self.store))
        elif self.key:  # off
            cli("keys", "revoke", self.key.split("_")[1], "--store", str(self.store))
            self.key = None
        self.last_key = self.key or self.last_key
        # a read key cannot POST: 403 once the router checks keys, 405 (no such method) while it
        # is open; neither counts as a wrong key for the 401 rate limit
        u = urlsplit(self.url)
        key = self.key or self.last_key
        probe = (f"POST /healthz HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {key}\r\n"
                 "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()
        want = b"HTTP/1.1 403" if on else b"HTTP/1.1 405"
        for _ in range(100):
            reader, writer = await asyncio.open_connection(u.hostname, u.port)
            writer.write(probe)
            status = await reader.readline()
            writer.close()
            if status.startswith(want):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the router did not see the key change")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def get(router: Router, path: str) -> bytes:
    host = urlsplit(router.url).netloc
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{router.headers()}\r\n".encode()


def callback(router: Router) -> bytes:
    host = urlsplit(router.url).netloc
    frame = Message.new(device_id="dev-1", project_id="demo", path="/images", content_type="image/png",
                        payload=b"x", id="bench-frame")
    token = callback_token(token_key(router.secret), frame)
    body = json.dumps({"id": "bench-prediction", "status": "succeeded", "output": "Caption: espresso",
                       "error": None}).encode()
    # fresh for the tolerance window (300 s): a run is shorter than that
    signed = webhook_signature.sign(router.secret, "bench-webhook", None, body)
    head = (f"POST /v1/hooks/predictions?c={token} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in signed.items()) + "\r\n")
    return head.encode() + body


async def drive(url: str, request: bytes, seconds: float, concurrency: int) -> float:
    """Requests per second over ``seconds`` with ``concurrency`` keep-alive connections."""
    u = urlsplit(url)
    stop = time.monotonic() + seconds
    counts = [0] * concurrency

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        try:
            while time.monotonic() < stop:
                writer.write(request)
                status = await reader.readline()
                if not status.startswith(b"HTTP/1.1 2"):
                    raise RuntimeError(f"answer {status!r}")
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                counts[i] += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    return sum(counts) / (time.monotonic() - started)


def micro() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store.db"
        key = cli("keys", "create", "--scope", "read", "--store", str(store))
        auth = Authenticator(store)
        header = f"Bearer {key}"
        assert auth.authenticate(header) is not None
        n = 20000
        t = time.perf_counter()
        for _ in range(n):
            auth.authenticate(header)
        per_auth = (time.perf_counter() - t) / n
    secret = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="
    body = b'{"id": "p", "status": "succeeded", "output": "Caption: espresso"}'
    headers = webhook_signature.sign(secret, "w", None, body)
    t = time.perf_counter()
    for _ in range(n):
        webhook_signature.verify(secret, headers, body)
    return per_auth, (time.perf_counter() - t) / n


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    rows = {"GET /healthz": lambda r: get(r, "/healthz"),
            "GET /v1/devices/demo/dev-1/state": lambda r: get(r, "/v1/devices/demo/dev-1/state"),
            "POST /v1/hooks/predictions (control)": callback}
    results: dict[str, dict[str, list[float]]] = {row: {"open": [], "keyed": []} for row in rows}
    with tempfile.TemporaryDirectory() as tmp:
        router = Router(Path(tmp) / "router")
        try:
            for make in rows.values():  # warm up: connections, caches, the first callback
                await drive(router.url, make(router), 0.3, args.concurrency)
            for rnd in range(args.rounds):
                for name in (("open", "keyed") if rnd % 2 == 0 else ("keyed", "open")):
                    await router.keyed(name == "keyed")
                    for row, make in rows.items():
                        results[row][name].append(await drive(router.url, make(router), args.seconds,
                                                              args.concurrency))
        finally:
            router.stop()
    print(f"\nHTTP face, {args.concurrency} keep-alive connections, {args.rounds} rounds x {args.seconds:g} s "
          f"per mode (median requests/s)\n")
    print(f"{'request':<38} {'open':>9} {'keyed':>9} {'keyed/open':>11}  target")
    for row, by in results.items():
        o, k = statistics.median(by["open"]), statistics.median(by["keyed"])
        change = k / o - 1
        print(f"{row:<38} {o:>9.0f} {k:>9.0f} {change:>+10.1%}  {'ok' if change > -TARGET else 'OVER'}"
              f" (>{-TARGET:.0%})")
    per_auth, per_verify = micro()
    print(f"\nin-process: Authenticator.authenticate {per_auth * 1e6:.1f} us/call, "
          f"webhook_signature.verify {per_verify * 1e6:.1f} us/call")


if __name__ == "__main__":
    asyncio.run(main())
