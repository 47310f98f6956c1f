"""Which messages a pipeline takes: its ``filter`` (spec §3).

Usage::

    f = FilterConfig(path="/temp/*", content_type="application/json")
    f.matches("/temp/x", "application/json")   # True
    f.matches("/temp", "application/json")     # False: "/temp/*" means "starts with /temp/"
    FilterConfig(path="/images/").matches("/images", "image/png")   # True: slashes stripped

Rules:

- ``path`` missing (None) or ``"*"`` matches every path.
- A ``*`` as the last character (and nowhere else) means "starts with what precedes it",
  compared raw, with no slash stripping.
- Otherwise trailing slashes are stripped from both sides and the match is exact.
- ``content_type`` missing matches anything; otherwise the match is exact (no wildcards).

A ``*`` anywhere else makes ``FilterConfig`` raise ``ValueError`` (the loader reports it
with the file position). The matching mode is worked out once, so ``matches`` is a
couple of string operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FilterConfig", "check_path_pattern"]

_ANY, _PREFIX, _EXACT = 0, 1, 2


def check_path_pattern(path: str) -> str | None:
    """Why ``path`` is not a valid filter path, or None if it is."""
    if "*" in path[:-1]:
        return (f"filter path {path!r}: '*' may only be the last character "
                f"(it means 'starts with what precedes it')")
    return None


@dataclass(frozen=True)
class FilterConfig:
    path: str | None = None
    content_type: str | None = None
    _mode: int = field(init=False, repr=False, compare=False, default=_ANY)
    _key: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        if self.path is None or self.path == "*":
            mode, key = _ANY, ""
        else:
            problem = check_path_pattern(self.path)
            if problem:
                raise ValueError(problem)
            if self.path.endswith("*"):
                mode, key = _PREFIX, self.path[:-1]
            else:
                mode, key = _EXACT, self.path.rstrip("/")
        # frozen dataclass: precomputed fields are set once, here
        object.__setattr__(self, "_mode", mode)
        object.__setattr__(self, "_key", key)

    def matches(self, path: str, content_type: str) -> bool:
        if self.content_type is not None and content_type != self.content_type:
            return False
        mode = self._mode
        if mode == _ANY:
            return True
        if mode == _PREFIX:
            return path.startswith(self._key)
        return path.rstrip("/") == self._key

    def describe(self) -> str:
        """For listings: ``path=/images content_type=image/png`` or ``everything``."""
        parts = []
        if self.path is not None:
            parts.append(f"path={self.path}")
        if self.content_type is not None:
            parts.append(f"content_type={self.content_type}")
        return " ".join(parts) or "everything"
