"""Device ingestion over MQTT: subscribe at a broker, store each message, then acknowledge.

Usage::

    settings = MqttSettings(host="127.0.0.1", port=1883, shared_group="workers")
    async with MqttIngest(router, settings) as ingest:   # router implements IngestTarget
        await ingest.wait_subscribed()                    # optional: the first SUBACK is in
        ...
        ingest.stats                                      # {"accepted": ..., "rejected_topic": ...}

Topics (``/work/shared/specs/devices.md``, "MQTT mapping"): a device publishes to
``<project-id>/<device-id>/stream/<path>``; the message goes into the pipelines with path
``/<path>``. The content type is the MQTT v5 Content Type property, else
``default_content_type``. The topic filter defaults to ``+/+/stream/#``; with a
``shared_group`` the subscription is ``$share/<group>/+/+/stream/#`` (MQTT v5), so several
workers split the load.

Batches: when the target has ``accept_many`` (the Router does), what arrived together is
stored together: the messages read in one turn of the event loop, and those that arrive
while earlier batches are being stored (at most ``max_flushers`` at once), go to the store
in one ``accept_many`` (one transaction), up to ``max_batch``. There is no timer, so a lone
message is stored at once. Other targets get one ``accept`` per message. Reading itself is
batched too: paho's many small socket reads are served from one large read (``_BurstSocket``).

Delivery promise: QoS 1 messages are acknowledged (PUBACK) only after ``target.accept`` (or
``accept_many``) returned, i.e. after the message is committed to the store. aiomqtt 2.x (installed: 2.5.1)
acknowledges on receipt, so this module switches the underlying paho-mqtt 2.x client to
``manual_ack`` (``client._client.manual_ack_set(True)``) and calls paho's ``ack(mid, qos)``
itself, in the order the PUBLISH packets arrived (MQTT 3.1.1 §4.6). With a ``client_id``
the session is persistent (``clean_start=False``, ``session_expiry`` seconds): if this
process dies, the broker keeps its unacknowledged messages and hands them out again when a
worker with the same ``client_id`` comes back. Without one the session is not kept (nobody
could resume it) and messages in flight at a crash are lost. Duplicates are possible (a crash between
commit and PUBACK), losses of acknowledged messages are not. QoS 2 subscriptions are
downgraded to QoS 1 (paho answers PUBREC before the application sees a QoS 2 message).

Back-pressure: the subscription asks the broker for at most ``max_inflight`` unacknowledged
messages (MQTT v5 Receive Maximum); while the router answers ``Overloaded`` we retry and
hold the acknowledgements, so the broker stops sending. QoS 0 messages over that bound are
dropped and counted (``dropped_qos0``).

Bad input is acknowledged (so the broker does not send it again), counted in ``stats`` and,
when the target has a store, in the store's counters (``mqtt_rejected_<reason>``, shown on
``/metrics`` as ``pipeline_mqtt_rejected_<reason>``), and logged: a topic outside the scheme
(``topic``), a device the registry does not know (``unknown_device``, only with a
registry), a payload over ``max_payload`` (``too_large``). Nothing of it stops the loop.

The connection is re-established with exponential backoff (``reconnect_min`` ..
``reconnect_max``, with jitter) for as long as the ingest runs.

With ``trust_message_id``, a message carrying the MQTT v5 user property ``message-id`` (a UUID)
keeps that id: that is how :class:`MqttGateway` (below), an ``IngestTarget`` that forwards CoAP
uploads into the broker instead of a store, lets the device's 2.04 (which carries the id) match
the results. Turn it on only where the broker lets no one but the gateway publish to the device
topics (an ACL): an id chosen by a device could collide on purpose with another message's and
have it counted as a duplicate. Off (the default), every message gets a new id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import re
import socket
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from pipelines.devices import DeviceRegistry
from pipelines.ingest import IngestTarget, Overloaded
from pipelines.json_limits import loads_bounded
from pipelines.message import Message, dumps
from pipelines.state_doc import deep_merge, get_at, set_at

log = logging.getLogger("pipelines.ingest.mqtt")

OCTET_STREAM = "application/octet-stream"
STREAM_FILTER = "+/+/stream/#"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
REJECT_REASONS = ("topic", "unknown_device", "too_large")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    topic_filter: str = STREAM_FILTER
    shared_group: str | None = None       # "$share/<group>/<filter>": workers split the load
    qos: int = 1                          # 0 or 1 (2 is taken as 1)
    default_content_type: str = OCTET_STREAM
    max_payload: int = 4 << 20            # bytes; larger messages are rejected (and acked)
    registry: DeviceRegistry | None = None  # None: any <project>/<device> is accepted
    registry_refresh: float = 2.0         # seconds between re-reads of the registry file
    # the broker keeps this worker's session (and its unacked share) under this id
    client_id: str | None = None          # None: "pipelines-<group or ingest>-<random>", no session kept
    session_expiry: int = 3600            # seconds the broker keeps the session while we are away
    max_inflight: int = 256               # MQTT v5 Receive Maximum: unacked QoS 1 messages
    keepalive: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    reconnect_min: float = 0.2
    reconnect_max: float = 10.0
    # targets with ``accept_many`` (the Router): messages that arrive while earlier ones are
    # being stored go in together, up to max_batch, with at most max_flushers batches at once
    max_batch: int = 512
    max_flushers: int = 2
    # keep the id in a "message-id" user property (MqttGateway's); only behind a broker ACL
    trust_message_id: bool = False


@dataclass(frozen=True)
class StreamTopic:
    project_id: str
    device_id: str
    path: str


class TopicError(ValueError):
    """The topic is not ``<project-id>/<device-id>/stream/<path>``."""


def parse_stream_topic(topic: str) -> StreamTopic:
    """``demo/cam-1/stream/images/raw`` → (demo, cam-1, /images/raw); raises TopicError."""
    parts = topic.split("/", 3)
    if len(parts) < 4 or parts[2] != "stream":
        raise TopicError(f"topic {topic!r} is not <project-id>/<device-id>/stream/<path>")
    project_id, device_id, _, rest = parts
    if not _ID_RE.match(project_id) or not _ID_RE.match(device_id):
        raise TopicError(f"topic {topic!r}: project and device ids are letters, digits, '.', '_', ':' or '-'")
    if not rest or any(seg == "" for seg in rest.split("/")):
        raise TopicError(f"topic {topic!r}: the stream path is empty or has an empty segment")
    return StreamTopic(project_id, device_id, "/" + rest)


def subscription_filter(settings: MqttSettings) -> str:
    if settings.shared_group:
        if not re.fullmatch(r"[^/+#]+", settings.shared_group):
            raise ValueError(f"shared group {settings.shared_group!r} may not contain '/', '+' or '#'")
        return f"$share/{settings.shared_group}/{settings.topic_filter}"
    return settings.topic_filter


def content_type_of(message: aiomqtt.Message, default: str) -> str:
    props = message.properties
    ct = getattr(props, "ContentType", None) if props is not None else None
    return ct.strip() if isinstance(ct, str) and ct.strip() else default


def message_id_of(message: aiomqtt.Message) -> str | None:
    """The ``message-id`` user property an ingest gateway sets (a UUID), else None."""
    user_properties = getattr(message.properties, "UserProperty", None) or []
    for name, value in user_properties:
        if name == "message-id" and _UUID_RE.match(value):
            return value
    return None


class MqttIngest:
    """Subscribes, stores, acknowledges; see the module docstring."""

    def __init__(self, target: IngestTarget, settings: MqttSettings | None = None) -> None:
        self.target = target
        self.settings = settings or MqttSettings()
        s = self.settings
        self.client_id = s.client_id or f"pipelines-{s.shared_group or 'ingest'}-{uuid.uuid4().hex[:8]}"
        self.filter = subscription_filter(s)
        self.qos = 1 if s.qos >= 1 else 0
        self.stats: dict[str, int] = {"accepted": 0, "bytes": 0, "connects": 0, "overloaded": 0,
                                      "dropped_qos0": 0, "store_errors": 0,
                                      **{f"rejected_{r}": 0 for r in REJECT_REASONS}}
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self._last_refresh = 0.0
        self._stopping = False
        self._backlog = 0  # batched: messages read and not yet stored (or given up)

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> MqttIngest:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._stopping = False
        if not self.settings.client_id and self.settings.qos >= 1:
            log.warning("MQTT ingest without a client id: its session is not kept, so QoS 1 messages "
                        "in flight when this process dies are lost; give each worker a stable client id")
        self._task = asyncio.create_task(self._run(), name=f"mqtt-ingest {self.client_id}")

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop reading; let messages already being stored finish (not acknowledged: the
        broker sends them again to the next session with this client id)."""
        self._stopping = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight:
            _, late = await asyncio.wait(list(self._inflight), timeout=drain_timeout)
            for task in late:  # e.g. waiting out an overloaded router: the broker keeps them
                task.cancel()
        self.connected.clear()

    async def wait_subscribed(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.connected.wait(), timeout)

    # -- connection loop ------------------------------------------------------------------

    @property
    def session_expiry(self) -> int:
        """A session only a process with the same client id can resume: without a configured
        id nobody ever comes back for it, and the broker would park this worker's share of
        a shared subscription in it until it expires, so it is not kept at all."""
        return max(0, int(self.settings.session_expiry)) if self.settings.client_id else 0

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        props.ReceiveMaximum = max(1, min(65535, int(s.max_inflight)))
        client = aiomqtt.Client(
            s.host, s.port, identifier=self.client_id, protocol=aiomqtt.ProtocolVersion.V5,
            username=s.username, password=s.password, keepalive=s.keepalive,
            clean_start=self.session_expiry <= 0, properties=props, timeout=10,
        )
        # Acknowledge after the store commit, not on receipt (see the module docstring).
        client._client.manual_ack_set(True)
        _read_in_bursts(client)
        return client

    async def _run(self) -> None:
        delay = self.settings.reconnect_min
        while True:
            client = self._client()
            try:
                async with client:
                    self.stats["connects"] += 1
                    self.last_error = None
                    delay = self.settings.reconnect_min
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
                log.warning("MQTT connection to %s:%s lost or refused (%s); retrying in %.1f s",
                            self.settings.host, self.settings.port, exc, delay)
            finally:
                self.connected.clear()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(self.settings.reconnect_max, delay * 2)

    async def _session(self, client: aiomqtt.Client) -> None:
        # retain handling 2: stream topics carry events; never ingest a retained leftover
        opts = SubscribeOptions(qos=self.qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        await client.subscribe(self.filter, options=opts)
        self.connected.set()
        log.info("MQTT ingest %s subscribed to %s at %s:%s", self.client_id, self.filter,
                 self.settings.host, self.settings.port)
        # Acks go out in arrival order, and only on the connection the message came on:
        # packet ids belong to one connection. Each entry is [mid, qos, ok], ok None = not
        # stored yet; a done-callback acks the finished run at the head of the queue.
        pending: deque[list[Any]] = deque()
        paho = client._client
        live = [True]

        def settle(entry: list[Any], task: asyncio.Task) -> None:
            if task.cancelled():
                entry[2] = False
            elif task.exception() is not None:
                # not acknowledged: the broker sends it again on the next session
                log.error("MQTT message %s could not be ingested: %r", entry[0], task.exception())
                entry[2] = False
            else:
                entry[2] = task.result()
            ack_ready()

        def ack_ready() -> None:
            while pending and pending[0][2] is not None:
                mid, qos, ok = pending.popleft()
                if ok and live[0]:
                    paho.ack(mid, qos)

        batched = callable(getattr(self.target, "accept_many", None))
        # batched: what arrived while earlier batches were being stored, in arrival order
        waiting: deque[tuple[aiomqtt.Message, list[Any] | None]] = deque()
        flushers: set[asyncio.Task] = set()

        async def flush() -> None:
            while waiting:
                batch = [waiting.popleft() for _ in range(min(len(waiting), self.settings.max_batch))]
                oks: list[bool] = [False] * len(batch)
                try:
                    oks = await self._ingest_many([m for m, _ in batch])
                except Exception as exc:  # not acknowledged: the broker sends them again
                    log.error("%d MQTT messages could not be ingested: %r", len(batch), exc)
                finally:  # also when cancelled: then nothing of the batch is acknowledged
                    self._backlog -= len(batch)
                    for (_, entry), ok in zip(batch, oks, strict=True):
                        if entry is not None:
                            entry[2] = ok
                    ack_ready()

        messages = client.messages
        queue = client._queue  # read what is already there without a task per message
        try:
            while True:
                try:
                    m = queue.get_nowait()
                except asyncio.QueueEmpty:
                    m = await anext(messages)  # waits; raises MqttError on disconnect
                backlog = self._backlog if batched else len(self._inflight)
                if m.qos == 0 and backlog >= self.settings.max_inflight * 4:
                    self._count("dropped_qos0")
                    continue
                entry = [m.mid, m.qos, None] if m.qos >= 1 else None
                if entry is not None:
                    pending.append(entry)
                if batched:
                    # Everything read before this task yields goes into one batch; a batch
                    # starts at once unless max_flushers batches are being stored, and
                    # what arrives meanwhile forms the next one (no timer: a lone message
                    # is never held back).
                    waiting.append((m, entry))
                    self._backlog += 1
                    if len(flushers) < self.settings.max_flushers:
                        task = asyncio.create_task(flush())
                        for group in (flushers, self._inflight):
                            group.add(task)
                            task.add_done_callback(group.discard)
                    continue
                task = asyncio.create_task(self._ingest(m))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                if entry is not None:
                    task.add_done_callback(functools.partial(settle, entry))
        finally:
            live[0] = False

    # -- one message ----------------------------------------------------------------------

    async def _message_of(self, m: aiomqtt.Message, new_id: str | None = None) -> Message | None:
        """The message to store, or None when it is rejected (counted and logged)."""
        topic = m.topic.value
        try:
            st = parse_stream_topic(topic)
        except TopicError as exc:
            await self._reject("topic", str(exc))
            return None
        payload = m.payload if isinstance(m.payload, bytes | bytearray) else str(m.payload).encode()
        if len(payload) > self.settings.max_payload:
            await self._reject("too_large", f"{st.project_id}/{st.device_id}: payload of {len(payload)} bytes"
                               f" is over the limit of {self.settings.max_payload}")
            return None
        if self.settings.registry is not None and not self._known(st):
            await self._reject("unknown_device",
                               f"device {st.device_id!r} of project {st.project_id!r} is not in the registry")
            return None
        return Message.new(
            project_id=st.project_id, device_id=st.device_id, path=st.path,
            content_type=content_type_of(m, self.settings.default_content_type),
            payload=bytes(payload), metadata={"mqtt_topic": topic},
            id=(self.settings.trust_message_id and message_id_of(m)) or new_id,
        )

    async def _ingest(self, m: aiomqtt.Message) -> bool:
        """Store the message (or reject it). True when it may be acknowledged."""
        message = await self._message_of(m)
        if message is None:
            return True
        if not await self._store(self.target.accept, message, m.topic.value):
            return False
        self.stats["accepted"] += 1
        self.stats["bytes"] += len(message.payload)
        return True

    async def _ingest_many(self, raw: list[aiomqtt.Message]) -> list[bool]:
        """Store a batch with one ``accept_many`` (rejects are acknowledged as always): one
        answer per message, True when it may be acknowledged."""
        ids = _new_ids(len(raw))
        messages = [await self._message_of(m, new_id) for m, new_id in zip(raw, ids, strict=True)]
        good = [msg for msg in messages if msg is not None]
        if good:
            where = good[0].metadata["mqtt_topic"] + (f" and {len(good) - 1} more" if len(good) > 1 else "")
            if not await self._store(self.target.accept_many, good, where):  # type: ignore[attr-defined]
                return [msg is None for msg in messages]
            self.stats["accepted"] += len(good)
            self.stats["bytes"] += sum(len(msg.payload) for msg in good)
        return [True] * len(raw)

    async def _store(self, accept: Any, what: Any, where: str) -> bool:
        """``await accept(what)`` until it succeeds (True), retrying while the target is
        overloaded or failing; False when it failed while the ingest is stopping."""
        delay = 0.05
        while True:
            try:
                await accept(what)
                return True
            except Overloaded as exc:
                # hold the ack: the broker stops sending once max_inflight are unacked; look
                # again soon (the router re-measures its queues every 0.25 s), not only after
                # retry_after: a worker draining a backlog should not idle
                self._count("overloaded")
                await asyncio.sleep(min(exc.retry_after, 0.25))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._count("store_errors")
                if self._stopping:
                    return False
                log.error("storing MQTT message from %s failed (%s); retrying", where, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _known(self, st: StreamTopic) -> bool:
        reg = self.settings.registry
        assert reg is not None
        if reg.lookup(st.project_id, st.device_id) is not None:
            return True
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_refresh >= self.settings.registry_refresh:
            self._last_refresh = loop.time()
            try:
                if reg.refresh():
                    return reg.lookup(st.project_id, st.device_id) is not None
            except Exception as exc:  # a broken new version: keep the old entries
                log.error("device registry not reloaded: %s", exc)
        return False

    def _count(self, what: str) -> int:
        n = self.stats.get(what, 0) + 1
        self.stats[what] = n
        return n

    async def _reject(self, reason: str, detail: str) -> None:
        n = self._count(f"rejected_{reason}")
        if n <= 10 or n & (n - 1) == 0:  # the first few, then at powers of two: no log floods
            log.warning("MQTT message rejected (%s, %d so far): %s", reason, n, detail)
        store = getattr(self.target, "store", None)
        if store is not None:
            with contextlib.suppress(Exception):
                await bump_store_counter(store, f"mqtt_rejected_{reason}")


class _BurstSocket:
    """The connection's socket as paho sees it, reading what has arrived in large chunks.

    paho reads a PUBLISH with four or more ``recv`` calls (type byte, length bytes one by
    one, rest) and aiomqtt calls it for one packet per event-loop turn. Through this
    wrapper one ``recv`` takes up to 64 KiB from the kernel and paho's small reads are
    served from it; ``pending()`` (which aiomqtt 2.x asks, as it does of TLS sockets)
    makes aiomqtt's reader go on until the chunk is used up, so everything that arrived
    together is read in one turn and reaches the ingest as one batch. At most
    ``max_refills`` chunks are taken per turn, so a flood cannot starve the event loop."""

    def __init__(self, sock: Any, chunk: int = 65536, max_refills: int = 4) -> None:
        self._sock = sock
        self._chunk = chunk
        self._max_refills = max_refills
        self._refills = 0
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            if self._refills >= self._max_refills:
                self._refills = 0  # the rest next turn: the socket is still readable
                raise BlockingIOError
            try:
                self._buf, self._pos = self._sock.recv(max(n, self._chunk)), 0
            except BlockingIOError:
                self._refills = 0
                raise
            self._refills += 1
            if len(self._buf) <= n:
                data, self._buf = self._buf, b""
                return data
        data = self._buf[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def pending(self) -> int:
        return len(self._buf) - self._pos

    def __getattr__(self, name: str) -> Any:  # send, fileno, close, setblocking, ...
        return getattr(self._sock, name)


def _read_in_bursts(client: aiomqtt.Client) -> None:
    """Put a :class:`_BurstSocket` between paho and each plain TCP connection it opens."""
    paho = client._client
    opened = getattr(paho, "on_socket_open", None)
    if opened is None or getattr(paho, "_transport", "tcp") != "tcp" or getattr(paho, "_ssl", False):
        return

    def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
        if getattr(c, "_sock", None) is sock and isinstance(sock, socket.socket):
            c._sock = sock = _BurstSocket(sock)
        opened(c, userdata, sock)

    paho.on_socket_open = on_socket_open


def _new_ids(n: int) -> list[str]:
    """``n`` random (version 4) UUIDs from one read of the system's random source."""
    raw = os.urandom(16 * n)
    return [str(uuid.UUID(bytes=raw[i:i + 16], version=4)) for i in range(0, 16 * n, 16)]


async def bump_store_counter(store: Any, name: str, by: int = 1) -> None:
    """Add to a named counter in the router's store; ``/metrics`` shows every store counter
    as ``pipeline_<name>``, and the count survives restarts and is shared by processes."""
    def op(conn: Any) -> None:
        conn.execute("INSERT INTO counters(name, value) VALUES (?, ?)"
                     " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))
    await store._run(op)  # the store's single writer (no public hook for new counters yet)


async def serve_mqtt(target: IngestTarget, settings: MqttSettings) -> None:
    """Run an ingest until cancelled."""
    async with MqttIngest(target, settings):
        await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------
# Ingest gateway: an IngestTarget that forwards into the broker instead of a store.


@dataclass
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str | None = None
    timeout: float = 10.0


class MqttGateway:
    """Lets any ingest server (CoAP) feed pipeline workers through the broker.

    Usage::

        async with MqttGateway(GatewaySettings(port=1883)) as gateway:
            async with CoapIngest(gateway, coap_settings):   # devices talk CoAP to this process
                ...

    ``accept(message)`` publishes the message (QoS 1, MQTT v5 content type, user property
    ``message-id``) to ``<project>/<device>/stream/<path>`` and returns once the broker
    acknowledged it, so a CoAP 2.04 still means "durably taken" (with broker persistence on).
    The worker that takes it keeps the message id. Device state (``/.d/``) lives in the
    retained state topics ``<project>/<device>/state/<path>``: the gateway subscribes to
    them, answers reads from what it has seen, tells observers when they change, and writes
    by publishing retained JSON (an empty retained payload deletes).
    """

    def __init__(self, settings: GatewaySettings | None = None) -> None:
        self.settings = settings or GatewaySettings()
        s = self.settings
        self.client_id = s.client_id or f"pipelines-gateway-{uuid.uuid4().hex[:8]}"
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task | None = None
        self.last_error: str | None = None  # the last connection failure, for the start-up error
        # (project, device) -> {state sub-path ("" = root): value}
        self._state: dict[tuple[str, str], dict[str, Any]] = {}
        self._watchers: dict[tuple[str, str], list[Any]] = {}
        self.stats: dict[str, int] = {"forwarded": 0, "state_updates": 0}
        self.ready = asyncio.Event()

    async def __aenter__(self) -> MqttGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect; raises ConnectionError (saying why) if the broker is not reached in time."""
        self._reader = asyncio.create_task(self._run(), name="mqtt-gateway")
        try:
            await asyncio.wait_for(self.ready.wait(), self.settings.timeout)
        except TimeoutError:
            await self.stop()
            why = f": {self.last_error}" if self.last_error else ""
            raise ConnectionError(f"MQTT broker {self.settings.host}:{self.settings.port} not reached "
                                  f"within {self.settings.timeout:g} s{why}") from None

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    async def _run(self) -> None:
        s = self.settings
        delay = 0.2
        while True:
            client = aiomqtt.Client(s.host, s.port, identifier=self.client_id, username=s.username,
                                    password=s.password, protocol=aiomqtt.ProtocolVersion.V5,
                                    timeout=s.timeout)
            client.pending_calls_threshold = 1 << 20
            try:
                async with client:
                    await client.subscribe("+/+/state/#", qos=1)
                    self._client = client
                    self.ready.set()
                    delay = 0.2
                    async for m in client.messages:
                        self._state_message(m)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
                log.warning("MQTT gateway connection lost (%s); retrying in %.1f s", exc, delay)
            finally:
                self._client = None
            await asyncio.sleep(delay)
            delay = min(10.0, delay * 2)

    def _state_message(self, m: aiomqtt.Message) -> None:
        parts = m.topic.value.split("/", 3)
        if len(parts) < 3 or parts[2] != "state":
            return
        key = (parts[0], parts[1])
        sub = parts[3] if len(parts) == 4 else ""
        doc = self._state.setdefault(key, {})
        payload = m.payload if isinstance(m.payload, bytes | bytearray) else str(m.payload).encode()
        if not payload:
            doc.pop(sub, None)
        else:
            try:
                doc[sub] = loads_bounded(payload)  # too deep: kept as text, like any non-JSON
            except ValueError:
                doc[sub] = payload.decode("utf-8", "replace")
        self.stats["state_updates"] += 1
        for cb in list(self._watchers.get(key, [])):
            try:
                cb()
            except Exception:
                log.exception("state watcher failed")

    async def _publish(self, topic: str, payload: bytes, *, retain: bool,
                       props: Properties | None = None) -> None:
        client = self._client
        if client is None:
            raise Overloaded("the MQTT broker is not reachable", 2.0)
        try:
            await client.publish(topic, payload, qos=1, retain=retain, properties=props)
        except aiomqtt.MqttError as exc:
            raise Overloaded(f"publishing to the MQTT broker failed: {exc}", 2.0) from None

    # -- IngestTarget -------------------------------------------------------------------

    async def accept(self, message: Message) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = message.content_type
        props.UserProperty = [("message-id", message.id)]
        topic = f"{message.project_id}/{message.device_id}/stream/{message.path.strip('/')}"
        await self._publish(topic, message.payload, retain=False, props=props)
        self.stats["forwarded"] += 1

    def _doc(self, project_id: str, device_id: str) -> Any:
        parts = self._state.get((project_id, device_id), {})
        doc: Any = parts.get("", {})
        if not isinstance(doc, dict):
            doc = {}
        for sub in sorted((k for k in parts if k), key=lambda k: k.count("/")):
            doc = set_at(doc, "/" + sub, parts[sub])
        return doc

    async def get_state(self, project_id: str, device_id: str, path: str = "/") -> Any:
        return get_at(self._doc(project_id, device_id), path)

    async def set_state(self, project_id: str, device_id: str, path: str, value: Any,
                        merge: bool = False) -> None:
        key = path.strip("/")
        if merge:
            value = deep_merge(get_at(self._doc(project_id, device_id), path), value)
        await self._clear_below(project_id, device_id, key)
        await self._publish(f"{project_id}/{device_id}/state/{key}", dumps(value), retain=True)
        self._state.setdefault((project_id, device_id), {})[key] = value

    async def delete_state(self, project_id: str, device_id: str, path: str) -> None:
        key = path.strip("/")
        await self._clear_below(project_id, device_id, key)
        await self._publish(f"{project_id}/{device_id}/state/{key}", b"", retain=True)
        self._state.get((project_id, device_id), {}).pop(key, None)

    async def _clear_below(self, project_id: str, device_id: str, key: str) -> None:
        parts = self._state.get((project_id, device_id), {})
        for sub in [k for k in parts if k and (not key or k.startswith(key + "/"))]:
            await self._publish(f"{project_id}/{device_id}/state/{sub}", b"", retain=True)
            parts.pop(sub, None)

    def watch_state(self, project_id: str, device_id: str, callback: Any) -> Any:
        key = (project_id, device_id)
        self._watchers.setdefault(key, []).append(callback)

        def unwatch() -> None:
            lst = self._watchers.get(key, [])
            if callback in lst:
                lst.remove(callback)
        return unwatch
