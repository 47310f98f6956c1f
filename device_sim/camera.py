"""A simulated microcontroller camera: uploads frames, observes its results, survives outages.

Use::

    from device_sim import Camera, CameraConfig, fleet_identities
    identity = fleet_identities(1, seed=1)[0]
    camera = Camera(identity, CameraConfig(host="127.0.0.1", port=5684, interval=5.0))
    await camera.start()
    ...
    print(camera.stats.frames_answered, camera.stats.last_answer, camera.stats.last_latency)
    await camera.stop()

What it does, like a Golioth-SDK device: one upload at a time (CON, Block1) of a rendered frame to
``/.s/<stream_path>`` every ``interval`` seconds (± jitter); the router's 2.04 carries the frame's
message id. Meanwhile it observes ``/.d/<result_path>``; a notification whose ``frame_id`` matches
an uploaded frame counts as that frame's answer, and the time from the start of the (successful)
upload to the notification is its latency. When idle it pings (empty CON) every ``keepalive``
seconds. On failures it backs off exponentially, drops its endpoint/DTLS session and carries on.

``on_event`` (optional, sync or async) receives a :class:`CameraEvent` for every step, e.g. for
a live view. Counters are in :class:`CameraStats` (``camera.stats``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import cbor2

from device_sim.coap_link import BLOCK_SIZES, CoapLink, LinkError, Notification, RejectedError
from device_sim.frames import CONTENT_FORMATS, Frame, FrameSource, ImageFormat
from device_sim.identity import DeviceIdentity

log = logging.getLogger(__name__)

Transport = Literal["coaps", "coap", "mqtt"]
EventKind = Literal[
    "upload_started", "acked", "answered", "rejected", "error", "retry", "keepalive",
    "observing", "bad_result", "unanswered", "stopped",
]

MAX_PENDING = 64  # frames awaiting an answer; older ones are given up on
LATENCY_SAMPLES = 1000


@dataclass
class CameraConfig:
    """How a camera talks to the router. Defaults mirror a Golioth-SDK device."""

    host: str = "127.0.0.1"
    port: int | None = None  # None: 5684 for coaps, 5683 for coap, 1883 for mqtt
    transport: Transport = "coaps"
    stream_path: str = "images"
    result_path: str = "result"
    interval: float = 5.0  # seconds between uploads
    jitter: float = 0.2  # fraction of the interval, uniform ±
    block_size: int = 1024  # Block1 size, 16..1024
    image_format: ImageFormat = "png"
    png_palette: bool = True  # 256-colour PNG (20-60 KB); False: full RGB (120-140 KB)
    width: int = 320
    height: int = 240
    keepalive: float = 9.0  # empty CON when idle this long; 0 disables
    request_timeout: float = 30.0  # give up on one upload attempt after this long
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    answer_timeout: float = 60.0  # no answer this long after the 2.04: observe again (x3: give up)
    max_frames: int | None = None  # stop uploading after this many frames (None: forever)

    def validate(self) -> None:
        problems = []
        if self.transport not in ("coaps", "coap", "mqtt"):
            problems.append(f"transport {self.transport!r} unknown: use coaps, coap or mqtt")
        if self.block_size not in BLOCK_SIZES:
            problems.append(f"block size {self.block_size} not allowed: use one of {sorted(BLOCK_SIZES)}")
        if self.image_format not in CONTENT_FORMATS:
            problems.append(f"image format {self.image_format!r} unknown: use png or jpeg")
        if self.interval < 0:
            problems.append(f"interval must be >= 0, got {self.interval}")
        if not 0 <= self.jitter < 1:
            problems.append(f"jitter must be in [0, 1), got {self.jitter}")
        for name in ("request_timeout", "backoff_initial", "backoff_max", "answer_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.keepalive < 0:
            problems.append(f"keepalive must be >= 0, got {self.keepalive}")
        if self.port is not None and not 0 < self.port < 65536:
            problems.append(f"port {self.port} out of range 1..65535")
        if self.max_frames is not None and self.max_frames < 0:
            problems.append(f"max_frames must be >= 0, got {self.max_frames}")
        if problems:
            raise ValueError("invalid camera config: " + "; ".join(problems))


@dataclass
class CameraStats:
    """Counters of one camera, for a live view or a test."""

    frames_sent: int = 0  # frames whose upload started (each frame once, however many tries)
    frames_acked: int = 0  # 2.04 received
    frames_answered: int = 0  # result notification matched to a frame
    frames_rejected: int = 0  # dropped after a non-retryable error answer
    errors: int = 0  # failed attempts, failed pings, unreadable notifications
    retries: int = 0  # upload attempts after a failed one
    keepalives: int = 0  # pings sent
    bytes_sent: int = 0  # payload bytes of acknowledged frames
    observing: bool = False
    last_frame_id: str | None = None
    last_answer: str | None = None
    last_status: str | None = None
    last_latency: float | None = None  # seconds
    last_error: str | None = None
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "latencies"}
        data["latency_samples"] = len(self.latencies)
        return data


@dataclass(frozen=True)
class CameraEvent:
    """Something that happened to a camera (sent to ``on_event``)."""

    device_id: str
    kind: EventKind
    time: float  # time.time()
    frame_index: int | None = None
    frame_id: str | None = None
    latency: float | None = None
    detail: str = ""


EventCallback = Callable[[CameraEvent], Awaitable[None] | None]


@dataclass
class _Pending:
    frame_index: int
    started: float  # monotonic time the successful upload attempt started
    acked: float  # monotonic time of the 2.04
    resubscribed: bool = False


class Camera:
    """One simulated camera. ``await start()`` runs it in the background; ``await stop()`` ends it."""

    def __init__(
        self,
        identity: DeviceIdentity,
        config: CameraConfig | None = None,
        *,
        seed: int = 0,
        on_event: EventCallback | None = None,
        start_delay: float = 0.0,
    ) -> None:
        self.identity = identity
        self.config = config or CameraConfig()
        self.config.validate()
        self.device_id = identity.device_id
        self.stats = CameraStats()
        self.on_event = on_event
        self.start_delay = start_delay
        # Frames and jitter depend only on the seed and the device, never on wall-clock luck.
        device_seed = seed * 1000 + _device_number(identity.device_id)
        self.frames = FrameSource(
            identity.scene, seed=device_seed, label=identity.device_id, width=self.config.width,
            height=self.config.height, image_format=self.config.image_format,
            png_palette=self.config.png_palette)
        self._rng = random.Random(device_seed)
        self._link = self._make_link()
        self._tasks: list[asyncio.Task] = []
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._early: OrderedDict[str, tuple[dict, float]] = OrderedDict()  # answers before the 2.04
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._link_healthy = asyncio.Event()
        self._resubscribe = asyncio.Event()
        self._answered_event = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self.last_frame: Frame | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._tasks:
            return
        try:
            await self._link.open()
        except LinkError as exc:  # e.g. MQTT broker down: the upload loop keeps retrying
            self.stats.errors += 1
            self.stats.last_error = str(exc)
        self._link_healthy.set()  # optimistic: observe right away; failures clear it
        self._tasks = [
            asyncio.create_task(self._upload_loop(), name=f"{self.device_id}-upload"),
            asyncio.create_task(self._observe_loop(), name=f"{self.device_id}-observe"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._link.close()
        self.stats.observing = False
        await self._emit("stopped")

    async def __aenter__(self) -> Camera:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return any(not task.done() for task in self._tasks)

    async def wait_answered(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` frames were answered; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.stats.frames_answered < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._answered_event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._answered_event.wait(), remaining)
        return True

    # ------------------------------------------------------------------ uploads

    def _make_link(self) -> CoapLink:
        if self.config.transport == "mqtt":
            from device_sim.mqtt_link import MqttLink

            return MqttLink(self.identity, host=self.config.host, port=self.config.port,
                            request_timeout=self.config.request_timeout)  # type: ignore[return-value]
        return CoapLink(
            self.identity, host=self.config.host, port=self.config.port,
            secure=self.config.transport == "coaps", block_size=self.config.block_size,
            request_timeout=self.config.request_timeout)

    async def _upload_loop(self) -> None:
        if self.start_delay:
            await self._idle(self.start_delay)
        index = 0
        while self.config.max_frames is None or index < self.config.max_frames:
            try:
                frame = await asyncio.to_thread(self.frames.render, index, datetime.now(UTC))
                self.last_frame = frame
                await self._send(frame)
            except Exception as exc:  # a simulator bug must not silently kill the camera
                log.exception("%s: upload of frame %d failed unexpectedly", self.device_id, index)
                self.stats.errors += 1
                self.stats.last_error = f"internal error: {exc!r}"
            index += 1
            spread = self.config.interval * self.config.jitter
            await self._idle(self.config.interval + self._rng.uniform(-spread, spread))
        # Out of frames: keep the session (observation, keep-alive) going until stopped.
        while True:
            await self._idle(3600)

    async def _send(self, frame: Frame) -> None:
        """Upload one frame, retrying with backoff until it is acknowledged or refused."""
        self.stats.frames_sent += 1
        backoff = self.config.backoff_initial
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            await self._emit("upload_started", frame_index=frame.index, detail=f"attempt {attempt}")
            try:
                frame_id = await self._link.upload(self.config.stream_path, frame.payload,
                                                   frame.content_format)
            except LinkError as exc:
                self.stats.errors += 1
                self.stats.last_error = str(exc)
                self._link_healthy.clear()
                if isinstance(exc, RejectedError) and not exc.retryable:
                    self.stats.frames_rejected += 1
                    await self._emit("rejected", frame_index=frame.index, detail=str(exc))
                    return
                await self._emit("error", frame_index=frame.index, detail=str(exc))
                delay = backoff
                if isinstance(exc, RejectedError) and exc.max_age is not None:
                    delay = max(delay, float(exc.max_age))
                else:
                    # No answer at all: a fresh endpoint and DTLS session, as firmware would do.
                    await self._reset_link()
                await asyncio.sleep(delay * self._rng.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.config.backoff_max)
                self.stats.retries += 1
                await self._emit("retry", frame_index=frame.index, detail=f"after {delay:.1f} s")
                continue
            self._link_healthy.set()
            self.stats.frames_acked += 1
            self.stats.bytes_sent += len(frame.payload)
            self.stats.last_frame_id = frame_id
            await self._emit("acked", frame_index=frame.index, frame_id=frame_id)
            self._pending[frame_id] = _Pending(frame.index, started, time.monotonic())
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
            early = self._early.pop(frame_id, None)
            if early is not None:
                await self._record_answer(frame_id, *early)
            return

    async def _idle(self, seconds: float) -> None:
        """Sleep ``seconds``, pinging whenever the link has been quiet for ``keepalive``."""
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            _raise_if_cancelled()
            now = time.monotonic()
            if now >= deadline:
                return
            self._check_overdue()
            wait = min(deadline - now, max(0.05, self.config.answer_timeout / 4))
            if self.config.keepalive and self._link.is_open:
                until_ping = self._link.last_activity + self.config.keepalive - now
                if until_ping <= 0:
                    await self._keepalive()
                    continue
                wait = min(wait, until_ping)
            await asyncio.sleep(wait)

    async def _keepalive(self) -> None:
        self.stats.keepalives += 1
        alive = await self._link.ping(timeout=min(5.0, self.config.request_timeout))
        await self._emit("keepalive", detail="ok" if alive else "no answer")
        if alive:
            self._link_healthy.set()
            return
        self.stats.errors += 1
        self.stats.last_error = "keep-alive got no answer"
        self._link_healthy.clear()
        await self._reset_link()

    async def _reset_link(self) -> None:
        try:
            await self._link.reset()
        except LinkError as exc:  # still unreachable; the next attempt tries again
            log.debug("%s: reconnect failed: %s", self.device_id, exc)

    def _check_overdue(self) -> None:
        """Re-observe when an answer is overdue; give up on a frame after 3 answer timeouts."""
        now = time.monotonic()
        limit = self.config.answer_timeout
        for frame_id, pending in list(self._pending.items()):
            age = now - pending.acked
            if age > 3 * limit:
                del self._pending[frame_id]
                self._emit_soon("unanswered", frame_index=pending.frame_index, frame_id=frame_id)
            elif age > limit and not pending.resubscribed:
                # The router may have restarted and forgotten our observation: observe again;
                # the new observation's first notification carries the current result.
                log.info("%s: no answer for frame %s yet, re-registering observation",
                         self.device_id, frame_id)
                pending.resubscribed = True
                self._resubscribe.set()

    # ------------------------------------------------------------------ results

    async def _observe_loop(self) -> None:
        backoff = self.config.backoff_initial
        while True:
            _raise_if_cancelled()
            if not self._link_healthy.is_set():
                await self._link_healthy.wait()
            self._resubscribe.clear()
            observer = asyncio.create_task(self._observe_once())
            resubscribe = asyncio.create_task(self._resubscribe.wait())
            try:
                await asyncio.wait({observer, resubscribe}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (observer, resubscribe):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            self.stats.observing = False
            established = False
            if observer.done() and not observer.cancelled():
                if observer.exception() is not None:
                    log.error("%s: observation failed unexpectedly", self.device_id,
                              exc_info=observer.exception())
                    self.stats.errors += 1
                else:
                    established = observer.result()
            backoff = (self.config.backoff_initial if established
                       else min(backoff * 2, self.config.backoff_max))
            if not resubscribe.done():
                await asyncio.sleep(backoff * self._rng.uniform(0.8, 1.2))

    async def _observe_once(self) -> bool:
        """Observe until the observation ends; True if it was established at all."""
        try:
            subscription = await self._link.subscribe(self.config.result_path)
        except LinkError as exc:
            log.debug("%s: observe failed: %s", self.device_id, exc)
            await self._emit("observing", detail=f"not established: {exc}")
            return False
        self.stats.observing = True
        await self._emit("observing", detail="established")
        try:
            async for notification in subscription:
                await self._on_result(notification)
        finally:
            subscription.cancel()
        return True

    async def _on_result(self, notification: Notification) -> None:
        if not notification.payload:
            return
        received = time.monotonic()
        try:
            document = _decode_document(notification.payload, notification.content_format)
        except ValueError:
            document = _UNREADABLE
        if document is None:
            return  # an empty state document (JSON/CBOR null): no result yet
        if not isinstance(document, dict):
            self.stats.errors += 1
            self.stats.last_error = "result notification is not a JSON or CBOR object"
            await self._emit("bad_result", detail=self.stats.last_error)
            return
        if "frame_id" not in document:
            return  # no result yet (e.g. the empty state document)
        frame_id = str(document["frame_id"])
        if frame_id in self._answered:
            return  # the initial state on re-registration, already counted
        if frame_id not in self._pending and not self._link.correlates and self._pending:
            # MQTT gives the device no message id: answers come in upload order.
            frame_id = next(iter(self._pending))
        if frame_id not in self._pending:
            # Possibly the answer overtook our 2.04; keep it briefly for _send to match.
            self._early[frame_id] = (document, received)
            while len(self._early) > 16:
                self._early.popitem(last=False)
            return
        await self._record_answer(frame_id, document, received)

    async def _record_answer(self, frame_id: str, document: dict, received: float) -> None:
        pending = self._pending.pop(frame_id)
        latency = max(0.0, received - pending.started)
        self._answered[frame_id] = None
        while len(self._answered) > 4 * MAX_PENDING:
            self._answered.popitem(last=False)
        stats = self.stats
        stats.frames_answered += 1
        stats.last_latency = latency
        stats.latencies.append(latency)
        stats.last_status = str(document.get("status")) if document.get("status") is not None else None
        answer = document.get("output", document.get("caption"))
        stats.last_answer = answer if isinstance(answer, str) else json.dumps(answer)
        self._answered_event.set()
        await self._emit("answered", frame_index=pending.frame_index, frame_id=frame_id,
                         latency=latency, detail=stats.last_answer or "")

    # ------------------------------------------------------------------ events

    async def _emit(self, kind: EventKind, **fields: Any) -> None:
        if self.on_event is None:
            return
        event = CameraEvent(self.device_id, kind, time.time(), **fields)
        try:
            result = self.on_event(event)
            if inspect.isawaitable(result):
                await result
        except Exception:  # a broken live view must not stop the camera
            log.exception("%s: event callback failed on %s", self.device_id, kind)

    def _emit_soon(self, kind: EventKind, **fields: Any) -> None:
        if self.on_event is not None:
            task = asyncio.get_running_loop().create_task(self._emit(kind, **fields))
            self._background.add(task)  # keep a reference until it has run
            task.add_done_callback(self._background.discard)


_UNREADABLE = object()


def _decode_document(payload: bytes, content_format: int | None) -> Any:
    """The decoded state document; ValueError if it is neither JSON nor (when labelled) CBOR."""
    try:
        if content_format == 60:  # application/cbor
            return cbor2.loads(payload)
        return json.loads(payload)
    except (ValueError, cbor2.CBORDecodeError) as exc:
        raise ValueError(f"unreadable state document: {exc}") from None


def _device_number(device_id: str) -> int:
    digits = "".join(ch for ch in device_id if ch.isdigit())
    return int(digits[-6:]) if digits else sum(device_id.encode())


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that something below swallowed: Python 3.11's ``asyncio.wait_for``
    returns the result instead when its future completes as the task is cancelled (a ping answered
    just as the camera stops), and the camera's loops would then run on and never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
