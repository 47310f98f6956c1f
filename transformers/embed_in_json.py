"""``embed-in-json``: ``{"<key>": "<payload as a UTF-8 string>"}``, output ``application/json``.

Binary payloads must be made text first (``base64`` or ``data-url``): bytes that are not
valid UTF-8 are a failure, never silently replaced.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipelines.components import Transformer, TransformError
from pipelines.message import Message
from transformers.registry import register


@register
class EmbedInJson(Transformer):
    deterministic = True
    type = "embed-in-json"
    version = "1.0.0"
    summary = "Wrap the payload, read as UTF-8 text, in a JSON object under the given key."

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        key: str = Field(description="The key the payload text is stored under.",
                         examples=["image", "text"], min_length=1)

    def transform_sync(self, message: Message) -> Message:
        try:
            text = message.payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TransformError(
                f"embed-in-json: payload is not valid UTF-8 (byte {exc.start}); encode binary "
                "data with a base64 or data-url step first"
            ) from None
        # a data URL or base64 text needs no JSON escaping: let the serialiser copy it
        if message.json_safe_text:  # ASCII: the payload is the string's encoding, reused as is
            return message.evolve(json={self.params.key: text}, safe_strings=(text,),
                                  safe_encoded=(message.payload,))
        return message.evolve(json={self.params.key: text}, safe_strings=())
