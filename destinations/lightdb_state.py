"""``lightdb-state``: merge a JSON payload into the device's state document.

The device reads and observes the document over CoAP at ``/.d/...`` (and over MQTT at
``<project>/<device>/state/...``): this is how results get back to a device.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from destinations.base import read_json
from destinations.registry import register
from pipelines.components import ComponentError, Destination
from pipelines.message import Message
from pipelines.state_validation import StateRejected, check_state_value


@register
class LightDBState(Destination):
    type = "lightdb-state"
    version = "1.0.0"
    summary = ("Merge the JSON payload into the device's state document under `path` "
               "(default: the message's stream path).")
    accepts = ("json",)

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str | None = Field(None, description="Where in the state document to merge the payload.",
                                 examples=["/result", "/latest/stream"])

    async def deliver(self, message: Message) -> None:
        value = read_json(self, message)
        if self.context.state is None:
            raise ComponentError("no device state store in this context")
        path = self.params.path or message.path
        try:  # what a device's own state write must pass too (pipelines.state_validation)
            value = check_state_value(value, depth=len([p for p in path.split("/") if p]))
        except StateRejected as exc:
            raise ComponentError(f"{self.type}: not stored: {exc}") from None
        await self.context.state.merge_state(message.project_id, message.device_id, path, value)
