"""Prediction records and the in-memory store that lists them newest first.

    store = PredictionStore(max_items=10_000)
    pred = store.add(Prediction(model="salesforce/blip", version=VERSION, input={...}, base_url=...))
    pred.as_json()                      # the API object, exactly Replicate's fields
    page, next_cursor = store.page(cursor=None, limit=100)

Records live in memory only: a restart forgets them, as the stand-in needs no durability (the router
keeps its own state). When more than ``max_items`` exist the oldest finished ones are dropped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .ids import new_prediction_id, rfc3339

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
ALL_EVENTS = ("start", "output", "logs", "completed")


@dataclass(eq=False)
class Prediction:
    model: str
    version: str
    input: dict
    base_url: str
    webhook: str | None = None
    events: frozenset[str] = frozenset(ALL_EVENTS)
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
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def as_json(self, status: str | None = None) -> dict:
        url = f"{self.base_url}/v1/predictions/{self.id}"
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
            "data_removed": False,
            "metrics": metrics,
            "urls": {"get": url, "cancel": f"{url}/cancel", "web": f"{self.base_url}/p/{self.id}"},
        }
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


class PredictionStore:
    def __init__(self, max_items: int = 10_000) -> None:
        self.items: OrderedDict[str, Prediction] = OrderedDict()
        self.max_items = max_items
        self._seq = 0

    def add(self, pred: Prediction) -> Prediction:
        self._seq += 1
        pred.seq = self._seq
        self.items[pred.id] = pred
        if len(self.items) > self.max_items:
            for old_id in [k for k, p in self.items.items() if p.terminal][
                : len(self.items) - self.max_items
            ]:
                del self.items[old_id]
        return pred

    def get(self, pred_id: str) -> Prediction | None:
        return self.items.get(pred_id)

    def page(
        self,
        cursor: str | None,
        limit: int = 100,
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> tuple[list[Prediction], str | None]:
        """Newest first; ``next_cursor`` is None on the last page."""
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
