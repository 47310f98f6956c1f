"""A real ``pipeline serve`` subprocess for tests: started, waited for, stopped.

    async with serving(tmp_path, "--http-ingest") as srv:
        r = await client.get(srv.url + "/healthz")
        srv.proc.pid                     # for /proc/PID/status (RSS)

    wait_healthy(proc, "http://127.0.0.1:PORT", 30)   # any server subprocess: GET /healthz is 200
    letters = await dead_letters_soon(client)         # the dead letters, once there are some

    router = KillableServe([sys.executable, "-m", "pipelines.cli", "serve", ...], tmp / "router.log")
    line = await router.launch(20)                    # its "ready ..." line; then kill9(), launch() again
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

PIPELINES = """
pipelines:
  keep:
    filter: {path: /temp, content_type: application/json}
    steps:
      - name: keep
        destination: {type: lightdb-state, version: v1, parameters: {path: /last}}
"""


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    url: str
    store: Path
    stderr_path: Path
    proc_line: str = ""  # the whole "ready ..." line (CoAP addresses follow the HTTP URL)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float) -> None:
    """Return once ``base + "/healthz"`` answers 200; fail (with its stderr) if ``proc`` exits
    first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "service did not come up"
        time.sleep(0.05)


async def dead_letters_soon(client: httpx.AsyncClient, tries: int = 200) -> list:
    """``GET /v1/dead-letters`` until it lists some (every 0.05 s, ``tries`` times): the last list."""
    for _ in range(tries):
        letters = (await client.get("/v1/dead-letters")).json()
        if letters:
            break
        await asyncio.sleep(0.05)
    return letters


class KillableServe:
    """A server process a test kills (SIGKILL) and starts again on the same store: ``args`` is
    its command line, its stderr is appended to ``log`` across restarts, ``starts`` counts the
    starts a subclass's ``start`` confirmed."""

    stop_timeout: float = 20  # seconds ``terminate`` waits

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def launch(self, timeout: float) -> str:
        """Start the process; its first line on stdout (waited for at most ``timeout`` s)."""
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=err,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        return (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode()

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), self.stop_timeout)


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def serve_command(tmp: Path, *extra: str) -> list[str]:
    pipelines = tmp / "p.yaml"
    if not pipelines.exists():
        pipelines.write_text(PIPELINES)
    return [sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(pipelines),
            "--store", str(tmp / "data" / "store.db"), "--http-port", "0", *extra]


@contextlib.asynccontextmanager
async def serving(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> AsyncIterator[Served]:
    err = tmp / f"serve-{len(list(tmp.glob('serve-*.log')))}.log"
    with err.open("wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            *serve_command(tmp, *extra), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=err_file,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()  # type: ignore[union-attr]
        assert line.startswith("ready "), (line, err.read_text())
        yield Served(proc, line.split()[1], tmp / "data" / "store.db", err, line)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
