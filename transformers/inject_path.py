"""``inject-path``: nest the JSON payload under the message path's segments.

Path ``/sensor0/temp`` and payload ``{"celsius": 32}`` give
``{"sensor0": {"temp": {"celsius": 32}}}``; the path itself is unchanged. Empty segments
(``//``, a trailing ``/``) are skipped; the root path leaves the payload as it is.
"""

from __future__ import annotations

from pipelines.components import Transformer
from pipelines.message import Message
from transformers.base import read_json
from transformers.registry import register


@register
class InjectPath(Transformer):
    deterministic = True
    type = "inject-path"
    version = "1.0.0"
    summary = "Nest the JSON payload under the message path, one object level per segment."
    accepts = ("json",)

    def transform_sync(self, message: Message) -> Message:
        doc = read_json(self, message)
        for segment in reversed([s for s in message.path.split("/") if s]):
            doc = {segment: doc}
        return message.evolve(json=doc)
