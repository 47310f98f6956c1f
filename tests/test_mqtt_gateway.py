"""Ingest gateway → broker → pipeline worker: a CoAP device served by a process without a store.

Real aiocoap server (CoapIngest on an MqttGateway) and client, real mosquitto, a real Router
with MqttIngest as the worker, a real HTTP server as the webhook destination.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code

from destinations.mqtt import MqttPublisher
from pipelines.ingest.coap import CoapIngest, CoapSettings
from pipelines.ingest.mqtt import GatewaySettings, MqttGateway, MqttIngest, MqttSettings
from pipelines.message import Message
from pipelines.router import Router, RouterSettings
from tests.http_recorder import HTTPRecorder
from tests.mqtt_broker import Mosquitto
from tests.test_mqtt_ingest import wait_for

PNG = bytes.fromhex("89504e470d0a1a0a") + bytes(range(256)) * 8  # two CoAP blocks and more


def worker_pipelines(tmp_path: Path, hook_url: str) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"""
pipelines:
  frames:
    filter: {{path: "/images"}}
    steps:
      - name: hook
        destination: {{type: webhook, version: v1, parameters: {{url: "{hook_url}"}}}}
  results:
    filter: {{path: "/images/result"}}
    steps:
      - name: to-device
        destination:
          type: mqtt
          version: v1
          parameters: {{topic: "{{project_id}}/{{device_id}}/state/result"}}
""")
    return p


def coap(method: Code, port: int, path: str, payload: bytes = b"", cf: int | None = None) -> aiocoap.Message:
    msg = aiocoap.Message(code=method, uri=f"coap://127.0.0.1:{port}/{path}?d=cam-1", payload=payload)
    if cf is not None:
        msg.opt.content_format = cf
    return msg


@pytest.fixture
async def setup(tmp_path: Path):
    with Mosquitto(tmp_path / "broker") as broker, HTTPRecorder() as hook:
        publisher = MqttPublisher(f"mqtt://127.0.0.1:{broker.port}")
        settings = RouterSettings(pipelines=[worker_pipelines(tmp_path, hook.url("/hook"))],
                                  store_path=tmp_path / "worker.db",
                                  extra={"mqtt_publish": publisher.publish})
        async with Router(settings) as router, \
                MqttIngest(router, MqttSettings(port=broker.port, shared_group="workers",
                                                trust_message_id=True)) as worker, \
                MqttGateway(GatewaySettings(port=broker.port)) as gateway, \
                CoapIngest(gateway, CoapSettings(port=0, dtls_enabled=False, plain_enabled=True,
                                                 rate_limit=0)) as server:
            await worker.wait_subscribed()
            ctx = await aiocoap.Context.create_client_context()
            try:
                yield hook, router, gateway, server.port, ctx
            finally:
                await ctx.shutdown()
                await publisher.close()


async def test_coap_upload_through_the_gateway_keeps_bytes_and_message_id(setup) -> None:
    hook, router, gateway, port, ctx = setup
    resp = await ctx.request(coap(Code.POST, port, ".s/images", PNG, cf=23)).response
    assert resp.code == Code.CHANGED, resp.payload
    message_id = resp.payload.decode()
    await wait_for(lambda: hook.requests, what="the webhook post")
    got = hook.requests[0]
    assert got.body == PNG
    assert got.headers.get("Content-Type") == "image/png"
    assert got.headers.get("Ce-Id") == message_id  # the worker kept the gateway's id
    assert gateway.stats["forwarded"] == 1
    books = await router.store.counters()
    assert books["ingested"] == 1


async def test_results_reach_the_coap_device_through_retained_state(setup) -> None:
    _, router, gateway, port, ctx = setup
    result = {"caption": "a cat", "frame_id": "f-1"}
    # the result comes back in as a message on the worker (as the predictions loop does)
    await router.accept(Message.new(project_id="default", device_id="cam-1", path="/images/result",
                                    content_type="application/json", payload=json.dumps(result).encode()))
    for _ in range(500):
        resp = await ctx.request(coap(Code.GET, port, ".d/result")).response
        if resp.code == Code.CONTENT and json.loads(resp.payload) == result:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"the device never saw its result: {resp.code} {resp.payload!r}")
    # a device write lands in the retained state topic and reads back
    resp = await ctx.request(coap(Code.PUT, port, ".d/config", b'{"interval": 5}', cf=50)).response
    assert resp.code == Code.CHANGED, resp.payload
    assert await gateway.get_state("default", "cam-1", "/config/interval") == 5
    resp = await ctx.request(coap(Code.DELETE, port, ".d/config")).response
    assert resp.code == Code.DELETED, resp.payload
    assert await gateway.get_state("default", "cam-1", "/config") is None
    assert await gateway.get_state("default", "cam-1", "/result") == result


async def test_gateway_without_broker_answers_overloaded(tmp_path: Path) -> None:
    from pipelines.ingest import Overloaded
    with Mosquitto(tmp_path / "broker") as broker:
        gateway = MqttGateway(GatewaySettings(port=broker.port, timeout=2))
        await gateway.start()
        try:
            broker.stop()
            msg = Message.new(device_id="cam-1", path="/images", content_type="image/png", payload=b"x")
            with pytest.raises(Overloaded, match="MQTT broker"):
                for _ in range(100):  # until the gateway notices the broker is gone
                    await gateway.accept(msg)
                    await asyncio.sleep(0.02)
        finally:
            await gateway.stop()
