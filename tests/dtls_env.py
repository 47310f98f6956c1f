"""What the DTLS tests share: a real Router + CoAP ingest (DTLS on a free port) delivering to a
real HTTP recorder, seeded keys, and waiting for events.

    async with dtls_router(tmp_path, hook, registry_text) as srv:   # srv: CoapIngest
        ...  srv.dtls_port, srv.dtls (the transport: .stats, .session_count, .handshake_count)
    got = await delivered(hook, message_id)                          # the recorded webhook request
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

from pipelines.ingest.coap import CoapIngest, CoapSettings
from pipelines.router import Router, RouterSettings

try:
    from tests.http_recorder import HTTPRecorder
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from http_recorder import HTTPRecorder


def seeded(seed: int) -> random.Random:
    print(f"random seed: {seed}")
    return random.Random(seed)


def pipelines_file(tmp_path: Path, hook: HTTPRecorder, name: str = "all", more: str = "") -> Path:
    """``pipelines.yaml``: pipeline ``name`` sends ``/images`` to ``hook``; ``more``: further
    pipelines (YAML text indented under ``pipelines:``)."""
    path = tmp_path / "pipelines.yaml"
    path.write_text(f"""\
pipelines:
  {name}:
    filter: {{path: /images}}
    steps:
      - name: out
        destination: {{type: webhook, version: v1, parameters: {{url: "{hook.url('/hook')}"}}}}
""" + more)
    return path


@contextlib.asynccontextmanager
async def dtls_router(tmp_path: Path, hook: HTTPRecorder, registry: str, **settings) -> AsyncIterator[CoapIngest]:
    registry_path = tmp_path / "devices.yaml"
    registry_path.write_text(registry)
    router_settings = RouterSettings(pipelines=[pipelines_file(tmp_path, hook)], store_path=tmp_path / "s.db")
    coap = dict(host="127.0.0.1", port=0, dtls_port=0, registry_path=registry_path, rate_limit=0)
    coap.update(settings)
    async with Router(router_settings) as router, CoapIngest(router, CoapSettings(**coap)) as srv:
        yield srv


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def delivered(hook: HTTPRecorder, message_id: str, timeout: float = 10.0):
    def find():
        return next((r for r in hook.requests if r.headers.get("Ce-Id") == message_id), None)
    return await wait_for(find, timeout, f"delivery of {message_id}")


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")
