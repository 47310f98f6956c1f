"""``lightdb-stream``: append the JSON payload to the local time-series store.

Query it with ``pipeline stream`` or ``GET /v1/stream`` on the router's HTTP face.
"""

from __future__ import annotations

from destinations.base import read_json
from destinations.registry import register
from pipelines.components import ComponentError, Destination
from pipelines.message import Message


@register
class LightDBStream(Destination):
    type = "lightdb-stream"
    version = "1.0.0"
    summary = "Append `{time, device, path, data}` to the local stream store."
    accepts = ("json",)

    async def deliver(self, message: Message) -> None:
        data = read_json(self, message)
        if self.context.stream is None:
            raise ComponentError("no stream store in this context")
        await self.context.stream.append_stream(message.project_id, message.device_id, message.path,
                                                message.timestamp.timestamp(), data)
