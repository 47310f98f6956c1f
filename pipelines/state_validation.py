"""What a device state document may hold: checked before every write, repaired on every read.

Usage::

    value = parse_state_json(payload)          # raises StateRejected(reason) -> 4.00 with reason
    value = parse_state_cbor(payload)          # CBOR, mapped to JSON's types (see below)
    check_state_value(value, depth=2)          # any value about to be stored under a 2-deep path
    safe = readable_state(stored)              # what a GET serves: always encodable JSON

The rule: a state document is JSON (RFC 8259) that any JSON parser can read back:

* strings are Unicode text without lone surrogates (``"\\ud800"`` is refused);
* numbers are finite: ``NaN``, ``Infinity`` and ``1e400`` (which overflows a double) are
  refused; integers fit in 64 bits (-2**63 .. 2**64-1);
* nesting (the path's segments plus the value's own levels) is at most ``MAX_DEPTH``.

CBOR (Content-Format 60) is mapped to JSON's types: maps with text keys -> objects, arrays ->
arrays, text, integers, finite floats, true/false/null as themselves; **tag 0/1 date-times become
RFC 3339 strings** (``"2026-12-04T15:00:00Z"``). Everything JSON cannot hold is **refused** with
a reason naming where it is: byte strings, ``undefined``, simple values, non-text map keys, sets
and other tags (bignums outside 64 bits, decimal fractions, UUIDs, ...). A device that needs
bytes sends them as text (base64, hex).

Reads never fail: a document stored before these checks (a lone surrogate, ``NaN``) is served
with lone surrogates as U+FFFD and non-finite numbers as ``null`` (``readable_state``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import cbor2

from pipelines.json_limits import MAX_JSON_DEPTH

MAX_DEPTH = MAX_JSON_DEPTH  # one nesting limit for every JSON the router takes in
_MIN_INT, _MAX_INT = -(2 ** 63), 2 ** 64 - 1


class StateRejected(ValueError):
    """The value cannot be stored as a state document; the message says why and where."""


def _where(trail: list[str]) -> str:
    return "/" + "/".join(trail) if trail else "the top level"


def _has_lone_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check(value: Any, depth: int, trail: list[str], convert: bool) -> Any:
    """The value as JSON types (converted from CBOR's where ``convert``), or StateRejected."""
    if value is None or value is True or value is False:
        return value
    t = type(value)
    if t is str:
        if not value.isascii() and _has_lone_surrogate(value):
            raise StateRejected(f"text at {_where(trail)} holds a lone UTF-16 surrogate: not Unicode text")
        return value
    if t is int:
        if not _MIN_INT <= value <= _MAX_INT:
            raise StateRejected(f"integer at {_where(trail)} does not fit in 64 bits")
        return value
    if t is float:
        if not math.isfinite(value):
            raise StateRejected(f"number at {_where(trail)} is {value!r}: JSON numbers are finite "
                                "(NaN, Infinity and overflowing values like 1e400 are refused)")
        return value
    if t is dict or t is list:
        if depth >= MAX_DEPTH:
            raise StateRejected(f"nested too deeply: more than {MAX_DEPTH} levels (path segments included) "
                                f"at {_where(trail)}")
        if t is list:
            return [_check(v, depth + 1, [*trail, str(i)], convert) for i, v in enumerate(value)]
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise StateRejected(f"map key {_describe(k)} at {_where(trail)} is not text: "
                                    "JSON object keys are strings")
            if not k.isascii() and _has_lone_surrogate(k):
                raise StateRejected(f"key at {_where(trail)} holds a lone UTF-16 surrogate")
            out[k] = _check(v, depth + 1, [*trail, k], convert)
        return out
    if convert and isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    raise StateRejected(f"{_describe(value)} at {_where(trail)} has no JSON form: state documents "
                        "hold JSON values only (send bytes as base64 or hex text)")


def _describe(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "a CBOR byte string"
    if value is cbor2.undefined:
        return "CBOR undefined"
    if isinstance(value, cbor2.CBORSimpleValue):
        return f"CBOR simple value {value.value}"
    if isinstance(value, set | frozenset):
        return "a CBOR set (tag 258)"
    if isinstance(value, cbor2.CBORTag):
        return f"CBOR tag {value.tag}"
    if isinstance(value, int | float | str):
        return repr(value)[:40]
    return f"a value of CBOR type {type(value).__name__}"


def check_state_value(value: Any, depth: int = 0) -> Any:
    """Check a JSON-typed value to be stored ``depth`` levels down; returns it, or StateRejected."""
    return _check(value, depth, [], convert=False)


def _refuse_constant(name: str) -> Any:
    raise StateRejected(f"{name} is not JSON: JSON numbers are finite")


def parse_state_json(payload: bytes, depth: int = 0) -> Any:
    """JSON text -> a checked value (``depth``: levels of the path it goes under)."""
    try:
        value = json.loads(payload, parse_constant=_refuse_constant)
    except StateRejected:
        raise
    except RecursionError:
        raise StateRejected(f"nested too deeply: more than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateRejected(f"payload is not valid JSON: {exc}") from None
    return _check(value, depth, [], convert=False)


def parse_state_cbor(payload: bytes, depth: int = 0) -> Any:
    """CBOR -> a checked value in JSON's types (date-times as RFC 3339 text)."""
    try:
        value = cbor2.loads(payload)
    except RecursionError:
        raise StateRejected(f"nested too deeply: more than {MAX_DEPTH} levels") from None
    except Exception as exc:  # cbor2 raises several types for bad input
        raise StateRejected(f"payload is not valid CBOR: {exc}") from None
    return _check(value, depth, [], convert=True)


def _repair(value: Any, depth: int) -> Any:
    t = type(value)
    if t is str:
        if not _has_lone_surrogate(value):
            return value
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if t is float:
        return value if math.isfinite(value) else None
    if t is list:
        return [_repair(v, depth + 1) for v in value] if depth < 4 * MAX_DEPTH else None
    if t is dict:
        if depth >= 4 * MAX_DEPTH:
            return None
        return {_repair(str(k), depth): _repair(v, depth + 1) for k, v in value.items()}
    return value


def readable_state(value: Any) -> Any:
    """``value`` as it can always be served: JSON-encodable, UTF-8-encodable, finite. Documents
    written through the checks come back unchanged (a fast check first)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        return value
    except (ValueError, UnicodeEncodeError, RecursionError, TypeError):
        return _repair(value, 0)
