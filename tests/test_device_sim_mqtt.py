"""The device simulator's MQTT mode against a real mosquitto and a small stand-in for the router.

The stand-in subscribes to the stream topics like the router's MQTT ingest and answers each
frame on the device's retained state topic, as the router's lightdb-state/mqtt destination does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time

import aiomqtt
import pytest

from device_sim import Camera, CameraConfig, LinkError, fleet_identities

pytestmark = pytest.mark.usefixtures("require_mosquitto")


@pytest.fixture
def require_mosquitto() -> None:
    """A missing broker fails the test (never a silent skip): ``./dev`` installs mosquitto."""
    assert shutil.which("mosquitto") or shutil.which("/usr/sbin/mosquitto"), \
        "mosquitto not found: run ./dev setup (Debian mosquitto)"


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def broker(tmp_path):
    port = free_tcp_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            break
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError("mosquitto did not start")
        time.sleep(0.05)
    yield port
    process.terminate()
    process.wait(10)


async def stand_in_router(port: int, received: list, ready: asyncio.Event) -> None:
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe("+/+/stream/#", qos=1)
        ready.set()
        async for message in client.messages:
            project, device, _, path = message.topic.value.split("/", 3)
            received.append((device, path, bytes(message.payload), message.properties.ContentType))
            answer = {"frame_id": f"router-{len(received)}", "status": "succeeded",
                      "output": f"Caption: frame {len(received)} (90%)"}
            await client.publish(f"{project}/{device}/state/result", json.dumps(answer), qos=1, retain=True)


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_mqtt_camera_publishes_frames_and_matches_answers_in_order(broker):
    identity = fleet_identities(1, seed=11, project_id="demo")[0]
    # An answer retained from an earlier run must not count for this camera's first frame.
    async with aiomqtt.Client("127.0.0.1", broker, protocol=aiomqtt.ProtocolVersion.V5) as old:
        await old.publish("demo/cam-01/state/result", b'{"frame_id": "old", "output": "stale"}',
                          qos=1, retain=True)
    received: list = []
    ready = asyncio.Event()
    router = asyncio.create_task(stand_in_router(broker, received, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        config = CameraConfig(port=broker, transport="mqtt", interval=0.1, max_frames=3,
                              request_timeout=3, backoff_initial=0.1, backoff_max=0.5, keepalive=0)
        camera = Camera(identity, config)
        async with camera:
            await wait_until(lambda: camera.stats.observing, 10, "the state subscription")
            assert await camera.wait_answered(3, timeout=15), camera.stats
    finally:
        router.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await router
    assert [(d, p, ct) for d, p, _, ct in received] == [("cam-01", "images", "image/png")] * 3
    assert received[-1][2] == camera.last_frame.payload
    stats = camera.stats
    assert (stats.frames_acked, stats.frames_answered, stats.errors) == (3, 3, 0)
    assert stats.last_answer == "Caption: frame 3 (90%)" and stats.last_latency > 0


async def test_mqtt_subscription_skips_the_retained_old_answer_and_reports_a_dead_broker(broker):
    from device_sim.mqtt_link import MqttLink

    identity = fleet_identities(1, seed=12, project_id="demo")[0]
    async with aiomqtt.Client("127.0.0.1", broker, protocol=aiomqtt.ProtocolVersion.V5) as other:
        await other.publish("demo/cam-01/state/result", b'{"frame_id": "old"}', qos=1, retain=True)
        link = MqttLink(identity, port=broker, request_timeout=3)
        await link.open()
        try:
            subscription = await link.subscribe("result")
            await asyncio.sleep(0.2)  # the broker has sent the retained message by now
            await other.publish("demo/cam-01/state/result", b'{"frame_id": "live"}', qos=1)
            first = await asyncio.wait_for(anext(aiter(subscription)), 5)
            assert json.loads(first.payload) == {"frame_id": "live"} and first.content_format == 50
            assert await link.ping()
        finally:
            await link.close()
    assert not await link.ping()
    closed = MqttLink(identity, port=free_tcp_port(), request_timeout=1)
    with pytest.raises(LinkError, match=r"cannot connect to mqtt://127\.0\.0\.1:"):
        await closed.open()
