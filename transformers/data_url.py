"""``data-url``: the payload as an RFC 2397 data URL, ``data:<content type>;base64,<base64>``.

Output content type is ``text/plain``. Typical use: ``change-content-type`` (image/png) →
``data-url`` → ``embed-in-json`` → ``json-patch`` to build an inference API request body.
"""

from __future__ import annotations

import base64
from functools import lru_cache

from pipelines.components import Transformer
from pipelines.message import Message, is_json_safe
from transformers.registry import register


def _media(content_type: str) -> str:
    return ";".join(part.strip() for part in content_type.split(";") if part.strip())


def data_url(content_type: str, payload: bytes) -> str:
    """``data:image/png;base64,iVBOR...``; MIME parameters are kept, spaces around ``;`` dropped."""
    return f"data:{_media(content_type)};base64,{base64.b64encode(payload).decode('ascii')}"


@lru_cache(maxsize=256)
def _prefix(content_type: str) -> tuple[bytes, bool]:
    """``data:<media>;base64,`` as bytes, and whether it is JSON-safe (per content type, cached)."""
    media = _media(content_type)
    return b"data:" + media.encode() + b";base64,", is_json_safe(media)


def data_url_bytes(content_type: str, payload: bytes) -> tuple[bytes, bool]:
    """The data URL as bytes (one copy of the base64), and whether it is JSON-safe text."""
    prefix, safe = _prefix(content_type)
    return prefix + base64.b64encode(payload), safe


@register
class DataUrl(Transformer):
    deterministic = True
    type = "data-url"
    version = "1.0.0"
    summary = "Encode the payload as a data URL (data:<content type>;base64,...), output text/plain."

    def transform_sync(self, message: Message) -> Message:
        url, safe = data_url_bytes(message.content_type, message.payload)
        return message.evolve(payload=url, content_type="text/plain", json_safe_text=safe)
