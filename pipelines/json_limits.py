"""JSON with bounded nesting: one helper, one clear error, wherever outside JSON comes in.

Usage::

    from pipelines.json_limits import loads_bounded, check_depth, JSONTooDeep, MAX_JSON_DEPTH
    doc = loads_bounded(payload)        # json.loads, then ValueError/JSONTooDeep if too deep
    check_depth(value)                  # for values parsed elsewhere (CBOR, ...)

Python's JSON parser accepts a few hundred levels of ``[[[[...`` and everything recursive that
touches the result afterwards (merging state, copying, serialising) then fails with a
``RecursionError`` far from the input: a device's payload would pass for an internal error.
Documents deeper than ``MAX_JSON_DEPTH`` (64, ample for device data) are refused where they
come in, with ``JSONTooDeep``: "nested too deeply (more than 64 levels)". The check is one
``bytes.count`` when the text has fewer brackets than the limit, an iterative walk otherwise.
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_DEPTH = 64

__all__ = ["MAX_JSON_DEPTH", "JSONTooDeep", "check_depth", "loads_bounded"]


class JSONTooDeep(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"nested too deeply (more than {limit} levels)")
        self.limit = limit


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise ``JSONTooDeep`` when lists/objects in ``value`` nest deeper than ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > limit:
            raise JSONTooDeep(limit)
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list | tuple))


def loads_bounded(data: bytes | bytearray | str, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses documents nested deeper than ``limit`` (``JSONTooDeep``, a
    ``ValueError``); invalid JSON raises ``ValueError`` as ``json.loads`` does."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise JSONTooDeep(limit) from None
    text = data.encode() if isinstance(data, str) else data
    if text.count(b"[") + text.count(b"{") > limit:
        check_depth(value, limit)
    return value
