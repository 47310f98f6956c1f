"""Small helpers the built-in destinations share (not a destination itself).

Usage inside a destination that takes JSON::

    from destinations.base import read_json

    async def deliver(self, message):
        doc = read_json(self, message)   # checks the content type, parses once, ComponentError otherwise
"""

from __future__ import annotations

from typing import Any

from pipelines.components import ComponentError, Destination
from pipelines.message import Message, NotJSONError, is_json_type


def read_json(destination: Destination, message: Message) -> Any:
    """The payload as JSON, for a destination that takes ``application/json``. A wrong
    content type or a payload that is not JSON is a permanent failure (dead letter)."""
    if not is_json_type(message.content_type):
        raise ComponentError(f"{destination.type} takes application/json, got {message.content_type}")
    try:
        return message.json()
    except NotJSONError as exc:
        raise ComponentError(f"{destination.type}: {exc}") from None
