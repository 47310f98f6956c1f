"""Device state documents: read, replace, merge and delete at a ``/a/b`` path.

Usage::

    doc = merge_at({}, "/result", {"output": "Caption: espresso (95%)"})
    get_at(doc, "/result/output")   # 'Caption: espresso (95%)'

Functions return a new document; the input is not modified. ``/`` (or ``""``) is the
whole document. Merging is deep for objects; anything else is replaced.

A whole document is capped (``MAX_STATE_BYTES`` of JSON by default, ``RouterSettings.max_state_bytes``):
a write that would make it bigger raises ``StateTooLarge`` and changes nothing (CoAP answers
4.13, a lightdb-state delivery dead-letters with that error).
"""

from __future__ import annotations

import copy
from typing import Any

MAX_STATE_BYTES = 1 << 20


class StateTooLarge(ValueError):
    """The document would be over its size cap after this write; nothing was written."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"device state document would be {size} bytes, over the {limit}-byte cap")
        self.size = size
        self.limit = limit


def split(path: str) -> list[str]:
    return [p for p in path.strip("/").split("/") if p]


def get_at(doc: Any, path: str) -> Any:
    node = doc
    for part in split(path):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def deep_merge(base: Any, value: Any) -> Any:
    if isinstance(base, dict) and isinstance(value, dict):
        out = dict(base)
        for k, v in value.items():
            out[k] = deep_merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(value)


def _put(doc: Any, path: str, fn: Any) -> Any:
    parts = split(path)
    if not parts:
        return fn(doc)
    root = dict(doc) if isinstance(doc, dict) else {}
    node = root
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, dict) else {}
        node[part] = child
        node = child
    node[parts[-1]] = fn(node.get(parts[-1]))
    return root


def set_at(doc: Any, path: str, value: Any) -> Any:
    return _put(doc, path, lambda _old: copy.deepcopy(value))


def merge_at(doc: Any, path: str, value: Any) -> Any:
    return _put(doc, path, lambda old: deep_merge(old, value) if old is not None else copy.deepcopy(value))


def delete_at(doc: Any, path: str) -> Any:
    parts = split(path)
    if not parts:
        return {}
    if not isinstance(doc, dict):
        return doc
    root = dict(doc)
    node = root
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            return root
        child = dict(child)
        node[part] = child
        node = child
    node.pop(parts[-1], None)
    return root
