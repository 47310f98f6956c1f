"""Golioth's Firmware SDK (its Linux port) as a device for tests, against a real ``pipeline serve``.

Usage (the ``golioth_sdk`` fixture in ``conftest.py`` is a :class:`Sdk`)::

    def test_x(golioth_sdk, tmp_path):
        router = SdkRouter(tmp_path, pipelines_yaml)   # pipeline serve in a private network namespace
        key = router.add_device("dev-1")               # pipeline devices add: identity dev-1@demo
        await router.start()
        try:
            async with await router.run(golioth_sdk.program("golioth_basics"), "dev-1", key) as device:
                await device.wait_for("Golioth CoAP client connected", 30)
                await router.restart(kill=True)        # same store, same namespace: a reconnect
                metrics = await router.metrics()       # /metrics, read inside the namespace
                state = router.cli("state", "dev-1", "--project", PROJECT)
        finally:
            assert await router.stop() == 0

Programs: ``golioth_basics`` (``examples/linux/golioth_basics``) or ``hil-<test>`` (the HIL
platform program built for ``tests/hil/tests/<test>``), built on first use by :func:`build`,
out of tree with ``-DDTLS_BACKEND=openssl``, into ``~/.cache/iot-pipelines/golioth-sdk/<hash>/``
where ``<hash>`` covers every file of the SDK (path, size and mtime: the SDK copy has no git
commit), so a second run reuses them; a lock keeps concurrent test runs from building the same
thing twice. The SDK is never written to. Missing build tools (``cmake``, a C compiler,
``libssl-dev``, ``unshare``/``nsenter``/``ip``/``stdbuf``; ``./dev setup`` installs them) FAIL
the tests.

Network: the SDK always connects to ``coaps://127.0.0.1`` port 5684 (``CONFIG_GOLIOTH_COAP_HOST_URI``
is compiled in, and its URI parser hands ``host:port`` to ``getaddrinfo`` whole). So that tests
running at the same time never compete for that port, each :class:`SdkRouter` makes a private
network namespace (``unshare -n``, its own loopback, held open by a ``sleep``) and runs the
router (DTLS on 5684, plain CoAP on 5683), its devices and ``tests/netns_client.py`` in it
(``nsenter --net``). Because the namespace outlives the router, the router can be restarted or
killed while a device keeps running. This needs CAP_SYS_ADMIN (root in the CI container); it
needs no compile-time port, so builds can be cached. The test process reads results with the
``pipeline`` CLI on the store file (:func:`pipeline`, :meth:`SdkRouter.cli`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NETNS_CLIENT = Path(__file__).resolve().parent / "netns_client.py"
PROJECT = "demo"
SDK_PORT = 5684  # what the SDK's default URI means
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def sdk_dir() -> Path:
    """The Golioth Firmware SDK beside the repository (``../shared`` of the main checkout)."""
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


def check_tools() -> None:
    missing = [t for t in ("cmake", "make", "cc", "unshare", "nsenter", "ip", "stdbuf") if shutil.which(t) is None]
    if not Path("/usr/include/openssl/ssl.h").exists():
        missing.append("libssl-dev (OpenSSL headers)")
    if missing:
        pytest.fail("building/running the Golioth SDK needs: " + ", ".join(missing)
                    + " (Debian: cmake build-essential libssl-dev iproute2 util-linux; ./dev setup installs them)")


def build(sdk: Path, name: str, cache: Path | None = None) -> Path:
    """``golioth_basics`` or ``hil-<test>``, built once per SDK contents; returns the program."""
    uri = "coaps://127.0.0.1"  # the SDK's port (5684) is its default
    if name == "golioth_basics":
        dirname, source = "basics", sdk / "examples" / "linux" / "golioth_basics"
        defines = [f'-DCMAKE_C_FLAGS=-DCONFIG_GOLIOTH_COAP_HOST_URI=\\"{uri}\\"']
    elif name.startswith("hil-") and (sdk / "tests" / "hil" / "tests" / name[4:]).is_dir():
        dirname, source = name, sdk / "tests" / "hil" / "platform" / "linux"
        defines = [f"-DGOLIOTH_HIL_TEST={name[4:]}", f"-DCONFIG_GOLIOTH_COAP_HOST_URI={uri}"]
    else:
        raise ValueError(f"unknown SDK program {name!r}: golioth_basics or hil-<test>")
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iot-pipelines" / "golioth-sdk"
    root = cache / sdk_hash(sdk)
    root.mkdir(parents=True, exist_ok=True)
    out = root / dirname
    started = time.monotonic()
    with (root / ".lock").open("w") as lock:  # other test runs on this machine build the same
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
        programs = [p for p in (out / "golioth_basics", out / "hil") if p.exists()]
        assert programs, f"no program was built in {out}"
        done.write_text(str(programs[0]))
    print(f"built Golioth SDK {name} in {out} ({time.monotonic() - started:.1f} s)")
    return programs[0]


class Sdk:
    """The SDK checkout (``path``) and its programs, each built on first use (:func:`build`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def program(self, name: str) -> Path:
        return build(self.path, name)


def find_sdk() -> Sdk:
    """What the ``golioth_sdk`` fixture returns: fails at once when the SDK or a tool is missing."""
    check_tools()
    return Sdk(sdk_dir())


def pipeline(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The ``pipeline`` CLI as a subprocess (outside the namespace: it only needs the store)."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=_ENV)


async def _end(proc: asyncio.subprocess.Process, sig: int, timeout: float) -> None:
    """Send ``sig`` (if still running) and wait; SIGKILL after ``timeout`` s."""
    if proc.returncode is None:
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class Device:
    """A running SDK program: its output lines (colours stripped), waitable. As an async context
    manager it is stopped at the end; its output is written to ``log`` (if given) when it stops."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, log: Path | None = None) -> None:
        self.proc = proc
        self.name = name
        self.log = log
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(_ANSI.sub("", raw.decode(errors="replace")).rstrip())
            self._new.set()
        self._new.set()

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.lines if rx.search(line))

    async def wait_for(self, pattern: str, timeout: float, start: int = 0) -> int:
        """Index of the first line from ``start`` on matching ``pattern``; fails after ``timeout`` s."""
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
                raise AssertionError(f"{self.name} exited (rc {self.proc.returncode}) before /{pattern}/:\n"
                                     + self.tail())
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"{self.name}: no /{pattern}/ within {timeout} s:\n" + self.tail())
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    async def stop(self) -> None:
        await _end(self.proc, signal.SIGTERM, 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 5)
        if self.log is not None:
            self.log.write_text("\n".join(self.lines) + "\n")

    async def __aenter__(self) -> Device:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class SdkRouter:
    """``pipeline serve`` in its own network namespace (DTLS on 5684, plain CoAP on 5683), with
    its registry (:meth:`add_device`), SDK devices (:meth:`run`) and ``/metrics`` in that
    namespace. :meth:`restart` keeps the store and the namespace; :meth:`stop` ends both."""

    def __init__(self, tmp: Path, pipelines_yaml: str, *extra_args: str) -> None:
        """``extra_args`` go to ``pipeline serve`` after the defaults (``--log-level DEBUG``...)."""
        self.tmp = tmp
        self.extra_args = list(extra_args)
        self.store = tmp / "store.db"
        self.registry = tmp / "devices.yaml"
        self.pipelines = tmp / "pipelines.yaml"
        self.pipelines.write_text(pipelines_yaml)
        self.log = tmp / "serve.log"
        self.proc: asyncio.subprocess.Process | None = None
        self._holder: asyncio.subprocess.Process | None = None  # keeps the namespace open
        self.http_url = ""

    def add_device(self, device_id: str) -> str:
        """``pipeline devices add``; returns the key it generated (identity ``device_id@demo``)."""
        out = pipeline("devices", "add", "--registry", str(self.registry), "--project", PROJECT, device_id)
        assert out.returncode == 0, out.stderr
        m = re.search(r"key \(shown once[^)]*\): (\S+)", out.stdout + out.stderr)
        assert m, f"pipeline devices add printed no key: {out.stdout!r} {out.stderr!r}"
        return m.group(1)

    def enter(self, *cmd: str) -> list[str]:
        """``cmd`` run inside the router's network namespace."""
        assert self._holder is not None, "the router was not started"
        return ["nsenter", f"--net=/proc/{self._holder.pid}/ns/net", *cmd]

    async def start(self) -> None:
        """The namespace (on first start), then ``pipeline serve`` in it, up and listening."""
        if self._holder is None:
            holder = await asyncio.create_subprocess_exec(
                "unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep 100000",
                stdout=asyncio.subprocess.PIPE)
            assert holder.stdout is not None
            line = await asyncio.wait_for(holder.stdout.readline(), 20)
            if line.strip() != b"up":
                await _end(holder, signal.SIGKILL, 5)
                raise AssertionError("could not make a network namespace (unshare -n needs CAP_SYS_ADMIN)")
            self._holder = holder
        if not self.registry.exists():
            self.registry.write_text(f"project_id: {PROJECT}\ndevices: []\n")
        serve = [sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(self.pipelines),
                 "--store", str(self.store), "--registry", str(self.registry), "--http-port", "0",
                 "--coap-dtls-port", str(SDK_PORT), "--coap-port", "5683", "--log-level", "INFO",
                 *self.extra_args]
        try:
            with self.log.open("ab") as err:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.enter(*serve), cwd=ROOT,
                    stdout=asyncio.subprocess.PIPE, stderr=err, env=_ENV)
            assert self.proc.stdout is not None
            line = (await asyncio.wait_for(self.proc.stdout.readline(), 60)).decode()
            assert line.startswith("ready http://"), f"router did not start: {line!r}\n{self.log.read_text()[-3000:]}"
        except BaseException:
            await self.stop()
            raise
        self.http_url = line.split()[1]

    async def run(self, program: Path, device_id: str, key: str) -> Device:
        """Start an SDK program as ``device_id`` inside the namespace (the PSK in both env
        spellings: the sample's and the HIL programs'); its output goes to ``device-<id>.log``."""
        identity = f"{device_id}@{PROJECT}"
        env = {**os.environ, "GOLIOTH_SAMPLE_PSK_ID": identity, "GOLIOTH_SAMPLE_PSK": key,
               "GOLIOTH_PSK_ID": identity, "GOLIOTH_PSK": key}
        proc = await asyncio.create_subprocess_exec(
            *self.enter("stdbuf", "-oL", "-eL", str(program)), cwd=program.parent, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        return Device(proc, f"{program.parent.name}/{program.name}", self.tmp / f"device-{device_id}.log")

    async def netns_client(self, requests: list[dict]) -> list[dict]:
        """Run ``tests/netns_client.py`` in the namespace: plain-CoAP and HTTP requests, in order."""
        proc = await asyncio.create_subprocess_exec(
            *self.enter(sys.executable, str(NETNS_CLIENT)), cwd=ROOT, env=_ENV,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(requests).encode()), 120)
        assert proc.returncode == 0, err.decode()[-3000:]
        return json.loads(out)

    async def metrics(self) -> str:
        [answer] = await self.netns_client([{"http": self.http_url + "/metrics"}])
        return answer["body"]

    def cli(self, *args: str) -> object:
        """``pipeline ARGS --store STORE``, which must succeed; its JSON output."""
        out = pipeline(*args, "--store", str(self.store))
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    async def _stop_serve(self, kill: bool) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        await _end(proc, signal.SIGKILL if kill else signal.SIGTERM, 20)
        return proc.returncode or 0

    async def restart(self, kill: bool = False) -> None:
        """Stop ``pipeline serve`` (SIGTERM, or with ``kill`` SIGKILL: gone at once, mid-exchange)
        and start it again on the same store, in the same namespace (devices keep running)."""
        await self._stop_serve(kill)
        await self.start()

    async def stop(self) -> int:
        """SIGTERM to ``pipeline serve``, then the namespace ends; the router's exit code."""
        try:
            return await self._stop_serve(kill=False)
        finally:
            holder, self._holder = self._holder, None
            if holder is not None:
                await _end(holder, signal.SIGKILL, 5)


def rate_limited(metrics_text: str, device_id: str) -> float:
    """The router's ``pipeline_coap_rate_limited_total`` for one device (0 when absent)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("pipeline_coap_rate_limited_total{") and f'device="{device_id}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def keepalives(metrics_text: str) -> float:
    """The router's ``pipeline_coap_keepalives_total`` (keep-alives it answered)."""
    for line in metrics_text.splitlines():
        if line.startswith("pipeline_coap_keepalives_total "):
            return float(line.split()[1])
    raise AssertionError("no pipeline_coap_keepalives_total in /metrics")
