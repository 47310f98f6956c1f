"""Prediction ids and timestamps in Replicate's formats.

``new_prediction_id()`` gives 26 characters of lowercase Crockford base32 (``[0-9a-z]`` without
i, l, o, u), like Replicate's; ``rfc3339(t)`` gives ``2026-11-23T01:06:22.123456Z``.
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
# base32 of os.urandom, mapped onto the alphabet: 15x cheaper than 26 calls of secrets.choice,
# and as random (each base32 digit is 5 uniform bits from the OS's CSPRNG).
_TO_ALPHABET = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def _random_chars(n: int) -> str:
    return base64.b32encode(os.urandom((n * 5 + 7) // 8))[:n].translate(_TO_ALPHABET).decode()


def new_prediction_id() -> str:
    return _random_chars(26)


def new_message_id() -> str:
    return "msg_" + _random_chars(24)


def rfc3339(unix_seconds: float | None) -> str | None:
    if unix_seconds is None:
        return None
    # isoformat, not strftime("...%fZ"): the same text, without the C library's strftime
    return datetime.fromtimestamp(unix_seconds, UTC).isoformat(timespec="microseconds")[:-6] + "Z"
