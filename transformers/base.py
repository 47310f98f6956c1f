"""Small helpers every built-in transformer shares (not a transformer itself).

Usage inside a transformer::

    from transformers.base import require_content_type, read_json

    async def transform(self, message):
        doc = read_json(self, message)      # checks the content type, parses once, wraps errors
        ...

``require_content_type`` enforces the class's ``accepts`` tuple ("json" stands for any JSON
type, anything else is a MIME type compared without parameters) and raises a
``TransformError`` naming the expected and the actual type.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pipelines.components import Component, TransformError
from pipelines.message import Message, NotJSONError, is_json_type


def base_type(content_type: str) -> str:
    """``"Application/JSON; charset=utf-8"`` → ``"application/json"``."""
    return content_type.split(";", 1)[0].strip().lower()


def _accepted(wanted: str, content_type: str) -> bool:
    if wanted == "json":
        return is_json_type(content_type)
    return base_type(content_type) == wanted


@lru_cache(maxsize=1024)
def _accepts(accepts: tuple[str, ...], content_type: str) -> bool:
    return any(_accepted(w, content_type) for w in accepts)


def require_content_type(component: Component, message: Message) -> None:
    """Raise ``TransformError`` unless the message's content type is one ``component`` accepts."""
    accepts = type(component).accepts
    if accepts is None or _accepts(accepts, message.content_type):
        return
    expected = " or ".join("application/json" if w == "json" else w for w in accepts)
    raise TransformError(
        f"{component.type} expects {expected} input, got {message.content_type or '(none)'!r}"
        + (" (add a change-content-type or cbor-to-json step before it)" if "json" in accepts else "")
    )


def read_json(component: Component, message: Message) -> Any:
    """The message's JSON value, after the content-type check; bad JSON is a ``TransformError``."""
    require_content_type(component, message)
    try:
        return message.json()
    except NotJSONError as exc:
        raise TransformError(f"{component.type}: {exc}") from None

