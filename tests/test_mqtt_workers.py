"""Scale-out: two `pipeline mqtt-worker` processes share one subscription; one is SIGKILLed.

Real mosquitto, real worker processes (each with its own store file), a real HTTP server
as the webhook destination. Every QoS 1 message the broker acknowledged to the device
must reach the webhook at least once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import httpx

from tests.http_recorder import HTTPRecorder
from tests.mqtt_broker import Mosquitto, free_port
from tests.test_mqtt_ingest import pipeline_file, wait_for

REPO = Path(__file__).resolve().parent.parent


class Worker:
    def __init__(self, tmp_path: Path, name: str, port: int, pipelines: Path, *extra: str) -> None:
        self.name = name
        self.store = tmp_path / f"{name}.db"
        self.log = tmp_path / f"{name}.log"
        self.cmd = [sys.executable, "-m", "pipelines.cli", "mqtt-worker",
                    "--broker", f"mqtt://127.0.0.1:{port}", "--pipelines", str(pipelines),
                    "--store", str(self.store), "--group", "workers", "--client-id", name,
                    "--max-inflight", "20", *extra]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self._out = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def subscriptions(self) -> int:
        return self.log.read_text(errors="replace").count("subscribed to $share/workers/")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def ingested(self) -> int:
        with sqlite3.connect(self.store, timeout=10) as conn:
            return conn.execute("SELECT value FROM counters WHERE name='ingested'").fetchone()[0]


async def test_two_workers_share_the_load_and_survive_sigkill(tmp_path: Path) -> None:
    n = 300
    with Mosquitto(tmp_path / "broker") as broker, HTTPRecorder() as hook:
        pipes = pipeline_file(tmp_path, hook.url("/hook"))
        a = Worker(tmp_path, "worker-a", broker.port, pipes)
        http_port = free_port()
        b = Worker(tmp_path, "worker-b", broker.port, pipes, "--http", f"127.0.0.1:{http_port}")
        try:
            a.start()
            b.start()
            await wait_for(lambda: a.subscriptions() and b.subscriptions(), timeout=30,
                           what="both workers subscribed")
            acked: list[int] = []

            async def device() -> None:
                async with aiomqtt.Client("127.0.0.1", broker.port,
                                          protocol=aiomqtt.ProtocolVersion.V5) as dev:
                    for i in range(n):
                        await dev.publish("demo/cam-1/stream/data", f"w{i}".encode(), qos=1)
                        acked.append(i)
                        await asyncio.sleep(0.003)

            task = asyncio.create_task(device())
            await wait_for(lambda: len(hook.requests) >= n // 3, timeout=30, what="a third delivered")
            await asyncio.to_thread(a.kill)  # mid-stream, with messages in flight
            await asyncio.wait_for(task, 30)
            # the killed worker comes back under its id and store: its unacked share returns
            a.start()
            want = {f"w{i}".encode() for i in acked}
            assert len(want) == n
            await wait_for(lambda: want <= {r.body for r in hook.requests}, timeout=30,
                           what="every acknowledged message at the webhook")
            # both took a share (shared subscription), each into its own store
            assert a.ingested() > 0 and b.ingested() > 0
            assert a.ingested() + b.ingested() >= n
            # the worker's HTTP face shows its own books
            metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
            assert f"pipeline_ingested_total {float(b.ingested())}" in metrics
        finally:
            a.stop()
            b.stop()


def test_worker_cli_reports_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipelines:\n  p:\n    steps:\n      - name: x\n        destination: {type: nope}\n")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "mqtt-worker", "--broker",
                          "mqtt://127.0.0.1:1", "--pipelines", str(bad), "--store", str(tmp_path / "s.db")],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown destination type 'nope'" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 60
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "mqtt-worker", "--broker", "http://x"],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "mqtt:// or mqtts:// URL" in out.stderr
