"""MQTT ingest against a real mosquitto: devices (mosquitto_pub, aiomqtt) → router → webhook.

Every test starts its own broker on a free port and a real Router on a temp store; the
webhook destination posts to a real HTTP server on loopback (tests/http_recorder.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipelines.devices import DeviceRegistry
from pipelines.ingest.mqtt import (
    MqttIngest,
    MqttSettings,
    TopicError,
    parse_stream_topic,
    subscription_filter,
)
from pipelines.metrics import RouterMetrics
from pipelines.router import Router, RouterSettings
from tests.http_recorder import HTTPRecorder
from tests.mqtt_broker import Mosquitto

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + bytes(range(256)) + b"\x00\xff\r\n" * 50


def pipeline_file(tmp_path: Path, hook_url: str) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"""
pipelines:
  to-hook:
    filter: {{path: "/data*"}}
    steps:
      - name: hook
        destination: {{type: webhook, version: v1, parameters: {{url: "{hook_url}"}}}}
""")
    return p


async def wait_for(cond, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def v5_props(content_type: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    return props


# -- topics -------------------------------------------------------------------------------


def test_stream_topic_parsing() -> None:
    st = parse_stream_topic("demo/cam-1/stream/images/raw")
    assert (st.project_id, st.device_id, st.path) == ("demo", "cam-1", "/images/raw")
    assert parse_stream_topic("demo/cam-1/stream/café/温度").path == "/café/温度"
    for bad, why in [("demo/cam-1/stream", "<project-id>/<device-id>/stream/<path>"),
                     ("demo/cam-1/state/x", "<project-id>/<device-id>/stream/<path>"),
                     ("demo/c m/stream/x", "letters, digits"),
                     ("demo/cam-1/stream/a//b", "empty segment"),
                     ("demo/cam-1/stream/", "empty"),
                     ("demo/cam-1/stream/a\x00b", "U\\+0000"),
                     ("demo/cam-1/stream/a\r\nb", "U\\+000D"),
                     ("demo/cam-1/stream/..", "'..'")]:
        with pytest.raises(TopicError, match=why):
            parse_stream_topic(bad)


def test_shared_subscription_filter() -> None:
    assert subscription_filter(MqttSettings(shared_group="w")) == "$share/w/+/+/stream/#"
    assert subscription_filter(MqttSettings()) == "+/+/stream/#"
    with pytest.raises(ValueError, match="may not contain"):
        subscription_filter(MqttSettings(shared_group="a/b"))


# -- end to end ---------------------------------------------------------------------------


async def test_devices_reach_webhook_byte_identical(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker, HTTPRecorder() as hook:
        settings = RouterSettings(pipelines=[pipeline_file(tmp_path, hook.url("/hook"))],
                                  store_path=tmp_path / "s.db")
        ms = MqttSettings(port=broker.port, default_content_type="text/plain")
        async with Router(settings) as router, MqttIngest(router, ms) as ingest:
            await ingest.wait_subscribed()
            # mosquitto_pub, MQTT v5 with the content-type property
            await asyncio.to_thread(broker.publish, "demo/cam-1/stream/data/png", PNG,
                                    content_type="image/png")
            # mosquitto_pub, MQTT 3.1.1: no property, the subscription's default applies
            await asyncio.to_thread(broker.publish, "demo/cam-1/stream/data/v3", b"hello v3", v5=False)
            # aiomqtt, QoS 0 and QoS 1
            async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as dev:
                await dev.publish("demo/cam-2/stream/data/q1", PNG[::-1], qos=1,
                                  properties=v5_props("application/x-q1"))
                await dev.publish("demo/cam-2/stream/data/q0", b"\x00q0\xff", qos=0)
            await wait_for(lambda: len(hook.requests) >= 4, what="4 webhook posts")
            by_type = {}
            for req in hook.requests:
                assert req.path == "/hook"
                by_type.setdefault(req.headers.get("Content-Type", "").split(";")[0], []).append(req.body)
            assert by_type["image/png"] == [PNG]
            assert by_type["application/x-q1"] == [PNG[::-1]]
            bodies = sorted(r.body for r in hook.requests)
            assert bodies == sorted([PNG, b"hello v3", PNG[::-1], b"\x00q0\xff"])
            texts = [r for r in hook.requests if r.headers.get("Content-Type", "").startswith("text/plain")]
            assert sorted(r.body for r in texts) == sorted([b"hello v3", b"\x00q0\xff"])
            assert ingest.stats["accepted"] == 4
            books = await router.store.counters()
            assert books["ingested"] == 4


@pytest.mark.parametrize("trusted", [False, True])
async def test_a_message_id_property_is_kept_only_when_trusted(tmp_path: Path, trusted: bool) -> None:
    claimed = "0b7e2a4c-3f5d-4e6a-9b1c-2d3e4f5a6b7c"
    with Mosquitto(tmp_path / "broker") as broker, HTTPRecorder() as hook:
        settings = RouterSettings(pipelines=[pipeline_file(tmp_path, hook.url("/hook"))],
                                  store_path=tmp_path / "s.db")
        ms = MqttSettings(port=broker.port, trust_message_id=trusted)
        async with Router(settings) as router, MqttIngest(router, ms) as ingest:
            await ingest.wait_subscribed()
            props = v5_props("text/plain")
            props.UserProperty = [("message-id", claimed)]
            async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as dev:
                await dev.publish("demo/cam-1/stream/data/a", b"first", qos=1, properties=props)
                await dev.publish("demo/cam-1/stream/data/b", b"second, same claimed id", qos=1,
                                  properties=props)
            await wait_for(lambda: ingest.stats["accepted"] >= 2, what="both messages taken")
            books = await router.store.counters()
            if trusted:  # the gateway's promise: one id, one message; the second is a duplicate
                await wait_for(lambda: len(hook.requests) >= 1, what="the webhook post")
                assert [r.headers["Ce-Id"] for r in hook.requests] == [claimed]
                assert books["ingested"] == 1
            else:  # a device cannot choose ids: each message gets its own
                await wait_for(lambda: len(hook.requests) >= 2, what="2 webhook posts")
                ids = {r.headers["Ce-Id"] for r in hook.requests}
                assert len(ids) == 2 and claimed not in ids
                assert books["ingested"] == 2


async def test_bad_input_is_counted_and_never_stops_ingest(tmp_path: Path, caplog) -> None:
    registry_file = tmp_path / "devices.yaml"
    registry_file.write_text("project_id: demo\ndevices:\n  - id: cam-1\n    psk: k1\n")
    registry = DeviceRegistry.load(registry_file)
    with Mosquitto(tmp_path / "broker") as broker, HTTPRecorder() as hook:
        settings = RouterSettings(pipelines=[pipeline_file(tmp_path, hook.url("/hook"))],
                                  store_path=tmp_path / "s.db")
        ms = MqttSettings(port=broker.port, topic_filter="#", max_payload=1000, registry=registry)
        async with Router(settings) as router, MqttIngest(router, ms) as ingest:
            await ingest.wait_subscribed()
            async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as dev:
                await dev.publish("not/the/scheme", b"x", qos=1)                  # topic outside the scheme
                await dev.publish("demo/cam-1/stream", b"x", qos=1)               # no path
                await dev.publish("demo/cam-9/stream/data", b"x", qos=1)          # unknown device
                await dev.publish("other/cam-1/stream/data", b"x", qos=1)         # known id, other project
                await dev.publish("demo/cam-1/stream/data", b"y" * 1001, qos=1)   # over the limit
                await dev.publish("demo/cam-1/stream/data", b"ok", qos=1)         # and life goes on
            await wait_for(lambda: len(hook.requests) >= 1, what="the good message")
            await wait_for(lambda: ingest.stats["rejected_too_large"] == 1, what="counts")
            assert [r.body for r in hook.requests] == [b"ok"]
            assert ingest.stats["rejected_topic"] == 2
            assert ingest.stats["rejected_unknown_device"] == 2
            assert ingest.stats["rejected_too_large"] == 1
            # counted in the store's books, so /metrics shows them
            books = await router.store.counters()
            assert books["mqtt_rejected_topic"] == 2
            assert books["mqtt_rejected_unknown_device"] == 2
            assert books["mqtt_rejected_too_large"] == 1
            text, _ = await RouterMetrics(router).render()
            assert b"pipeline_mqtt_rejected_unknown_device_total 2.0" in text
            # and logged, naming what was wrong
            logged = caplog.text
            assert "not <project-id>/<device-id>/stream/<path>" in logged
            assert "'cam-9' of project 'demo' is not in the registry" in logged
            assert "1001 bytes is over the limit of 1000" in logged

            # a device added to the registry file is picked up without a restart
            registry_file.write_text("project_id: demo\ndevices:\n  - id: cam-1\n    psk: k1\n"
                                     "  - id: cam-9\n    psk: k9\n")
            os.utime(registry_file, (time.time() + 5, time.time() + 5))
            ingest._last_refresh = -1e9  # do not wait for the refresh interval in a test
            async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as dev:
                await dev.publish("demo/cam-9/stream/data", b"now known", qos=1)
            await wait_for(lambda: len(hook.requests) >= 2, what="the newly registered device")
            assert hook.requests[1].body == b"now known"


async def test_qos1_ack_only_after_store_and_broker_restart_loses_nothing(tmp_path: Path) -> None:
    """A publisher keeps sending QoS 1 while the broker restarts (persistence on); every
    message the broker acknowledged to the publisher reaches the webhook."""
    n = 200
    with Mosquitto(tmp_path / "broker", persistence=True) as broker, HTTPRecorder() as hook:
        settings = RouterSettings(pipelines=[pipeline_file(tmp_path, hook.url("/hook"))],
                                  store_path=tmp_path / "s.db")
        ms = MqttSettings(port=broker.port, client_id="router-1", reconnect_min=0.05, reconnect_max=0.5)
        async with Router(settings) as router, MqttIngest(router, ms) as ingest:
            await ingest.wait_subscribed()
            acked: set[int] = set()

            async def publisher() -> None:
                i = 0
                while i < n:
                    try:
                        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="dev-pub",
                                                  protocol=aiomqtt.ProtocolVersion.V5, timeout=3) as dev:
                            while i < n:
                                await dev.publish("demo/cam-1/stream/data", f"m{i}".encode(), qos=1)
                                acked.add(i)
                                i += 1
                                await asyncio.sleep(0.002)
                    except aiomqtt.MqttError:
                        await asyncio.sleep(0.05)  # broker down: publish i again once it is back

            task = asyncio.create_task(publisher())
            await wait_for(lambda: len(acked) >= n // 3, what="a third of the messages")
            await asyncio.to_thread(broker.restart)
            await asyncio.wait_for(task, 30)
            want = {f"m{i}".encode() for i in acked}
            await wait_for(lambda: want <= {r.body for r in hook.requests}, timeout=20,
                           what="every acknowledged message at the webhook")
            assert ingest.stats["connects"] >= 2  # it did reconnect


async def test_unacked_messages_come_back_after_ingest_stops(tmp_path: Path) -> None:
    """While the router answers slowly nothing is acknowledged; stop the ingest before it
    stored them and a new ingest with the same client id gets them again."""
    with Mosquitto(tmp_path / "broker") as broker:

        class SlowTarget:  # an IngestTarget that never finishes storing
            def __init__(self) -> None:
                self.seen: list[bytes] = []

            async def accept(self, message) -> None:
                self.seen.append(message.payload)
                await asyncio.sleep(3600)

        slow = SlowTarget()
        ms = MqttSettings(port=broker.port, client_id="w-slow", max_inflight=10)
        ingest = MqttIngest(slow, ms)
        await ingest.start()
        await ingest.wait_subscribed()
        async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as dev:
            for i in range(25):
                await dev.publish("demo/cam-1/stream/data", f"u{i}".encode(), qos=1)
        await wait_for(lambda: len(slow.seen) >= 10, what="the first window")
        await asyncio.sleep(0.2)
        assert len(slow.seen) == 10  # Receive Maximum: no more until something is acked
        for t in list(ingest._inflight):
            t.cancel()
        await ingest.stop(drain_timeout=1)

        settings = RouterSettings(pipelines=[pipeline_file(tmp_path, "http://127.0.0.1:9/")],
                                  store_path=tmp_path / "s.db")
        async with Router(settings) as router, MqttIngest(router, ms) as again:
            await again.wait_subscribed()
            await wait_for(lambda: again.stats["accepted"] >= 25, what="all 25 redelivered")
            books = await router.store.counters()
            assert books["ingested"] == 25


async def test_overloaded_router_holds_the_ack_until_stored(tmp_path: Path) -> None:
    """While the target answers Overloaded the message is retried, not acknowledged, and not
    lost; the broker stops sending once Receive Maximum messages are unacknowledged."""
    from pipelines.ingest import Overloaded

    class BusyThenFine:  # an IngestTarget that is full for a while
        def __init__(self) -> None:
            self.busy = True
            self.stored: list[bytes] = []

        async def accept(self, message) -> None:
            if self.busy:
                raise Overloaded("inbox full (test)", retry_after=0.01)
            self.stored.append(message.payload)

    with Mosquitto(tmp_path / "broker") as broker:
        target = BusyThenFine()
        async with MqttIngest(target, MqttSettings(port=broker.port, max_inflight=4)) as ingest:
            await ingest.wait_subscribed()
            async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as dev:
                for i in range(10):
                    await dev.publish("demo/cam-1/stream/data", f"o{i}".encode(), qos=1)
            await wait_for(lambda: ingest.stats["overloaded"] >= 8, what="retries while overloaded")
            assert len(ingest._inflight) == 4  # only the Receive Maximum window came in
            target.busy = False
            await wait_for(lambda: len(target.stored) == 10, what="all ten stored")
            assert sorted(target.stored) == sorted(f"o{i}".encode() for i in range(10))


def test_burst_socket_serves_small_reads_from_one_large_read() -> None:
    import socket

    from pipelines.ingest.mqtt import _BurstSocket

    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        sock = _BurstSocket(b, chunk=8, max_refills=2)
        with pytest.raises(BlockingIOError):  # nothing there yet
            sock.recv(1)
        a.sendall(b"0123456789abcdefXYZ")
        assert sock.recv(1) == b"0"  # one kernel read of 8 bytes
        assert sock.pending() == 7
        assert sock.recv(4) == b"1234"
        assert sock.recv(10) == b"567"  # what is left of the chunk, never more
        assert sock.recv(3) == b"89a"  # second kernel read
        assert sock.recv(5) == b"bcdef"
        with pytest.raises(BlockingIOError):  # refill limit for this turn: the rest waits
            sock.recv(1)
        assert sock.recv(100) == b"XYZ"  # the next turn reads on
        assert sock.fileno() == b.fileno()  # everything else is the socket's
        a.close()
        assert sock.recv(1) == b""  # end of stream passes through
