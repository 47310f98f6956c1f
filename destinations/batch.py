"""``batch``: split a JSON array into messages that go through pipeline matching again.

Each element becomes a new ``application/json`` message from the same device on the same
path, with its own id. A payload that is not a JSON array is a (permanent) failure.
"""

from __future__ import annotations

import uuid

from destinations.base import read_json
from destinations.registry import register
from pipelines.components import ComponentError, DeliveryError, Destination
from pipelines.ingest import Overloaded
from pipelines.message import JSON_TYPE, Message, dumps


@register
class Batch(Destination):
    type = "batch"
    version = "1.0.0"
    summary = "Each element of a JSON array re-enters pipeline matching as its own message."
    accepts = ("json",)

    async def deliver(self, message: Message) -> None:
        items = read_json(self, message)
        if not isinstance(items, list):
            raise ComponentError(f"batch takes a JSON array, got {type(items).__name__}")
        if self.context.reinject is None:
            raise ComponentError("no re-entry into pipeline matching in this context")
        for i, item in enumerate(items):
            # ids derive from the parent, and each child is stored under a dedup key: a batch
            # retried after a partial failure never ingests a child twice, routed or not
            child_id = str(uuid.uuid5(uuid.UUID(message.id) if _is_uuid(message.id) else uuid.NAMESPACE_URL,
                                      f"{message.id}/{i}"))
            child = Message(
                id=child_id, project_id=message.project_id, device_id=message.device_id,
                path=message.path, content_type=JSON_TYPE, timestamp=message.timestamp,
                payload=dumps(item), metadata={**message.metadata, "batch_parent": message.id})
            try:
                await self.context.reinject(child, dedup_key=f"batch:{child_id}")
            except Overloaded as exc:
                raise DeliveryError(f"router is full: {exc}", retryable=True,
                                    retry_after=exc.retry_after) from None


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
