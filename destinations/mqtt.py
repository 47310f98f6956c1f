"""``mqtt`` destination: publish the message to an MQTT broker (MQTT v5).

Pipeline step (the defaults send results back to an MQTT device, mirroring CoAP's ``/.d/``)::

    destination:
      type: mqtt
      version: v1
      parameters:
        broker: mqtt://127.0.0.1:1883        # or mqtts://user:${MQTT_PASSWORD}@host:8883
        topic: "{project_id}/{device_id}/state/{path}"
        qos: 1
        retain: true
        content_type: application/json       # default: the message's own content type

Without ``broker`` the step publishes through the router's own broker connection
(``context.mqtt_publish``, set by ``pipeline mqtt-worker``). With ``broker`` each step
instance keeps one connection of its own (:class:`MqttPublisher`), opened on first use and
reopened after a failure (at most one attempt per backoff interval, 0.5 s doubling to 30 s).

``{path}`` is the message path without its leading ``/``. The topic template may use only
``{project_id}``, ``{device_id}`` and ``{path}``. A rendered topic that MQTT cannot publish to
(``+``, ``#`` or NUL from the device's path or id, empty, over 65535 bytes) is a permanent
``ComponentError``: the message goes to the dead letters at once. One attempt per ``deliver()``: a QoS 1
or 2 publish counts as delivered when the broker acknowledged it; failures raise
``DeliveryError(retryable=True)`` and the delivery queue retries per its policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import string
import time
import uuid
from typing import Literal
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, field_validator

from destinations.registry import register
from pipelines.components import ComponentError, DeliveryError, Destination
from pipelines.message import Message

TOPIC_FIELDS = ("project_id", "device_id", "path")
STATE_TOPIC = "{project_id}/{device_id}/state/{path}"


def check_topic_template(template: str) -> str:
    """Raise ValueError unless ``template`` uses only the known fields and no wildcards."""
    if not template:
        raise ValueError("topic is empty")
    if "+" in template or "#" in template:
        raise ValueError("a publish topic may not contain the wildcards '+' or '#'")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"topic template {template!r}: {exc}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in TOPIC_FIELDS or spec or conv:
            raise ValueError(f"topic template field {{{name}}} unknown: use "
                             + ", ".join("{" + f + "}" for f in TOPIC_FIELDS))
    return template


def render_topic(template: str, message: Message) -> str:
    """The topic for ``message``; ``ComponentError`` when it is not a valid publish topic
    (the fields come from devices, so they can carry wildcards or a NUL)."""
    topic = template.format(project_id=message.project_id, device_id=message.device_id,
                            path=message.path.lstrip("/"))
    problem = None
    if not topic:
        problem = "is empty"
    elif "+" in topic or "#" in topic:
        problem = "contains the wildcard '+' or '#'"
    elif "\x00" in topic:
        problem = "contains a NUL character"
    else:
        try:
            if len(topic.encode("utf-8")) > 65535:
                problem = "is longer than 65535 bytes"
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
    if problem:
        shown = topic if len(topic) <= 200 else topic[:200] + "…"
        raise ComponentError(f"MQTT topic {shown!r} {problem}: it cannot be published to "
                             f"(from the template {template!r})")
    return topic


class BrokerURL:
    """``mqtt://[user[:password]@]host[:port]`` (1883) or ``mqtts://...`` (8883, TLS)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError("broker must be an mqtt:// or mqtts:// URL, e.g. mqtt://127.0.0.1:1883")
        if not parts.hostname:
            raise ValueError("broker URL has no host, e.g. mqtt://127.0.0.1:1883")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("broker URL has an invalid port") from None
        if parts.path not in ("", "/") or parts.query:
            raise ValueError("broker URL takes no path or query: mqtt://host:port")
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname
        self.port = port or (8883 if self.tls else 1883)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None

    def __str__(self) -> str:  # never the password
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class MqttPublisher:
    """One MQTT v5 connection for publishing, opened lazily and reopened after failures.

    ``await publisher.publish(topic, payload, qos=1, retain=True, content_type="image/png")``
    returns when the broker acknowledged (QoS 1/2) or the packet was written (QoS 0); it
    raises ``DeliveryError(retryable=True)`` otherwise. Usable as ``context.mqtt_publish``.
    """

    def __init__(self, broker: BrokerURL | str, *, client_id: str | None = None, timeout: float = 10.0,
                 keepalive: int = 30, backoff_min: float = 0.5, backoff_max: float = 30.0) -> None:
        self.broker = broker if isinstance(broker, BrokerURL) else BrokerURL(broker)
        self.client_id = client_id or f"pipelines-pub-{uuid.uuid4().hex[:10]}"
        self.timeout = timeout
        self.keepalive = keepalive
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._client: aiomqtt.Client | None = None
        self._lock = asyncio.Lock()
        self._backoff = backoff_min
        self._next_try = 0.0
        self.connects = 0

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      content_type: str | None = None) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if content_type:
            props.ContentType = content_type
        for attempt in (1, 2):
            client = await self._connected()
            try:
                await client.publish(topic, payload, qos=qos, retain=retain, properties=props,
                                     timeout=self.timeout)
                return
            except aiomqtt.MqttError as exc:
                await self._drop(client)
                if attempt == 2:
                    raise DeliveryError(f"MQTT publish to {self.broker} failed: {exc}",
                                        retryable=True) from None
                # the connection had gone away under us: one fresh connection, one more try

    async def _connected(self) -> aiomqtt.Client:
        async with self._lock:
            if self._client is not None:
                return self._client
            wait = self._next_try - time.monotonic()
            if wait > 0:
                raise DeliveryError(f"MQTT broker {self.broker} unreachable; next try in {wait:.1f} s",
                                    retryable=True, retry_after=wait)
            b = self.broker
            client = aiomqtt.Client(
                b.host, b.port, identifier=self.client_id, protocol=aiomqtt.ProtocolVersion.V5,
                username=b.username, password=b.password, keepalive=self.keepalive,
                timeout=self.timeout, tls_context=ssl.create_default_context() if b.tls else None,
            )
            client.pending_calls_threshold = 1 << 20  # many concurrent publishes are normal here
            try:
                await client.__aenter__()
            except aiomqtt.MqttError as exc:
                self._next_try = time.monotonic() + self._backoff
                self._backoff = min(self.backoff_max, self._backoff * 2)
                raise DeliveryError(f"cannot connect to MQTT broker {b}: {exc}", retryable=True) from None
            self._backoff = self.backoff_min
            self._client = client
            self.connects += 1
            return client

    async def _drop(self, client: aiomqtt.Client) -> None:
        async with self._lock:
            if self._client is client:
                self._client = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.__aexit__(None, None, None), 2)

    async def close(self) -> None:
        if self._client is not None:
            await self._drop(self._client)


class MqttParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    broker: str | None = Field(
        default=None,
        description="Broker URL, mqtt://host:port or mqtts://host:port (user:password@ allowed; put "
                    "the password in a secret reference). Empty: the router's own broker connection.",
        examples=["mqtt://127.0.0.1:1883"])
    topic: str = Field(
        default=STATE_TOPIC,
        description="Topic template; may use {project_id}, {device_id} and {path} (the message path "
                    "without its leading '/').",
        examples=[STATE_TOPIC, "fleet/{device_id}/captions"])
    qos: Literal[0, 1, 2] = Field(default=1, description="MQTT QoS of the publish.")
    retain: bool = Field(default=True, description="Publish as a retained message (the last value "
                         "stays at the broker for devices that subscribe later).")
    content_type: str | None = Field(
        default=None, description="MQTT v5 Content Type property; default: the message's content type.",
        examples=["application/json"])
    client_id: str | None = Field(default=None, description="MQTT client id for this step's own "
                                  "connection; default: a random one.")

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        return check_topic_template(v)

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str | None) -> str | None:
        if v is not None:
            BrokerURL(v)
        return v


@register
class MqttDestination(Destination):
    type = "mqtt"
    version = "1.0.0"
    summary = ("Publish the payload to an MQTT topic (v5 content type, QoS, retain); "
               "default: the device's state topic.")
    Params = MqttParams

    def __init__(self, params: MqttParams, context) -> None:  # type: ignore[override]
        super().__init__(params, context)
        self._publisher = (MqttPublisher(params.broker, client_id=params.client_id)
                           if params.broker else None)

    async def deliver(self, message: Message) -> None:
        p: MqttParams = self.params  # type: ignore[assignment]
        topic = render_topic(p.topic, message)
        ctype = p.content_type or message.content_type
        if self._publisher is not None:
            await self._publisher.publish(topic, message.payload, qos=p.qos, retain=p.retain,
                                          content_type=ctype)
            return
        if self.context.mqtt_publish is None:
            raise ComponentError("the mqtt destination needs a `broker` parameter, or a router "
                                 "connected to a broker (pipeline mqtt-worker)")
        try:
            await self.context.mqtt_publish(topic, message.payload, qos=p.qos, retain=p.retain,
                                            content_type=ctype)
        except aiomqtt.MqttError as exc:
            raise DeliveryError(f"MQTT publish failed: {exc}", retryable=True) from None

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
