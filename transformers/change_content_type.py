"""``change-content-type``: relabel the message; the payload bytes are untouched.

Pipeline step::

    transformer: {type: change-content-type, version: v1, parameters: {content_type: image/png}}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.components import Transformer
from pipelines.message import Message
from transformers.registry import register


@register
class ChangeContentType(Transformer):
    deterministic = True
    type = "change-content-type"
    version = "1.0.0"
    summary = "Relabel the message with another content type; the payload is untouched."

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        content_type: str = Field(
            description="The new MIME type of the message.",
            examples=["image/png", "application/json"],
        )

        @field_validator("content_type")
        @classmethod
        def _not_blank(cls, value: str) -> str:
            value = value.strip()
            if "/" not in value:
                raise ValueError("content_type must be a MIME type such as image/png")
            return value

    def transform_sync(self, message: Message) -> Message:
        return message.evolve(content_type=self.params.content_type)
