"""``data-url``: the payload as an RFC 2397 data URL, ``data:<content type>;base64,<base64>``.

Output content type is ``text/plain``. Typical use: ``change-content-type`` (image/png) →
``data-url`` → ``embed-in-json`` → ``json-patch`` to build an inference API request body.
"""

from __future__ import annotations

import base64

from pipelines.components import Transformer
from pipelines.message import Message
from transformers.registry import register


def data_url(content_type: str, payload: bytes) -> str:
    """``data:image/png;base64,iVBOR...``; MIME parameters are kept, spaces around ``;`` dropped."""
    media = ";".join(part.strip() for part in content_type.split(";") if part.strip())
    return f"data:{media};base64,{base64.b64encode(payload).decode('ascii')}"


@register
class DataUrl(Transformer):
    type = "data-url"
    version = "1.0.0"
    summary = "Encode the payload as a data URL (data:<content type>;base64,...), output text/plain."

    async def transform(self, message: Message) -> Message:
        text = data_url(message.content_type, message.payload)
        return message.evolve(payload=text.encode("ascii"), content_type="text/plain")
