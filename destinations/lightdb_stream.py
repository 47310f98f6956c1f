"""``lightdb-stream``: append the JSON payload to the local time-series store.

Query it with ``pipeline stream`` or ``GET /v1/stream`` on the router's HTTP face.
"""

from __future__ import annotations

from destinations.registry import register
from pipelines.components import ComponentError, Destination
from pipelines.message import Message, NotJSONError, is_json_type


@register
class LightDBStream(Destination):
    type = "lightdb-stream"
    version = "1.0.0"
    summary = "Append `{time, device, path, data}` to the local stream store."
    accepts = ("json",)

    async def deliver(self, message: Message) -> None:
        if not is_json_type(message.content_type):
            raise ComponentError(f"lightdb-stream takes application/json, got {message.content_type}")
        try:
            data = message.json()
        except NotJSONError as exc:
            raise ComponentError(str(exc)) from None
        if self.context.stream is None:
            raise ComponentError("no stream store in this context")
        await self.context.stream.append_stream(message.project_id, message.device_id, message.path,
                                                message.timestamp.timestamp(), data)
