"""One camera's MQTT v5 connection to the broker the router subscribes at (optional transport).

Same interface as :class:`device_sim.coap_link.CoapLink`, so a :class:`~device_sim.Camera` with
``transport="mqtt"`` works unchanged. Use::

    link = MqttLink(identity, host="127.0.0.1", port=1883)
    await link.open()
    local_id = await link.upload("images", png_bytes, content_format=23)
    #   -> publishes QoS 1 to demo/cam-01/stream/images, Content Type "image/png"
    subscription = await link.subscribe("result")     # demo/cam-01/state/result
    async for notification in subscription: ...
    await link.close()

MQTT has no response to a publish, so the device never learns the router's message id:
``upload`` returns a local id and ``correlates`` is False (the camera then matches answers to
frames in upload order). Retained state present when subscribing is an old answer and skipped.
The client id is ``<project-id>-<device-id>``; the broker is not authenticated against the
registry here (the router's MQTT ingest checks the device id against it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_sim.coap_link import LinkError, Notification
from device_sim.identity import DeviceIdentity

log = logging.getLogger(__name__)

MEDIA_TYPES = {0: "text/plain", 22: "image/jpeg", 23: "image/png", 42: "application/octet-stream",
               50: "application/json", 60: "application/cbor"}
CONTENT_FORMATS = {media: number for number, media in MEDIA_TYPES.items()}


class MqttLink:
    """A device's MQTT client towards the broker."""

    correlates = False

    def __init__(
        self,
        identity: DeviceIdentity,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        request_timeout: float = 30.0,
        keepalive: int = 30,
    ) -> None:
        self.identity = identity
        self.host = host
        self.port = port or 1883
        self.request_timeout = request_timeout
        self.keepalive = keepalive
        self.base_uri = f"mqtt://{host}:{self.port}"
        self.last_activity = time.monotonic()
        self._client: aiomqtt.Client | None = None
        self._topic_prefix = f"{identity.project_id}/{identity.device_id}"

    @property
    def is_open(self) -> bool:
        return self._client is not None

    def topic(self, kind: str, path: str) -> str:
        return f"{self._topic_prefix}/{kind}/{path.strip('/')}"

    async def open(self) -> None:
        if self._client is not None:
            return
        client = aiomqtt.Client(
            self.host, self.port, identifier=f"{self.identity.project_id}-{self.identity.device_id}",
            protocol=aiomqtt.ProtocolVersion.V5, keepalive=self.keepalive, timeout=self.request_timeout)
        try:
            await asyncio.wait_for(client.__aenter__(), self.request_timeout)
        except (TimeoutError, aiomqtt.MqttError, OSError) as exc:
            raise LinkError(f"cannot connect to {self.base_uri}: {exc or 'timeout'}") from None
        self._client = client
        self.last_activity = time.monotonic()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.__aexit__(None, None, None), 5)

    async def reset(self) -> None:
        await self.close()
        await self.open()

    async def upload(self, path: str, payload: bytes, content_format: int) -> str:
        """Publish ``payload`` (QoS 1) to ``<project>/<device>/stream/<path>``; returns a local id."""
        await self.open()
        assert self._client is not None
        properties = Properties(PacketTypes.PUBLISH)
        properties.ContentType = MEDIA_TYPES.get(content_format, "application/octet-stream")
        self.last_activity = time.monotonic()
        try:
            await self._client.publish(self.topic("stream", path), payload, qos=1, properties=properties,
                                       timeout=self.request_timeout)
        except (aiomqtt.MqttError, OSError) as exc:
            await self.close()
            raise LinkError(f"publish to {self.base_uri} failed: {exc}") from None
        self.last_activity = time.monotonic()
        return f"local-{time.monotonic_ns()}"

    async def subscribe(self, path: str) -> MqttSubscription:
        """Subscribe (QoS 1) to ``<project>/<device>/state/<path>``."""
        if self._client is None:
            raise LinkError("link is closed")
        topic = self.topic("state", path)
        try:
            await self._client.subscribe(topic, qos=1, timeout=self.request_timeout)
        except (aiomqtt.MqttError, OSError) as exc:
            raise LinkError(f"subscribe at {self.base_uri} failed: {exc}") from None
        return MqttSubscription(self._client, topic)

    async def ping(self, timeout: float = 5.0) -> bool:
        """The MQTT client pings the broker itself; this reports whether it is still connected."""
        client = self._client
        if client is None:
            return False
        disconnected = getattr(client, "_disconnected", None)  # aiomqtt 2.x internals
        self.last_activity = time.monotonic()
        return not (isinstance(disconnected, asyncio.Future) and disconnected.done())


class MqttSubscription:
    def __init__(self, client: aiomqtt.Client, topic: str) -> None:
        self._client = client
        self._topic = topic
        self._cancelled = False

    async def __aiter__(self) -> AsyncIterator[Notification]:
        try:
            async for message in self._client.messages:
                if self._cancelled:
                    return
                if not message.topic.matches(self._topic) or message.retain:
                    continue  # retained: an answer from before this subscription
                payload = message.payload if isinstance(message.payload, bytes | bytearray) else (
                    str(message.payload).encode())
                media = getattr(message.properties, "ContentType", None) if message.properties else None
                yield Notification(bytes(payload), CONTENT_FORMATS.get(media or "", 50))
        except (aiomqtt.MqttError, OSError) as exc:
            log.debug("MQTT subscription %s ended: %s", self._topic, exc)

    def cancel(self) -> None:
        self._cancelled = True
