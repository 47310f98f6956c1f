"""Golioth's Firmware SDK (its Linux port) as a device for tests, against a real ``pipeline serve``.

Usage (fixtures in ``conftest.py``)::

    def test_x(golioth_sdk, tmp_path):                 # golioth_sdk: SdkBuilds, built once
        router = SdkRouter(tmp_path, pipelines_yaml)   # pipeline serve in a private network namespace
        await router.start()
        key = router.add_device("dev-1")               # pipeline devices add: identity dev-1@demo
        device = await router.run(golioth_sdk.basics, "dev-1", key)
        await device.wait_for("Golioth CoAP client connected", 30)
        ...
        await device.stop(); await router.stop()

Builds: ``golioth_basics`` and the HIL ``stream``, ``connection`` and ``lightdb`` programs, out
of tree with ``-DDTLS_BACKEND=openssl``, in ``~/.cache/iot-pipelines/golioth-sdk/<hash>/`` where
``<hash>`` covers every file of the SDK (its path, size and mtime: the SDK copy has no git
commit), so a second run reuses them. The SDK is never written to. Missing build tools
(``cmake``, a C compiler, ``libssl-dev``; ``./dev setup`` installs them) FAIL the tests.

Network: the SDK always connects to ``coaps://127.0.0.1`` port 5684 (``CONFIG_GOLIOTH_COAP_HOST_URI``
is compiled in, and its URI parser hands ``host:port`` to ``getaddrinfo`` whole). So that tests
running at the same time never compete for that port, the router runs in a private network
namespace (``unshare -n``, its own loopback) on 5684, and each device joins that namespace
(``nsenter --net``). This needs CAP_SYS_ADMIN (root in the CI container), like the mount
namespace the SDK notes suggest; it needs no compile-time port, so builds can be cached.
The test process reads results with the ``pipeline`` CLI (the store file) and reaches the
router's HTTP face and plain CoAP through ``tests/netns_client.py`` run inside the namespace.

Keys: the device key is the one ``pipeline devices add`` generates.
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
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NETNS_CLIENT = Path(__file__).resolve().parent / "netns_client.py"
PROJECT = "demo"
SDK_PORT = 5684  # what the SDK's default URI means

#: tinydtls (the router's DTLS until issue 11's OpenSSL stack lands) fails PSKs over 18 bytes
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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


def check_build_tools() -> None:
    missing = [t for t in ("cmake", "make", "cc") if shutil.which(t) is None]
    if not Path("/usr/include/openssl/ssl.h").exists():
        missing.append("libssl-dev (OpenSSL headers)")
    for tool in ("unshare", "nsenter", "ip", "stdbuf"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if missing:
        pytest.fail("building/running the Golioth SDK needs: " + ", ".join(missing)
                    + " (Debian: cmake build-essential libssl-dev iproute2; ./dev setup installs them)")


@dataclass
class SdkBuilds:
    basics: Path
    hil_stream: Path
    hil_connection: Path
    hil_lightdb: Path
    sdk: Path


def _build(sdk: Path, out: Path, source: Path, defines: list[str]) -> Path:
    """cmake + make into ``out`` (if not already built); returns the built program."""
    done = out / ".built"
    if done.exists():
        return Path(done.read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out / "build.log"
    with log.open("w") as f:
        for cmd in (["cmake", "-S", str(source), "-B", str(out), "-DDTLS_BACKEND=openssl", *defines],
                    ["make", "-C", str(out), f"-j{min(4, os.cpu_count() or 1)}"]):
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=900).returncode
            if rc != 0:
                pytest.fail(f"building {source.relative_to(sdk)} failed ({' '.join(cmd[:2])}): see {log}")
    programs = [p for p in (out / "golioth_basics", out / "hil") if p.exists()]
    assert programs, f"no program was built in {out}"
    done.write_text(str(programs[0]))
    return programs[0]


def build_all(cache: Path | None = None) -> SdkBuilds:
    check_build_tools()
    sdk = sdk_dir()
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iot-pipelines" / "golioth-sdk"
    root = cache / sdk_hash(sdk)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (root / ".lock").open("w") as lock:  # other test runs on this machine build the same
        fcntl.flock(lock, fcntl.LOCK_EX)
        uri = "coaps://127.0.0.1"
        basics = _build(sdk, root / "basics", sdk / "examples" / "linux" / "golioth_basics",
                        [f'-DCMAKE_C_FLAGS=-DCONFIG_GOLIOTH_COAP_HOST_URI=\\"{uri}\\"'])
        hil = {name: _build(sdk, root / f"hil-{name}", sdk / "tests" / "hil" / "platform" / "linux",
                            [f"-DGOLIOTH_HIL_TEST={name}", f"-DCONFIG_GOLIOTH_COAP_HOST_URI={uri}"])
               for name in ("stream", "connection", "lightdb")}
    print(f"Golioth SDK programs in {root} ({time.monotonic() - started:.1f} s)")
    return SdkBuilds(basics, hil["stream"], hil["connection"], hil["lightdb"], sdk)


def _pipeline(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


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
            line = _ANSI.sub("", raw.decode(errors="replace")).rstrip()
            self.lines.append(line)
            self._new.set()
        self._new.set()

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.lines if rx.search(line))

    async def wait_for(self, pattern: str, timeout: float, start: int = 0) -> int:
        """Index of the first line from ``start`` on matching ``pattern``; fails after ``timeout``."""
        rx = re.compile(pattern)
        deadline = asyncio.get_running_loop().time() + timeout
        i = start
        while True:
            while i < len(self.lines):
                if rx.search(self.lines[i]):
                    return i
                i += 1
            if self._reader.done():
                raise AssertionError(f"{self.name} exited (rc {self.proc.returncode}) before /{pattern}/:\n"
                                     + self.tail())
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"{self.name}: no /{pattern}/ within {timeout} s:\n" + self.tail())
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


class SdkRouter:
    """``pipeline serve`` in its own network namespace, DTLS on 5684 and plain CoAP on 5683."""

    def __init__(self, tmp: Path, pipelines_yaml: str, *extra_args: str) -> None:
        self.tmp = tmp
        self.store = tmp / "store.db"
        self.registry = tmp / "devices.yaml"
        self.pipelines = tmp / "pipelines.yaml"
        self.pipelines.write_text(pipelines_yaml)
        self.extra_args = list(extra_args)
        self.log = tmp / "serve.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.http_url = ""

    def add_device(self, device_id: str) -> str:
        """``pipeline devices add``; returns the key it generated."""
        args = ["devices", "add", "--registry", str(self.registry), "--project", PROJECT, device_id]
        out = _pipeline(*args)
        assert out.returncode == 0, out.stderr
        m = re.search(r"key \(shown once[^)]*\): (\S+)", out.stdout + out.stderr)
        assert m, f"pipeline devices add printed no key: {out.stdout!r} {out.stderr!r}"
        return m.group(1)

    async def start(self) -> None:
        if not self.registry.exists():
            self.registry.write_text(f"project_id: {PROJECT}\ndevices: []\n")
        serve = [sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(self.pipelines),
                 "--store", str(self.store), "--registry", str(self.registry), "--http-port", "0",
                 "--coap-dtls-port", str(SDK_PORT), "--coap-port", "5683", "--log-level", "INFO",
                 *self.extra_args]
        script = "ip link set lo up && exec " + " ".join(_quote(a) for a in serve)
        with self.log.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                "unshare", "-n", "sh", "-c", script, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=err,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 60)).decode()
        assert line.startswith("ready http://"), f"router did not start: {line!r}\n{self.log.read_text()[-3000:]}"
        self.http_url = line.split()[1]

    @property
    def netns(self) -> str:
        assert self.proc is not None
        return f"--net=/proc/{self.proc.pid}/ns/net"

    async def run(self, program: Path, device_id: str, key: str, *, hil: bool) -> Device:
        """Start an SDK program as ``device_id`` inside the router's namespace."""
        identity = f"{device_id}@{PROJECT}"
        env = dict(os.environ)
        if hil:
            env.update(GOLIOTH_PSK_ID=identity, GOLIOTH_PSK=key)
        else:
            env.update(GOLIOTH_SAMPLE_PSK_ID=identity, GOLIOTH_SAMPLE_PSK=key)
        proc = await asyncio.create_subprocess_exec(
            "nsenter", self.netns, "stdbuf", "-oL", "-eL", str(program), cwd=program.parent,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
        return Device(proc, f"{program.parent.name}/{program.name}")

    async def netns_client(self, requests: list[dict]) -> list[dict]:
        """Run ``tests/netns_client.py`` in the namespace: plain-CoAP and HTTP requests, in order."""
        proc = await asyncio.create_subprocess_exec(
            "nsenter", self.netns, sys.executable, str(NETNS_CLIENT), cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(requests).encode()), 120)
        assert proc.returncode == 0, err.decode()[-3000:]
        return json.loads(out)

    async def metrics(self) -> str:
        [answer] = await self.netns_client([{"http": self.http_url + "/metrics"}])
        return answer["body"]

    def cli(self, *args: str) -> object:
        out = _pipeline(*args, "--store", str(self.store))
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    async def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode or 0


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


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
