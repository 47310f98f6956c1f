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


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)  # not concatenated: the body of a frame's prediction is ~56 KB
    return "v1," + base64.b64encode(mac.digest()).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, msg_id, timestamp, body),
    }
