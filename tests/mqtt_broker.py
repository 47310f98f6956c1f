"""A real mosquitto broker on a free loopback port, for tests and benchmarks.

Usage::

    with Mosquitto(tmp_path, persistence=True) as broker:
        broker.port                   # 127.0.0.1:<port>
        broker.restart()              # stop (SIGTERM, state saved) and start on the same port
        broker.publish("demo/cam-1/stream/x", b"...", content_type="image/png")  # mosquitto_pub -V 5

The config is written to a temp file (``listener PORT 127.0.0.1``, ``allow_anonymous true``,
optional ``persistence``); the broker runs as ``/usr/sbin/mosquitto -c conf``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    def __init__(self, workdir: Path, *, persistence: bool = False, port: int | None = None,
                 extra: str = "") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 # the delivery promise needs the broker not to drop queued QoS 1 messages
                 "max_queued_messages 0", "max_inflight_messages 0"]
        if os.geteuid() == 0:
            lines.append("user root")  # stay root: the temp dirs are root's (persistence writes there)
        if persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/",
                      "autosave_interval 1"]
        self.conf.write_text("\n".join(lines) + "\n" + extra)
        self.log = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=self._log_file,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log_file", None):
            self._log_file.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, content_type: str | None = None,
                v5: bool = True) -> None:
        """One message with ``mosquitto_pub`` (payload from stdin, so bytes stay bytes)."""
        cmd = [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(self.port), "-t", topic, "-q", str(qos), "-s"]
        if v5:
            cmd += ["-V", "5"]
        if content_type:
            cmd += ["-D", "publish", "content-type", content_type]
        subprocess.run(cmd, input=payload, check=True, timeout=10, capture_output=True)
