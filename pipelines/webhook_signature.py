"""Standard Webhooks signatures (the scheme Replicate signs its webhooks with): verify and sign.

    from pipelines.webhook_signature import verify, sign, WebhookSignatureError
    try:
        verify(secret, request_headers, raw_body)          # None when valid
    except WebhookSignatureError as exc:
        return 401, str(exc)                               # the message never contains the secret

    headers = sign(secret, msg_id, timestamp, body)   # webhook-id, webhook-timestamp, webhook-signature

Scheme: ``key = base64decode(secret without "whsec_")`` (the decoded bytes, never the base64 text);
``signed = f"{webhook-id}.{webhook-timestamp}.{raw body}"``; the ``webhook-signature`` header holds
space-separated ``v1,<base64 HMAC-SHA256>`` entries, any of which may match (key rotation). The
timestamp must be within ``tolerance`` seconds of now (replay protection).

Errors::

    WebhookSignatureError          base class (alias WebhookVerificationError), message safe to log
    ├── MissingHeaderError         webhook-id / webhook-timestamp / webhook-signature absent
    ├── InvalidSecretError         the secret is not whsec_<base64>
    ├── TimestampError             not an integer, or too far from now
    └── SignatureMismatchError     no v1 entry matches

Pure functions, no router imports: the receiving HTTP route calls ``verify``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = [
    "InvalidSecretError",
    "MissingHeaderError",
    "SignatureMismatchError",
    "TimestampError",
    "WebhookSignatureError",
    "WebhookVerificationError",
    "check_headers",
    "sign",
    "signature",
    "verify",
]

DEFAULT_TOLERANCE = 300


class WebhookSignatureError(Exception):
    """The webhook is not authentic (or cannot be checked). Messages never include the secret."""


WebhookVerificationError = WebhookSignatureError  # the name replicate-python uses for its base class


class MissingHeaderError(WebhookSignatureError):
    pass


class InvalidSecretError(WebhookSignatureError):
    pass


class TimestampError(WebhookSignatureError):
    pass


class SignatureMismatchError(WebhookSignatureError):
    pass


def _key(secret: str) -> bytes:
    if not isinstance(secret, str) or not secret:
        raise InvalidSecretError("webhook secret is empty")
    raw = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidSecretError("webhook secret is not whsec_ followed by base64") from exc
    if not key:
        raise InvalidSecretError("webhook secret decodes to an empty key")
    return key


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else bytes(body)


def signature(secret: str, msg_id: str, timestamp: int | str, body: bytes | str) -> str:
    """The ``v1,<base64>`` entry for one message."""
    signed = f"{msg_id}.{timestamp}.".encode() + _as_bytes(body)
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def sign(secret: str, msg_id: str, timestamp: int | None = None, body: bytes | str = b"") -> dict[str, str]:
    """Headers for a signed webhook (``timestamp`` defaults to now)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature(secret, msg_id, ts, body),
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:  # plain dicts are case-sensitive; HTTP header names are not
        lowered = {k.lower(): v for k, v in headers.items()}
        value = lowered.get(name)
    if not value:
        raise MissingHeaderError(f"missing {name} header")
    return value


def check_headers(headers: Mapping[str, str], now: float | None = None,
                  tolerance: int = DEFAULT_TOLERANCE) -> None:
    """What can be checked before the body arrives: the three headers are there and the
    timestamp is fresh. Raises a WebhookSignatureError like ``verify``."""
    _fresh_headers(headers, now, tolerance)


def _fresh_headers(headers: Mapping[str, str], now: float | None, tolerance: int) -> tuple[str, str, str]:
    """``check_headers``, giving the id, timestamp and signature headers' text."""
    msg_id = _header(headers, "webhook-id")
    ts_text = _header(headers, "webhook-timestamp")
    sig_header = _header(headers, "webhook-signature")
    try:
        ts = int(ts_text)
    except ValueError as exc:
        raise TimestampError("webhook-timestamp is not an integer number of seconds") from exc
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        raise TimestampError(f"webhook-timestamp is {int(current - ts)} s away from now (tolerance {tolerance} s)")
    return msg_id, ts_text, sig_header


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    now: float | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
) -> None:
    """Return None if the webhook is authentic and fresh; raise a WebhookSignatureError otherwise."""
    key = _key(secret)
    msg_id, ts_text, sig_header = _fresh_headers(headers, now, tolerance)
    signed = f"{msg_id}.{ts_text}.".encode() + _as_bytes(body)
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    for entry in sig_header.split(" "):
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(expected, value.encode()):
            return None
    raise SignatureMismatchError("no webhook-signature entry matches (wrong secret, or the body was altered)")
