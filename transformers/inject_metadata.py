"""``inject-metadata``: ``{"data": P, "device_id": ..., "project_id": ..., "timestamp":
{"seconds": N, "nanos": N}}`` where P is the JSON payload and the timestamp is the
message's (arrival time, or what ``extract-timestamp`` set).
"""

from __future__ import annotations

from datetime import UTC, datetime

from pipelines.components import Transformer
from pipelines.message import Message
from transformers.base import read_json
from transformers.registry import register

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def seconds_nanos(ts: datetime) -> tuple[int, int]:
    """Exact (integer arithmetic) protobuf-style Timestamp parts; naive datetimes are UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    delta = ts - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    seconds, rest = divmod(micros, 1_000_000)
    return seconds, rest * 1000


@register
class InjectMetadata(Transformer):
    deterministic = True
    type = "inject-metadata"
    version = "1.0.0"
    summary = "Wrap the JSON payload as {data, device_id, project_id, timestamp{seconds, nanos}}."
    accepts = ("json",)

    def transform_sync(self, message: Message) -> Message:
        doc = read_json(self, message)
        seconds, nanos = seconds_nanos(message.timestamp)
        return message.evolve(json={
            "data": doc,
            "device_id": message.device_id,
            "project_id": message.project_id,
            "timestamp": {"seconds": seconds, "nanos": nanos},
        })
