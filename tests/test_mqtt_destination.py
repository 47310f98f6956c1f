"""The ``mqtt`` destination against a real mosquitto: templates, QoS, retain, v5 content type,
the router's own connection (``context.mqtt_publish``), reconnection, and bad parameters."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest

from destinations.mqtt import MqttDestination, MqttParams, MqttPublisher
from pipelines.components import ComponentContext, ComponentError, DeliveryError
from pipelines.config import load_pipelines
from pipelines.ingest.mqtt import MqttIngest, MqttSettings
from pipelines.message import Message
from pipelines.router import Router, RouterSettings
from tests.mqtt_broker import Mosquitto, free_port


async def next_message(client: aiomqtt.Client, timeout: float = 15.0) -> aiomqtt.Message:
    async def first() -> aiomqtt.Message:
        async for m in client.messages:
            return m
        raise AssertionError("subscription ended")
    return await asyncio.wait_for(first(), timeout)


def write_pipeline(tmp_path: Path, destination_params: str) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"""
pipelines:
  result-to-device:
    filter: {{path: "/images/result"}}
    steps:
      - name: to-device
        destination:
          type: mqtt
          version: v1
          parameters: {destination_params}
""")
    return p


async def test_results_go_back_to_the_device_state_topic_retained(tmp_path: Path) -> None:
    """device → MQTT → router → mqtt destination → <project>/<device>/state/<path>, retained."""
    result = json.dumps({"caption": "a cat", "frame_id": "f1"}).encode()
    with Mosquitto(tmp_path / "broker") as broker:
        pipes = write_pipeline(tmp_path, f'{{broker: "mqtt://127.0.0.1:{broker.port}"}}')
        settings = RouterSettings(pipelines=[pipes], store_path=tmp_path / "s.db")
        async with Router(settings) as router, MqttIngest(router, MqttSettings(port=broker.port)) as ingest:
            await ingest.wait_subscribed()
            async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as dev:
                await asyncio.to_thread(broker.publish, "demo/cam-1/stream/images/result", result,
                                        content_type="application/json")
                # a device that subscribes later still gets it: the state topic is retained
                for _ in range(500):
                    books = await router.store.counters()
                    if books["deliveries_delivered"] >= 1:
                        break
                    await asyncio.sleep(0.02)
                assert books["deliveries_delivered"] == 1
                await dev.subscribe("demo/cam-1/state/#", qos=1)
                got = await next_message(dev)
        assert got.topic.value == "demo/cam-1/state/images/result"
        assert got.payload == result
        assert got.retain is True
        assert got.qos == 1
        assert got.properties.ContentType == "application/json"


async def test_router_connection_template_qos0_and_content_type(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        publisher = MqttPublisher(f"mqtt://127.0.0.1:{broker.port}")
        pipes = write_pipeline(tmp_path, '{topic: "fleet/{device_id}/{project_id}/{path}", qos: 0, '
                                         'retain: false, content_type: "text/x-caption"}')
        settings = RouterSettings(pipelines=[pipes], store_path=tmp_path / "s.db",
                                  extra={"mqtt_publish": publisher.publish})
        async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as sub:
            await sub.subscribe("fleet/#", qos=1)
            async with Router(settings) as router:
                await router.accept(Message.new(project_id="demo", device_id="cam-7", path="/images/result",
                                                content_type="application/json", payload=b'{"x":1}'))
                got = await next_message(sub)
            await publisher.close()
        assert got.topic.value == "fleet/cam-7/demo/images/result"
        assert got.payload == b'{"x":1}'
        assert got.retain is False
        assert got.qos == 0
        assert got.properties.ContentType == "text/x-caption"
        assert publisher.connects == 1  # one connection for the router, reused


async def test_destination_reconnects_after_the_broker_comes_back(tmp_path: Path) -> None:
    port = free_port()
    params = MqttParams(broker=f"mqtt://127.0.0.1:{port}", topic="t/{device_id}", retain=False)
    dest = MqttDestination(params, ComponentContext())
    dest._publisher.backoff_min = 0.05  # type: ignore[union-attr]
    msg = Message.new(device_id="cam-1", path="/x", content_type="text/plain", payload=b"hi")
    try:
        with pytest.raises(DeliveryError, match=r"cannot connect to MQTT broker mqtt://127\.0\.0\.1") as err:
            await dest.deliver(msg)
        assert err.value.retryable
        with Mosquitto(tmp_path / "broker", port=port) as broker:
            async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as sub:
                await sub.subscribe("t/#", qos=1)
                for _ in range(100):  # the delivery queue would retry like this
                    try:
                        await dest.deliver(msg)
                        break
                    except DeliveryError:
                        await asyncio.sleep(0.05)
                assert (await next_message(sub)).payload == b"hi"
            await asyncio.to_thread(broker.restart)  # the connection breaks under the destination
            async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as sub:
                await sub.subscribe("t/#", qos=1)
                for _ in range(100):
                    try:
                        await dest.deliver(msg.evolve(payload=b"again"))
                        break
                    except DeliveryError:
                        await asyncio.sleep(0.05)
                assert (await next_message(sub)).payload == b"again"
        assert dest._publisher.connects == 2  # type: ignore[union-attr]
    finally:
        await dest.close()


async def test_no_broker_and_no_router_connection_is_a_clear_error() -> None:
    dest = MqttDestination(MqttParams(), ComponentContext())
    msg = Message.new(device_id="cam-1", path="/x", content_type="text/plain", payload=b"hi")
    with pytest.raises(ComponentError, match="needs a `broker` parameter"):
        await dest.deliver(msg)


@pytest.mark.parametrize(("params", "why"), [
    ('{topic: "{project_id}/{nope}"}', "topic template field {nope} unknown"),
    ('{topic: "a/+/b"}', "wildcards"),
    ('{topic: "{path!r}"}', "topic template field {path} unknown"),
    ('{broker: "http://127.0.0.1:1883"}', "mqtt:// or mqtts:// URL"),
    ('{broker: "mqtt://"}', "no host"),
    ('{broker: "mqtt://h:99999"}', "invalid port"),
    ("{qos: 3}", "qos"),
    ("{retained: true}", "retained"),
])
def test_bad_parameters_name_file_line_and_reason(tmp_path: Path, params: str, why: str) -> None:
    pipes = write_pipeline(tmp_path, params)
    result = load_pipelines([pipes])
    assert result.problems, params
    text = "\n".join(str(p) for p in result.problems)
    assert why in text
    assert f"{pipes}:" in text


@pytest.mark.parametrize(("device_id", "path", "why"), [
    ("cam-1", "/images/+", "wildcard"),
    ("cam-1", "/images/#", "wildcard"),
    ("cam+1", "/images", "wildcard"),
    ("cam-1", "/im\x00ages", "NUL"),
])
async def test_device_controlled_topic_that_mqtt_refuses_is_a_component_error(
        device_id: str, path: str, why: str) -> None:
    published: list[str] = []

    async def publish(topic: str, payload: bytes, **kw: object) -> None:
        published.append(topic)
    dest = MqttDestination(MqttParams(), ComponentContext(mqtt_publish=publish))
    msg = Message.new(device_id=device_id, path=path, content_type="text/plain", payload=b"hi")
    with pytest.raises(ComponentError, match=why) as caught:
        await dest.deliver(msg)
    assert not isinstance(caught.value, DeliveryError) and not published


async def test_wildcard_in_the_path_is_dead_lettered_at_once(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        p = tmp_path / "pipeline.yaml"
        p.write_text(f"""
pipelines:
  to-device:
    steps:
      - name: back
        retry: {{initial_backoff: 0.05, max_backoff: 0.1, max_attempts: 10}}
        destination:
          type: mqtt
          parameters: {{broker: "mqtt://127.0.0.1:{broker.port}"}}
""")
        async with Router(RouterSettings(pipelines=[p], store_path=tmp_path / "s.db")) as router:
            await router.accept(Message.new(device_id="cam-1", path="/images/+", content_type="text/plain",
                                            payload=b"x"))
            for _ in range(500):
                if (await router.store.counters())["dead_letters_open"] >= 1:
                    break
                await asyncio.sleep(0.02)
            letters = await router.store.dead_letters()
    assert len(letters) == 1
    assert letters[0].attempts == 1 and "wildcard" in letters[0].error
