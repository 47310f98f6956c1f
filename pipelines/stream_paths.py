"""What a stream or state path may hold, and how it is written where only ASCII may go.

Usage::

    problem = path_problem(["sensors", "café"])   # None: accepted
    path_problem(["a\\x00b"])                       # "path segment 1 holds U+0000 (a control ..."
    ce_header_value("io.golioth.data.v1/.s/café")  # 'io.golioth.data.v1/.s/caf%C3%A9'

The rule (README "Devices", ``docs``): a path is 1 to ``MAX_PATH_SEGMENTS`` segments, at most
``MAX_PATH_BYTES`` bytes of UTF-8 with its slashes; a segment is not empty, not ``.`` or ``..``,
and holds letters, marks, digits, punctuation and symbols of Unicode (general categories L, M, N,
P, S), except ``/`` (the separator) and ``+`` and ``#`` (MQTT wildcards: a path is part of MQTT
topics). Refused: control characters (NUL, CR, LF, ...), spaces and other separators, format
characters, private-use and unassigned code points. Non-ASCII letters (``café``, ``温度``) and
symbols (emoji) are accepted: every accepted path can be delivered, because wherever it goes
into an HTTP header or a URL it is percent-encoded as UTF-8 (``ce_header_value``, the CloudEvents
HTTP binding's rule), into JSON as itself, into an MQTT topic as UTF-8.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

MAX_PATH_BYTES = 256
MAX_PATH_SEGMENTS = 32
_ALLOWED_CATEGORIES = frozenset("LMNPS")
_FORBIDDEN = frozenset("/+#")


def _char_problem(ch: str) -> str | None:
    if ch in _FORBIDDEN:
        return f"'{ch}' (reserved: '/' separates segments, '+' and '#' are MQTT wildcards)"
    if ch.isascii():
        if ch.isprintable() and ch != " ":
            return None
        return f"U+{ord(ch):04X} (control characters and spaces are not allowed)"
    cat = unicodedata.category(ch)
    if cat[0] in _ALLOWED_CATEGORIES and cat != "Co":
        return None
    kind = {"C": "a control, format, private-use or unassigned character",
            "Z": "a space or separator"}.get(cat[0], "not allowed")
    return f"U+{ord(ch):04X} ({kind})"


def path_problem(segments: Sequence[str]) -> str | None:
    """Why a path made of ``segments`` may not be used, or None when it may."""
    if len(segments) > MAX_PATH_SEGMENTS:
        return f"path has {len(segments)} segments, more than {MAX_PATH_SEGMENTS}"
    size = sum(len(s.encode("utf-8", "surrogatepass")) + 1 for s in segments)
    if size > MAX_PATH_BYTES:
        return f"path is {size} bytes of UTF-8, more than {MAX_PATH_BYTES}"
    for i, seg in enumerate(segments, 1):
        if seg in ("", ".", ".."):
            return f"path segment {i} is {seg!r}: segments must be non-empty and not '.' or '..'"
        if seg.isascii() and seg.isprintable() and " " not in seg and "+" not in seg and "#" not in seg \
                and "/" not in seg:
            continue  # the common case, checked in one go
        for ch in seg:
            why = _char_problem(ch)
            if why is not None:
                return f"path segment {i} holds {why}"
    return None


# CloudEvents HTTP binding, 3.1.3.2: outside U+0021..U+007E, and space, '"' and '%', are
# percent-encoded (UTF-8) in header values.
_HEADER_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "%"}
_HEADER_PLAIN = re.compile(r"[\x21\x23\x24\x26-\x7e]*").fullmatch  # only _HEADER_SAFE characters


def ce_header_value(value: str) -> str:
    """``value`` as a CloudEvents ``ce-*`` HTTP header value: ASCII, percent-encoded where needed.
    Printable ASCII other than ``"`` and ``%`` is left as it is (so ordinary values are unchanged);
    anything else, lone surrogates included, is encoded as UTF-8 bytes ``%XX``."""
    if _HEADER_PLAIN(value) is not None:  # the common case, one C call
        return value
    out = []
    for ch in value:
        if ch in _HEADER_SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)
