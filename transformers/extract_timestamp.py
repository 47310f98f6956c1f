"""``extract-timestamp``: a top-level ``t``, ``ts``, ``time`` or ``timestamp`` key (first
found, in that order) becomes the message time and is removed from the payload.

Accepted values: Unix time as a number or a string of digits — seconds, or milliseconds,
microseconds or nanoseconds told apart by magnitude (≥1e11 is ms, ≥1e14 µs, ≥1e17 ns; 1e11 s
would be the year 5138) — or an ISO 8601 / RFC 3339 string (no offset means UTC). A payload
without any of the keys, or that is not a JSON object, passes unchanged. A key with a value
that is none of these is a failure.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.components import Transformer, TransformError
from pipelines.message import Message
from transformers.base import read_json
from transformers.registry import register

KEYS = ("t", "ts", "time", "timestamp")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# (threshold, units per second): first row whose threshold |value| reaches wins
_SCALES = ((1e17, 1_000_000_000), (1e14, 1_000_000), (1e11, 1_000), (0.0, 1))


def parse_timestamp(value: Any) -> datetime:
    """Unix s/ms/µs/ns (number or digit string) or ISO 8601 → aware UTC datetime.
    Raises ValueError with a short reason."""
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            return _parse_iso(text)
        if not math.isfinite(number):
            raise ValueError(f"{value!r} is not a time")
        value = int(text) if text.lstrip("+-").isdigit() else number
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected Unix time or an ISO 8601 string, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a time")
    per_second = next(scale for limit, scale in _SCALES if abs(value) >= limit)
    try:
        if isinstance(value, int):
            whole, rest = divmod(value, per_second)
            return _EPOCH + timedelta(seconds=whole, microseconds=rest * 1_000_000 // per_second)
        return _EPOCH + timedelta(seconds=value / per_second)
    except OverflowError:
        raise ValueError(f"{value!r} is out of range") from None


def _parse_iso(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither Unix time nor ISO 8601") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


@register
class ExtractTimestamp(Transformer):
    deterministic = True
    type = "extract-timestamp"
    version = "1.0.0"
    summary = "Use a top-level t/ts/time/timestamp value as the message time and remove it."
    accepts = ("json",)

    def transform_sync(self, message: Message) -> Message:
        doc = read_json(self, message)
        if not isinstance(doc, dict):
            return message
        key = next((k for k in KEYS if k in doc), None)
        if key is None:
            return message
        try:
            when = parse_timestamp(doc[key])
        except ValueError as exc:
            raise TransformError(f"extract-timestamp: key {key!r}: {exc}") from None
        # a new dict: the parsed document may be shared with other pipelines
        rest = {k: v for k, v in doc.items() if k != key}
        return message.evolve(json=rest, timestamp=when)
