"""``base64``: encode the payload (→ ``text/plain``) or, with ``decode: true``, decode it
(→ ``application/octet-stream``). Standard alphabet, padded. Surrounding whitespace is
ignored when decoding; anything else outside the alphabet is a failure.
"""

from __future__ import annotations

import base64
import binascii

from pydantic import BaseModel, ConfigDict, Field

from pipelines.components import Transformer, TransformError
from pipelines.message import Message
from transformers.registry import register


@register
class Base64(Transformer):
    deterministic = True
    type = "base64"
    version = "1.0.0"
    summary = "Base64-encode the payload (text/plain), or decode it (application/octet-stream)."

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        decode: bool = Field(default=False, strict=True,
                             description="Decode instead of encode.", examples=[False, True])

    def transform_sync(self, message: Message) -> Message:
        if not self.params.decode:
            return message.evolve(payload=base64.b64encode(message.payload), content_type="text/plain",
                                  json_safe_text=True)
        try:
            raw = base64.b64decode(message.payload.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TransformError(f"base64: payload is not valid padded standard base64 ({exc})") from None
        return message.evolve(payload=raw, content_type="application/octet-stream")
