"""Prediction records and the in-memory store that lists them newest first.

    store = PredictionStore(max_items=10_000)
    pred = store.add(Prediction(model="salesforce/blip", version=VERSION, input={...}, base_url=...))
    pred.as_json()                      # the API object, exactly Replicate's fields
    page, next_cursor = store.page(cursor=None, limit=100)

Records live in memory only: a restart forgets them, as the stand-in needs no durability (the router
keeps its own state). When more than ``max_items`` exist the oldest finished ones are dropped, and
as on Replicate, ``retention`` seconds after a prediction finished its input, output and logs are
removed (``data_removed: true``). The input strings held in memory are counted: past
``max_held_input_bytes`` the big strings of the oldest finished predictions' inputs are replaced by
``"<removed: N characters>"``, and when only unfinished ones are left, ``add`` raises InputsFull
(the API's 503). Predictions created with ``stream: true`` keep their server-sent events in ``sse``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .ids import new_prediction_id, rfc3339

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
ALL_EVENTS = ("start", "output", "logs", "completed")
_HEAD_KEYS = frozenset({"id", "model", "version", "input"})  # as_json() starts with these, in this order


@dataclass(eq=False)
class Prediction:
    model: str
    version: str
    input: dict
    base_url: str
    webhook: str | None = None
    events: frozenset[str] = frozenset(ALL_EVENTS)
    webhook_completed: str | None = None  # the legacy option: one URL told only of completion
    owner: str = ""  # digest of the API token that created it (files it names must be its own)
    deadline: float | None = None  # unix seconds, from Cancel-After
    id: str = field(default_factory=new_prediction_id)
    status: str = "starting"
    output: object = None
    logs: str = ""
    error: str | None = None
    created_at: float = field(default_factory=lambda: round(time.time(), 6))  # as precise as shown
    started_at: float | None = None
    completed_at: float | None = None
    seq: int = 0
    data_removed: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    # True when every string of ``input`` is known to need no JSON escaping (it came from a request
    # body that was ASCII without a backslash): then ``to_json`` quotes them instead of re-scanning
    # the ~56 KB data URL of a frame for each answer and webhook.
    input_plain: bool = field(default=False, repr=False)
    # The HTTP face's leave to run it on the event loop's thread (see runner.py): its creator waits
    # for it (Prefer: wait), with no stream, webhook or deadline, and no other create in progress.
    inline: bool = field(default=False, repr=False)
    input_bytes: int = 0  # memory the input's strings take, as counted by the store's cap
    # Server-sent events when created with ``stream: true`` (None otherwise): (event, data) in order.
    sse: list[tuple[str, str]] | None = field(default=None, repr=False)
    _sse_wake: asyncio.Event | None = field(default=None, repr=False)

    def push_event(self, kind: str, data: str) -> None:
        """Append a server-sent event and wake the readers of ``urls.stream``."""
        if self.sse is None or (self.sse and self.sse[-1][0] == "done"):
            return  # not streamed, or finished (a canceled run's thread may still be talking)
        self.sse.append((kind, data))
        if self._sse_wake is not None:
            self._sse_wake.set()
            self._sse_wake = None

    def sse_waiter(self) -> asyncio.Event:
        if self._sse_wake is None:
            self._sse_wake = asyncio.Event()
        return self._sse_wake

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def url(self) -> str:
        """``urls.get``: where this prediction is read."""
        return f"{self.base_url}/v1/predictions/{self.id}"

    def to_json(self, status: str | None = None) -> str:
        """``json.dumps(self.as_json(status))``: the same text, cheaper for plain inputs."""
        return self.encode(self.as_json(status))

    def encode(self, obj: dict) -> str:
        """``json.dumps(obj)`` for ``obj`` from ``as_json()`` (possibly taken earlier, as a snapshot).

        With ``input_plain`` the input's strings are quoted as they are instead of re-scanned:
        for a frame that is a ~56 KB data URL, for every answer and webhook.
        """
        parts = self._head_parts()
        if parts is None:
            return json.dumps(obj)
        parts.append(self.json_tail(obj))
        return "".join(parts)  # one copy of the big strings

    def json_head(self) -> str | None:
        """The text every encoding of this prediction starts with, through its input
        (``{"id": ..., "model": ..., "version": ..., "input": {...}, ``): these never change.
        None when the input is not plain (then ``encode`` is ``json.dumps``)."""
        parts = self._head_parts()
        return None if parts is None else "".join(parts)

    def _head_parts(self) -> list[str] | None:
        # Built for each use, not kept: a kept copy of a ~56 KB frame would double the memory a
        # held prediction takes (beyond the cap on held inputs), and touching that much new
        # memory for every prediction costs page faults on the answer's critical path.
        if not (self.input_plain and all(type(v) is str for v in self.input.values())):
            return None
        head = json.dumps({"id": self.id, "model": self.model, "version": self.version})
        parts = [head[:-1], ', "input": {']
        for i, (k, v) in enumerate(self.input.items()):
            parts += [", \"" if i else '"', k, '": "', v, '"']
        parts.append("}, ")
        return parts

    @staticmethod
    def json_tail(obj: dict) -> str:
        """The rest of ``json.dumps(obj)`` after ``json_head()``."""
        return json.dumps({k: v for k, v in obj.items() if k not in _HEAD_KEYS})[1:]

    def as_json(self, status: str | None = None) -> dict:
        url = self.url
        metrics: dict = {}
        if self.completed_at is not None:
            ran = (self.completed_at - self.started_at) if self.started_at is not None else 0.0
            metrics = {
                "predict_time": round(ran, 6),
                "total_time": round(self.completed_at - self.created_at, 6),
            }
        obj = {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "output": self.output,
            "logs": self.logs,
            "error": self.error,
            "status": status or self.status,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "completed_at": rfc3339(self.completed_at),
            "data_removed": self.data_removed,
            "metrics": metrics,
            "urls": {"get": url, "cancel": f"{url}/cancel", "web": f"{self.base_url}/p/{self.id}"},
        }
        if self.sse is not None:
            obj["urls"]["stream"] = f"{url}/stream"
        if self.deadline is not None:
            obj["deadline"] = rfc3339(self.deadline)
        return obj


class BadCursor(ValueError):
    pass


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"p={seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith("p="):
            raise ValueError
        return int(text[2:])
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise BadCursor(f"invalid cursor {cursor[:40]!r}") from exc


class InputsFull(Exception):
    """Holding one more input would pass the cap, and no finished prediction's input is left to drop."""


def input_size(inp: dict) -> int:
    return sum(len(v) for v in inp.values() if type(v) is str) + 64 * len(inp)


def trimmed_input(inp: dict) -> dict:
    """The input with every string over 1 KB replaced by a note of its size (what a GET shows
    once the service dropped the data to stay within its memory cap)."""
    return {k: (f"<removed: {len(v)} characters>" if type(v) is str and len(v) > 1024 else v)
            for k, v in inp.items()}


class PredictionStore:
    def __init__(self, max_items: int = 10_000, retention: float = 3600.0,
                 max_held_input_bytes: int = 128 << 20) -> None:
        self.items: OrderedDict[str, Prediction] = OrderedDict()
        self.max_items = max_items
        self.retention = retention
        self.max_held_input_bytes = max_held_input_bytes
        self.held_input_bytes = 0
        self.runs = 0  # predictions created since start (the model's run_count)
        self._seq = 0
        self._last_sweep = 0.0

    def add(self, pred: Prediction) -> Prediction:
        pred.input_bytes = input_size(pred.input)
        if self.held_input_bytes + pred.input_bytes > self.max_held_input_bytes:
            self._make_room(pred.input_bytes)
        self._seq += 1
        self.runs += 1
        pred.seq = self._seq
        self.items[pred.id] = pred
        self.held_input_bytes += pred.input_bytes
        if len(self.items) > self.max_items:
            for old_id in [k for k, p in self.items.items() if p.terminal][
                : len(self.items) - self.max_items
            ]:
                self._set_input(self.items.pop(old_id), {})
        self.sweep()
        return pred

    def _set_input(self, pred: Prediction, inp: dict) -> None:
        self.held_input_bytes -= pred.input_bytes
        pred.input = inp
        pred.input_bytes = input_size(inp)
        self.held_input_bytes += pred.input_bytes

    def _make_room(self, needed: int) -> None:
        """Drop the big input strings of finished predictions, oldest first, until ``needed`` fits."""
        for pred in self.items.values():
            if self.held_input_bytes + needed <= self.max_held_input_bytes:
                return
            if pred.terminal and pred.input_bytes > 1024 + 64 * len(pred.input):
                self._set_input(pred, trimmed_input(pred.input))
        if self.held_input_bytes + needed > self.max_held_input_bytes:
            raise InputsFull(
                f"predictions in progress hold {self.held_input_bytes} bytes of input "
                f"(cap {self.max_held_input_bytes}); retry when some have finished, or upload files "
                "and pass their URLs"
            )

    def sweep(self, now: float | None = None) -> None:
        """Remove the data of predictions that finished more than ``retention`` seconds ago."""
        now = time.time() if now is None else now
        if now - self._last_sweep < min(1.0, self.retention / 2):
            return  # at most about once a second
        self._last_sweep = now
        cutoff = now - self.retention
        for pred in self.items.values():
            if pred.created_at > cutoff:
                break  # created later, so finished later too: nothing older follows
            if pred.data_removed or pred.completed_at is None or pred.completed_at > cutoff:
                continue
            self._set_input(pred, {})
            pred.output, pred.logs, pred.data_removed = None, "", True

    def get(self, pred_id: str) -> Prediction | None:
        self.sweep()
        return self.items.get(pred_id)

    def page(
        self,
        cursor: str | None,
        limit: int = 100,
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> tuple[list[Prediction], str | None]:
        """Newest first; ``next_cursor`` is None on the last page."""
        self.sweep()
        below = decode_cursor(cursor) if cursor else None
        after = None if created_after is None else round(created_after * 1e6)
        before = None if created_before is None else round(created_before * 1e6)
        out: list[Prediction] = []
        more = False
        for pred in reversed(self.items.values()):
            if below is not None and pred.seq >= below:
                continue
            micros = round(pred.created_at * 1e6)  # compare as shown in created_at, to the microsecond
            if (after is not None and micros <= after) or (before is not None and micros >= before):
                continue
            if len(out) == limit:
                more = True
                break
            out.append(pred)
        return out, (encode_cursor(out[-1].seq) if more else None)
