"""Golioth's Firmware SDK (its Linux port) as a real device for tests, against ``pipeline serve``.

Usage::

    program = build_sdk_program("golioth_basics")      # or "hil-ota", "hil-settings", "hil-rpc", ...
    async with private_network() as net:                 # a network namespace with its own loopback
        router = SdkRouter(net, tmp_path, registry_yaml, pipelines_yaml)
        await router.start()                             # pipeline serve, DTLS on 5684 in ``net``
        async with run_sdk_device(net, program, "dev-1@demo", key) as device:
            await device.wait_for("Golioth CoAP client connected", 30)
            await router.restart()                       # same store, same namespace: a reconnect
        await router.stop()

Builds happen out of tree with ``-DDTLS_BACKEND=openssl`` into
``~/.cache/iot-pipelines/golioth-sdk/<hash>/<name>/``; ``<hash>`` covers every file of the SDK
(path, size, mtime: the SDK copy has no git metadata), so a second run reuses the build, and a
lock keeps concurrent test runs from building the same thing twice. The SDK is never written to.
Missing tools (cmake, a C compiler, libssl-dev, unshare/nsenter/ip) FAIL the tests: ``./dev
setup`` installs them.

Why a network namespace: the SDK connects to ``coaps://127.0.0.1`` on 5684 only (its URI
parser hands ``host:port`` to ``getaddrinfo`` whole, so a port in the URI fails), and other
tests run at the same time. In a private namespace (``unshare -n``, held open by a ``sleep``)
5684 is always free, builds need no compile-time port, and the router can be restarted in the
same namespace while the device keeps running (a reconnect). Needs CAP_SYS_ADMIN (root in CI).
The test process talks to the router through its store file only (``pipeline`` commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SDK_PORT = 5684
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def sdk_dir() -> Path:
    env = os.environ.get("GOLIOTH_SDK")
    candidates = [Path(env)] if env else []
    candidates += [ROOT.parent / "shared" / "golioth-firmware-sdk",
                   ROOT.parent.parent / "shared" / "golioth-firmware-sdk"]
    for c in candidates:
        if (c / "port" / "linux" / "golioth_sdk").is_dir():
            return c
    pytest.fail(f"Golioth Firmware SDK not found (looked in {', '.join(map(str, candidates))}); "
                "set GOLIOTH_SDK=/path/to/golioth-firmware-sdk")


def sdk_hash(sdk: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in sdk.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(sdk)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _check_tools() -> None:
    missing = [t for t in ("cmake", "make", "cc", "unshare", "nsenter", "ip", "stdbuf") if shutil.which(t) is None]
    if not Path("/usr/include/openssl/ssl.h").exists():
        missing.append("libssl-dev (OpenSSL headers)")
    if missing:
        pytest.fail("the Golioth SDK tests need: " + ", ".join(missing)
                    + " (Debian: cmake build-essential libssl-dev iproute2 util-linux; ./dev setup)")


def build_sdk_program(name: str) -> Path:
    """``golioth_basics`` or ``hil-<test>`` (a test of ``tests/hil/tests``), built once."""
    _check_tools()
    sdk = sdk_dir()
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iot-pipelines" / "golioth-sdk"
    root = root / sdk_hash(sdk)
    root.mkdir(parents=True, exist_ok=True)
    uri = "coaps://127.0.0.1"
    if name == "golioth_basics":
        out, source = root / "basics", sdk / "examples" / "linux" / "golioth_basics"
        defines = [f'-DCMAKE_C_FLAGS=-DCONFIG_GOLIOTH_COAP_HOST_URI=\\"{uri}\\"']
    elif name.startswith("hil-") and (sdk / "tests" / "hil" / "tests" / name[4:]).is_dir():
        out, source = root / name, sdk / "tests" / "hil" / "platform" / "linux"
        defines = [f"-DGOLIOTH_HIL_TEST={name[4:]}", f"-DCONFIG_GOLIOTH_COAP_HOST_URI={uri}"]
    else:
        raise ValueError(f"unknown SDK program {name!r}: golioth_basics or hil-<test>")
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = out / ".built"
        if done.exists():
            return Path(done.read_text())
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        log = out / "build.log"
        with log.open("w") as f:
            for cmd in (["cmake", "-S", str(source), "-B", str(out), "-DDTLS_BACKEND=openssl", *defines],
                        ["make", "-C", str(out), f"-j{min(4, os.cpu_count() or 1)}"]):
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=1200).returncode != 0:
                    pytest.fail(f"building {name} failed ({' '.join(cmd[:2])}): see {log}")
        program = next(p for p in (out / "golioth_basics", out / "hil") if p.exists())
        done.write_text(str(program))
        return program


class Net:
    """A private network namespace, held open by a ``sleep`` process."""

    def __init__(self, holder: asyncio.subprocess.Process) -> None:
        self.holder = holder

    def enter(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", *cmd]


@contextlib.asynccontextmanager
async def private_network() -> AsyncIterator[Net]:
    holder = await asyncio.create_subprocess_exec(
        "unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep 100000",
        stdout=asyncio.subprocess.PIPE)
    assert holder.stdout is not None
    line = await asyncio.wait_for(holder.stdout.readline(), 20)
    assert line.strip() == b"up", "could not make a network namespace (unshare -n needs CAP_SYS_ADMIN)"
    try:
        yield Net(holder)
    finally:
        holder.kill()
        await holder.wait()


class Device:
    """A running SDK program: its output lines (colours stripped), waitable."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(_ANSI.sub("", raw.decode(errors="replace")).rstrip())
            self._new.set()
        self._new.set()

    async def wait_for(self, pattern: str, timeout: float, start: int = 0) -> int:
        """Index of the first line from ``start`` on that matches; fails after ``timeout`` s."""
        rx = re.compile(pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        i = start
        while True:
            while i < len(self.lines):
                if rx.search(self.lines[i]):
                    return i
                i += 1
            if self._reader.done():
                raise AssertionError(f"{self.name} exited before /{pattern}/:\n{self.tail()}")
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"{self.name}: no /{pattern}/ within {timeout} s:\n{self.tail()}")
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 5)


@contextlib.asynccontextmanager
async def run_sdk_device(net: Net, program: Path, identity: str, key: str,
                         log: Path | None = None) -> AsyncIterator[Device]:
    """Run an SDK program in ``net`` with PSK credentials (both env spellings: sample and HIL);
    its output is written to ``log`` at the end, if given."""
    env = {**os.environ, "GOLIOTH_SAMPLE_PSK_ID": identity, "GOLIOTH_SAMPLE_PSK": key,
           "GOLIOTH_PSK_ID": identity, "GOLIOTH_PSK": key}
    proc = await asyncio.create_subprocess_exec(
        *net.enter("stdbuf", "-oL", "-eL", str(program)), cwd=program.parent, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    device = Device(proc, program.name)
    try:
        yield device
    finally:
        await device.stop()
        if log is not None:
            log.write_text("\n".join(device.lines) + "\n")


def pipeline(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The ``pipeline`` CLI as a subprocess (outside the namespace: it only needs the store)."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


class SdkRouter:
    """``pipeline serve`` inside ``net``: DTLS on 5684; restartable on the same store."""

    def __init__(self, net: Net, tmp: Path, registry_yaml: str, pipelines_yaml: str) -> None:
        self.net = net
        self.store = tmp / "store.db"
        self.registry = tmp / "devices.yaml"
        self.registry.write_text(registry_yaml)
        self.pipelines = tmp / "pipelines.yaml"
        self.pipelines.write_text(pipelines_yaml)
        self.log = tmp / "serve.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(self.pipelines),
               "--store", str(self.store), "--registry", str(self.registry), "--http-port", "0",
               "--coap-dtls-port", str(SDK_PORT), "--log-level", "INFO"]
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.net.enter("sh", "-c", "exec " + " ".join(shlex.quote(a) for a in cmd)), cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 60)).decode()
        assert line.startswith("ready"), f"router did not start: {line!r}\n{self.log.read_text()[-3000:]}"

    async def stop(self, kill: bool = False) -> None:
        """SIGTERM (a clean stop), or with ``kill`` SIGKILL: gone at once, mid-exchange."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None

    async def restart(self, kill: bool = False) -> None:
        await self.stop(kill)
        await self.start()
