"""What the console's device cards show, kept as it happens: frames in, answers out.

Usage::

    activity = Activity(router)          # observes router.on_accepted / on_state_written
    activity.cards()                     # [DeviceCard, ...], newest first
    async for event in activity.events(): ...   # {"type": "frame"|"answer", ...}, for SSE
    activity.close()

A frame is a message from a device; when its payload is an image (PNG, JPEG, GIF or WebP
by its first bytes, or an ``image/*`` content type) its bytes are kept, the newest one per
device, so the console can show it as a thumbnail. An answer is a state write to the device
(``/result`` from the default pipelines, or any state path); the frame-to-answer latency is
measured from when the router accepted the frame the answer names (``frame_id``, as the
prediction results carry) or else the device's newest frame. Messages the router makes
itself (prediction results coming back) are not the device "being seen". Memory is
bounded: at most ``MAX_DEVICES`` cards, one image each, ``MAX_FRAME_BYTES`` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.message import Message

if TYPE_CHECKING:
    from pipelines.router import Router

MAX_DEVICES = 1000
MAX_FRAME_BYTES = 4 << 20
MAX_FRAME_TIMES = 20_000  # frame ids remembered for latency
SUBSCRIBER_QUEUE = 256    # events a slow browser may lag behind before it misses some

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


def image_type(payload: bytes, content_type: str) -> str | None:
    """The image type of ``payload`` by its first bytes (or its content type), else None."""
    for magic, ctype in _MAGIC:
        if payload.startswith(magic):
            return ctype
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return "image/webp"
    if content_type.startswith("image/") and "svg" not in content_type:  # never serve SVG (scripts)
        return content_type.split(";")[0]
    return None


@dataclass
class DeviceCard:
    project_id: str
    device_id: str
    last_seen: float | None = None
    messages: int = 0
    last_path: str | None = None
    frame: bytes | None = None
    frame_type: str | None = None
    frame_id: str | None = None
    frame_at: float | None = None
    frames: int = 0
    answer: Any = None
    answer_path: str | None = None
    answer_at: float | None = None
    answers: int = 0
    latency: float | None = None

    @property
    def key(self) -> str:
        return f"{self.project_id}/{self.device_id}"

    def caption(self) -> str | None:
        """A one-line reading of the answer: the prediction's output if it has one."""
        a = self.answer
        if isinstance(a, dict):
            for k in ("output", "caption", "text", "error"):
                if a.get(k):
                    v = a[k]
                    return v if isinstance(v, str) else json.dumps(v)[:300]
        if a is None:
            return None
        return a if isinstance(a, str) else json.dumps(a)[:300]

    def as_dict(self) -> dict[str, Any]:
        return {"project": self.project_id, "device": self.device_id, "key": self.key,
                "last_seen": self.last_seen, "messages": self.messages, "frames": self.frames,
                "frame_id": self.frame_id, "frame_at": self.frame_at, "frame_type": self.frame_type,
                "answers": self.answers, "answer_path": self.answer_path, "answer_at": self.answer_at,
                "caption": self.caption(), "latency": self.latency}


class Activity:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.devices: OrderedDict[tuple[str, str], DeviceCard] = OrderedDict()
        self._frame_times: OrderedDict[str, float] = OrderedDict()
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self.closed = False
        router.on_accepted.append(self._accepted)
        router.on_state_written.append(self._state_written)

    def close(self) -> None:
        """Stop the event streams (the HTTP server can then shut down at once)."""
        self.closed = True
        for q in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        with contextlib.suppress(ValueError):
            self.router.on_accepted.remove(self._accepted)
        with contextlib.suppress(ValueError):
            self.router.on_state_written.remove(self._state_written)

    def cards(self) -> list[DeviceCard]:
        return sorted(self.devices.values(), key=lambda c: (c.project_id, c.device_id))

    def card(self, project_id: str, device_id: str) -> DeviceCard | None:
        return self.devices.get((project_id, device_id))

    def _card(self, project_id: str, device_id: str) -> DeviceCard:
        key = (project_id, device_id)
        card = self.devices.get(key)
        if card is None:
            card = self.devices[key] = DeviceCard(project_id, device_id)
            while len(self.devices) > MAX_DEVICES:
                self.devices.popitem(last=False)
        else:
            self.devices.move_to_end(key)
        return card

    def _accepted(self, messages: Sequence[Message]) -> None:
        now = time.time()
        for m in messages:
            if "prediction_id" in m.metadata:  # the router's own: a prediction coming back
                continue
            card = self._card(m.project_id, m.device_id)
            card.last_seen = now
            card.messages += 1
            card.last_path = m.path
            self._frame_times[m.id] = now
            if len(self._frame_times) > MAX_FRAME_TIMES:
                self._frame_times.popitem(last=False)
            ctype = image_type(m.payload, m.content_type) if len(m.payload) <= MAX_FRAME_BYTES else None
            if ctype is None:
                if self._subscribers:
                    self._publish({"type": "message", **card.as_dict()})
                continue
            card.frame, card.frame_type, card.frame_id, card.frame_at = m.payload, ctype, m.id, now
            card.frames += 1
            if self._subscribers:
                self._publish({"type": "frame", **card.as_dict()})

    def _state_written(self, project_id: str, device_id: str, path: str, value: Any) -> None:
        now = time.time()
        card = self._card(project_id, device_id)
        card.answer, card.answer_path, card.answer_at = value, path, now
        card.answers += 1
        started = None
        if isinstance(value, dict) and isinstance(value.get("frame_id"), str):
            started = self._frame_times.get(value["frame_id"])
        if started is None:
            started = card.frame_at
        card.latency = now - started if started is not None else None
        if self._subscribers:
            self._publish({"type": "answer", **card.as_dict()})

    def _publish(self, event: dict[str, Any]) -> None:
        for q in list(self._subscribers):  # callers skip building events nobody listens to
            with contextlib.suppress(asyncio.QueueFull):  # a stalled browser misses events
                q.put_nowait(event)

    async def events(self, keepalive: float = 15.0) -> AsyncIterator[dict[str, Any] | None]:
        """Events as they happen; None every ``keepalive`` seconds of quiet (send a comment)."""
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(q)
        try:
            while not self.closed:
                try:
                    async with asyncio.timeout(keepalive):
                        event = await q.get()
                except TimeoutError:
                    yield None
                    continue
                if event is None:
                    return
                yield event
        finally:
            self._subscribers.discard(q)
