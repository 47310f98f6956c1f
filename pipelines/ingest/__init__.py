"""Ingest servers (CoAP, MQTT, HTTP) write to the router through ``IngestTarget`` only.

Usage from an ingest server::

    try:
        await target.accept(message)      # returns once the message is durably stored
    except Overloaded as exc:             # the router is full: tell the device to come back
        answer 5.03 with Max-Age = exc.retry_after

Device state (``/.d/...``) is read and written through the same object, and
``watch_state`` tells an observer when a pipeline (``lightdb-state``) changed a document.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pipelines.message import Message


class Overloaded(Exception):
    """The router cannot take more now (queue or store full). Retry after ``retry_after`` s."""

    def __init__(self, reason: str, retry_after: float = 5.0) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class IngestTarget(Protocol):
    async def accept(self, message: Message) -> None:
        """Store the message durably in the inbox; raise ``Overloaded`` when full."""

    async def get_state(self, project_id: str, device_id: str, path: str = "/") -> Any:
        """The device's state document, or the part of it at ``path`` (None if absent)."""

    async def set_state(self, project_id: str, device_id: str, path: str, value: Any,
                        merge: bool = False) -> None:
        """Replace (or, with ``merge``, deep-merge into) the state at ``path``."""

    async def delete_state(self, project_id: str, device_id: str, path: str) -> None:
        """Remove the state at ``path`` (``/`` clears the document)."""

    def watch_state(self, project_id: str, device_id: str,
                    callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` (on the event loop) whenever the device's document changes;
        returns a function that stops watching."""
