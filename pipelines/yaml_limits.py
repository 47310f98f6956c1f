"""YAML that cannot blow up: the alias-expansion cap of the pipeline loader, for every YAML file.

Usage::

    from pipelines.yaml_limits import safe_load_bounded, YamlLimitError
    try:
        doc = safe_load_bounded(path.read_text(), str(path))           # like yaml.safe_load
        doc = safe_load_bounded(text, str(path), Loader=MyLoader)      # a SafeLoader subclass
    except YamlLimitError as exc:        # a ValueError: "FILE:LINE:COL: ..." (never the values)
        ...

A few hundred bytes of aliases (``&a [*b, *b, ...]``) can stand for billions of nodes: a
loader would build that tree, and an error message that prints a value would print all of
it. The document is composed first (aliases stay shared, nothing is expanded), its expanded
size measured with the pipeline loader's own counter (``pipelines.config``, limit
``MAX_EXPANDED_NODES``), and only a document under the limit is constructed. Nesting too deep
for the parser (a ``RecursionError``) is refused the same way. Errors say where (file, line,
column) and never quote the content.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipelines.config import MAX_EXPANDED_NODES, _expanded_size

__all__ = ["MAX_EXPANDED_NODES", "YamlLimitError", "check_expansion", "safe_load_bounded"]


class YamlLimitError(ValueError):
    """The YAML is too big once aliases are expanded, refers to itself, or nests too deep."""


def check_expansion(node: yaml.Node | None, source: str) -> None:
    """Raise ``YamlLimitError`` when ``node`` expands (through aliases) beyond the limit."""
    if node is None:
        return
    try:
        size = _expanded_size(node, {}, set())
    except RecursionError:
        size = None
    if size is None or size > MAX_EXPANDED_NODES:
        mark = node.start_mark
        raise YamlLimitError(f"{source}:{mark.line + 1}:{mark.column + 1}: the document refers to itself, "
                             f"nests too deep or expands to too many nodes through YAML aliases "
                             f"(limit {MAX_EXPANDED_NODES})")


def safe_load_bounded(text: str, source: str, Loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """``yaml.load(text, Loader)`` once the document is known to be small when expanded.
    YAML syntax errors propagate as ``yaml.YAMLError`` (they carry a position, not values)."""
    try:
        node = yaml.compose(text, Loader=Loader)
    except RecursionError:
        raise YamlLimitError(f"{source}:1:1: the document nests too deep") from None
    check_expansion(node, source)
    try:
        return yaml.load(text, Loader=Loader)
    except RecursionError:
        raise YamlLimitError(f"{source}:1:1: the document nests too deep") from None
