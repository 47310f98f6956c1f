"""Separate bind addresses, and every interface (issue 14, finding 1): ``--host 0.0.0.0`` failed
with "Set of Tasks/Futures is empty", aiocoap's shutdown error hiding the real one."""

from __future__ import annotations

import asyncio
import json
import socket

import aiocoap
import httpx
from aiocoap import Code

from tests.serve_process import cli, serve_command, serving


async def test_every_interface_for_coap_and_http_with_a_key(tmp_path):
    registry = tmp_path / "devices.yaml"
    registry.write_text('project_id: demo\ndevices:\n  - id: dev-1\n    psk: "dev-1-secret-key"\n')
    registry.chmod(0o600)
    key = cli("keys", "create", "--scope", "read", "--store", str(tmp_path / "data" / "store.db")).stdout.strip()
    async with serving(tmp_path, "--http-host", "0.0.0.0", "--coap-host", "0.0.0.0", "--coap-port", "0",
                       "--registry", str(registry)) as srv:
        port = int(srv.proc_line.split("coap://0.0.0.0:")[1].split()[0])
        ctx = await aiocoap.Context.create_client_context()
        try:
            r = await ctx.request(aiocoap.Message(code=Code.POST, uri=f"coap://127.0.0.1:{port}/.s/temp?d=dev-1",
                                                  payload=json.dumps({"t": 21}).encode(),
                                                  content_format=50)).response
            assert r.code.is_successful(), r
        finally:
            await ctx.shutdown()
        async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}) as c:
            for _ in range(100):
                doc = (await c.get("/v1/devices/demo/dev-1/state")).json()
                if doc:
                    break
                await asyncio.sleep(0.05)
    assert doc == {"last": {"t": 21}}


async def test_a_coap_port_in_use_is_reported_as_such(tmp_path):
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        proc = await asyncio.create_subprocess_exec(
            *serve_command(tmp_path, "--coap-port", str(taken.getsockname()[1])),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        taken.close()
    assert proc.returncode == 2 and not out.startswith(b"ready")
    assert b"in use" in err and b"Set of Tasks" not in err


def test_pipeline_run_on_every_interface_needs_a_key_and_then_works(tmp_path):
    """The issue's own reproduction: ``pipeline run --host 0.0.0.0``, over DTLS."""
    data = tmp_path / "data"
    argv = ("run", "--data", str(data), "--host", "0.0.0.0", "--http-port", "0", "--coap-port", "0",
            "--devices", "1", "--interval", "0.5", "--duration", "4", "--plain-output")
    refused = cli(*argv)
    assert refused.returncode == 2 and "pipeline keys create --scope admin" in refused.stderr
    assert cli("keys", "create", "--scope", "admin", "--store", str(data / "store.db")).returncode == 0
    ran = cli(*argv)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "every frame accounted for" in ran.stdout and "http://127.0.0.1:" in ran.stdout
