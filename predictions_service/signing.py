"""Standard Webhooks signing, as Replicate signs its webhooks (the service's side: it only signs).

    headers = signed_headers(secret="whsec_...", msg_id="msg_...", timestamp=1614265330, body=b"...")
    # {"webhook-id": ..., "webhook-timestamp": "1614265330", "webhook-signature": "v1,<base64>"}

The key is the base64-decoded part after ``whsec_`` (not its ASCII text); the signed content is
``f"{id}.{timestamp}.{body}"``. Receivers verify with ``pipelines.webhook_signature.verify``; this
module is a separate copy because the service never imports the router.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def start_signature(secret: str, msg_id: str, timestamp: int) -> hmac.HMAC:
    """A signature to feed the body to (``update``), in as many pieces as it comes in."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)


def finish_signature(mac: hmac.HMAC) -> str:
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = start_signature(secret, msg_id, timestamp)
    mac.update(body)  # not concatenated: the body of a frame's prediction is ~56 KB
    return finish_signature(mac)


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes,
                   precomputed: str | None = None) -> dict[str, str]:
    """The three headers; ``precomputed``: the signature, already made for this id, time and body."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": precomputed or signature(secret, msg_id, timestamp, body),
    }
