"""Prediction ids and timestamps in Replicate's formats.

``new_prediction_id()`` gives 26 characters of lowercase Crockford base32 (``[0-9a-z]`` without
i, l, o, u), like Replicate's; ``rfc3339(t)`` gives ``2026-11-23T01:06:22.123456Z``.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_prediction_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(26))


def new_message_id() -> str:
    return "msg_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def rfc3339(unix_seconds: float | None) -> str | None:
    if unix_seconds is None:
        return None
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
