"""``pipeline mqtt-gateway``: a real process serving CoAP, publishing into a real mosquitto.
A camera's upload reaches a subscriber byte-identical, with its content type and the message id
the camera got in its 2.04; bad arguments are refused with a clear message and exit 2."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiocoap
import aiomqtt
import pytest

from tests.mqtt_broker import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
FRAME = bytes(range(256)) * 12  # 3 KB: three Block1 blocks


async def _ready_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.startswith(b"ready "), line
    return line.decode()


async def test_a_coap_upload_is_published_with_its_bytes_type_and_id(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipelines.cli", "mqtt-gateway", "--broker", f"mqtt://127.0.0.1:{broker.port}",
            "--coap-port", "0", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready = await _ready_line(proc)
            port = int(ready.split("coap://127.0.0.1:")[1].split()[0])
            async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as sub:
                await sub.subscribe("+/+/stream/#", qos=1)
                ctx = await aiocoap.Context.create_client_context()
                try:
                    msg = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{port}/.s/images?d=cam-7",
                                          payload=FRAME, content_format=23)
                    answer = await asyncio.wait_for(ctx.request(msg).response, 15)
                finally:
                    await ctx.shutdown()
                assert answer.code == aiocoap.CHANGED, answer.payload
                got = await asyncio.wait_for(anext(aiter(sub.messages)), 15)
            assert got.topic.value.endswith("/cam-7/stream/images")
            assert got.payload == FRAME
            assert got.properties.ContentType == "image/png"
            assert ("message-id", answer.payload.decode()) in got.properties.UserProperty
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()


@pytest.mark.parametrize(("argv", "why"), [
    ([], "give --coap-dtls-port (with --registry) and/or --coap-port"),
    (["--coap-dtls-port", "0"], "CoAP over DTLS needs --registry"),
    (["--coap-port", "0", "--broker", "http://x"], "broker must be an mqtt:// or mqtts:// URL"),
    (["--coap-port", "0", "--broker", "mqtt://127.0.0.1:1", "--timeout", "1"],
     "MQTT broker 127.0.0.1:1 not reached within 1 s: "),
])
def test_bad_arguments_are_refused_clearly(argv: list[str], why: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "mqtt-gateway", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert why in proc.stderr
