"""Prediction results back into the pipelines, and so back to the device.

Replicate-style predictions are asynchronous: the create call answers at once and the
result arrives later. This feature closes the loop without any templating by the user:

1. When a ``webhook`` step POSTs a JSON create body to a predictions endpoint
   (``/v1/predictions``, ``/v1/models/{o}/{n}/predictions``, ``/v1/deployments/{o}/{n}/predictions``)
   and the body names no ``webhook`` of its own, the router adds
   ``webhook: <callback_url>?c=<token>`` and ``webhook_events_filter: ["completed"]``.
   The token carries the frame's message id, project, device and path and an expiry
   (``token_ttl``, default 24 h), signed with a key derived from the webhook secret, so it
   cannot be forged nor used after it expires.
2. The create response's prediction id is recorded against the frame (``predictions`` table).
3. ``POST /v1/hooks/predictions`` checks the token and the signature headers' freshness before
   it reads the body (at most ``MAX_HOOK_BODY`` bytes, counted as they arrive), then verifies
   the Standard Webhooks signature (401 if bad or stale; there is always a secret: without
   ``webhook_secret`` the router makes one and keeps it in the store, see ``pipeline keys
   webhook-secret``). A token is bound to its prediction: when the router recorded which
   frame a prediction id belongs to, a token for another frame is refused. A terminal
   prediction becomes a new ``application/json`` message from the same device on
   ``<path>/result``::

       {"frame_id": ..., "prediction_id": ..., "status": "succeeded", "output": "Caption: ...",
        "error": null, "model": ..., "version": ..., "created_at": ..., "completed_at": ...,
        "predict_time": 0.012}

   The message id is derived from the router's own ids (the frame's message id and the
   prediction id), never from the caller's ``webhook-id``: one result per prediction, however
   often and under whatever ``webhook-id`` it is delivered.

Usage (what ``pipeline serve``/``pipeline run`` do)::

    results = PredictionResults(router, callback_url="http://127.0.0.1:8080/v1/hooks/predictions",
                                webhook_secret="whsec_...")
    results.install()                  # hooks into outbound webhook calls
    app = create_app(router, extra_routes=results.routes())
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipelines import webhook_signature
from pipelines.http_face import BodyTooLarge, read_body, too_large
from pipelines.ingest import Overloaded
from pipelines.json_limits import loads_bounded
from pipelines.message import JSON_TYPE, Message, NotJSONError, dumps, is_json_type

if TYPE_CHECKING:
    from pipelines.router import Router

log = logging.getLogger("pipelines.predictions")

PREDICTIONS_PATH = re.compile(
    r"^/v1/(predictions|models/[^/]+/[^/]+/predictions|deployments/[^/]+/[^/]+/predictions)/?$")
TERMINAL = {"succeeded", "failed", "canceled", "aborted"}
HOOK_PATH = "/v1/hooks/predictions"
# a completed prediction's webhook carries its input (a frame as a data URI, up to the
# predictions API's own body cap of 10 MB) and its output
MAX_HOOK_BODY = 16 << 20
TOKEN_TTL = 24 * 3600.0


def is_predictions_create(url: str) -> bool:
    return bool(PREDICTIONS_PATH.match(urlsplit(url).path))


class PredictionResults:
    def __init__(self, router: Router, *, callback_url: str, webhook_secret: str | None,
                 result_suffix: str = "/result", token_ttl: float = TOKEN_TTL) -> None:
        self.router = router
        self.callback_url = callback_url
        self.result_suffix = result_suffix
        self.token_ttl = token_ttl
        self.received = 0
        self.rejected = 0
        if not webhook_secret:
            webhook_secret = own_webhook_secret(router.settings.store_path)
        from pipelines.secrets import remember
        remember(webhook_secret)
        # tokens are signed with a key derived from the webhook secret, so they survive a restart
        self.webhook_secret: str = webhook_secret
        self._fallback_key = os.urandom(32)

    # -- tokens -------------------------------------------------------------------------

    def _key(self) -> bytes:
        if not self.webhook_secret:
            return self._fallback_key
        return token_key(self.webhook_secret)

    def make_token(self, message: Message, now: float | None = None) -> str:
        return callback_token(self._key(), message, self.token_ttl, now)

    def read_token(self, token: str, now: float | None = None) -> dict[str, str] | None:
        """What a token says, or None when it is forged, altered or expired."""
        if len(token) > 2048:
            return None
        try:
            b64body, b64mac = token.split(".", 1)
            body = base64.urlsafe_b64decode(b64body + "=" * (-len(b64body) % 4))
            mac = base64.urlsafe_b64decode(b64mac + "=" * (-len(b64mac) % 4))
        except (ValueError, TypeError):
            return None
        good = hmac.new(self._key(), body, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(good, mac):
            return None
        try:
            message_id, project_id, device_id, path, expires = json.loads(body)
        except (ValueError, TypeError):
            return None
        if not isinstance(expires, int) or (time.time() if now is None else now) > expires:
            return None
        return {"message_id": message_id, "project_id": project_id, "device_id": device_id, "path": path}

    # -- outbound hooks -----------------------------------------------------------------

    def install(self) -> None:
        self.router.add_http_hooks(request=self.add_callback, response=self.remember)

    def add_callback(self, message: Message, url: str) -> Message | None:
        if not is_predictions_create(url) or not is_json_type(message.content_type):
            return None
        callback = f"{self.callback_url}{'&' if '?' in self.callback_url else '?'}"
        callback += urlencode({"c": self.make_token(message)})
        payload = message.payload
        head = payload[:64].lstrip()
        if head.startswith(b"{") and b'"webhook' not in payload:
            # the common case, on the hot path: splice the two keys in after the opening brace
            # instead of parsing and re-serialising a body that carries a whole image
            rest = payload[payload.index(b"{") + 1:]
            keys = b'"webhook":' + dumps(callback) + b',"webhook_events_filter":["completed"]'
            spliced = b"{" + keys + (b"," if rest.lstrip()[:1] != b"}" else b"") + rest
            return message.evolve(payload=spliced)
        try:
            body = message.json()
        except NotJSONError:
            return None
        if not isinstance(body, dict) or "webhook" in body:
            return None  # the user chose their own callback: leave it alone
        new = dict(body)
        new["webhook"] = callback
        new["webhook_events_filter"] = ["completed"]
        return message.evolve(json=new, content_type=message.content_type)

    async def remember(self, message: Message, url: str, response: httpx.Response) -> None:
        if not is_predictions_create(url):
            return
        try:
            prediction = response.json()
        except ValueError:
            return
        if isinstance(prediction, dict) and isinstance(prediction.get("id"), str):
            await self.router.store.remember_prediction(prediction["id"], message)

    # -- inbound webhook ----------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [Route(HOOK_PATH, self.receive, methods=["POST"])]

    def _refuse(self, request: Request, detail: str) -> Response:
        self.rejected += 1
        limiter = _limiter(request)
        if limiter is not None and request.client is not None:  # wrong tokens count like wrong keys
            limiter.add(request.client.host, time.monotonic())
        log.warning("prediction webhook rejected: %s", detail)
        return JSONResponse({"title": "Unauthorized", "detail": detail, "status": 401},
                            status_code=401, media_type="application/problem+json")

    async def receive(self, request: Request) -> Response:
        # everything that can be checked without the body is checked before reading it
        limiter = _limiter(request)
        if limiter is not None and request.client is not None:
            wait = limiter.blocked_for(request.client.host, time.monotonic())
            if wait > 0:
                return JSONResponse({"title": "Too Many Requests", "status": 429,
                                     "detail": "too many refused callbacks from this address"},
                                    status_code=429, headers={"Retry-After": str(max(1, round(wait)))},
                                    media_type="application/problem+json")
        token = request.query_params.get("c")
        where_token = self.read_token(token) if token else None
        if token and where_token is None:
            return self._refuse(request, "the callback token is not valid or has expired")
        try:
            webhook_signature.check_headers(request.headers)
        except webhook_signature.WebhookSignatureError as exc:
            return self._refuse(request, str(exc))
        try:
            body = await read_body(request, MAX_HOOK_BODY)
        except BodyTooLarge as exc:
            return too_large(exc)
        try:
            webhook_signature.verify(self.webhook_secret, request.headers, body)
        except webhook_signature.WebhookSignatureError as exc:
            return self._refuse(request, str(exc))
        try:
            prediction = loads_bounded(body)
        except ValueError as exc:
            return _problem(400, f"body is not JSON: {exc}")
        if not isinstance(prediction, dict) or not isinstance(prediction.get("id"), str):
            return _problem(400, "body is not a prediction object (no id)")
        status = prediction.get("status")
        if status not in TERMINAL:
            return JSONResponse({"accepted": False, "reason": f"status {status!r} is not terminal"})
        recorded = await self.router.store.lookup_prediction(prediction["id"])
        if recorded is not None and where_token is not None \
                and recorded["message_id"] != where_token["message_id"]:
            return self._refuse(request, "the callback token belongs to another prediction")
        where = recorded or where_token
        if where is None:
            return _problem(404, f"prediction {prediction['id']} was not created by this router")
        # one result per (frame, prediction): the router's ids, not the caller's webhook-id
        own_id = f"prediction-result:{where['message_id']}:{prediction['id']}"
        message = Message.new(
            id=str(uuid.uuid5(uuid.NAMESPACE_URL, own_id)),
            project_id=where["project_id"], device_id=where["device_id"],
            path=where["path"].rstrip("/") + self.result_suffix, content_type=JSON_TYPE,
            payload=dumps(result_document(prediction, where["message_id"])),
            metadata={"prediction_id": prediction["id"], "frame_id": where["message_id"]},
        )
        try:
            added = await self.router.accept(message, dedup_key=own_id)
        except Overloaded as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503,
                                headers={"Retry-After": str(int(exc.retry_after))})
        self.received += 1
        return JSONResponse({"accepted": True, "duplicate": not added, "message_id": message.id})


def _limiter(request: Request) -> Any:
    """The HTTP face's per-client counter of refused credentials, if the app has one."""
    auth = getattr(request.app.state, "authenticator", None)
    return auth.failures if auth is not None else None


def token_key(webhook_secret: str) -> bytes:
    """The key callback tokens are signed with, derived from the webhook secret."""
    return hmac.new(webhook_secret.encode(), b"iot-pipelines callback token v2", hashlib.sha256).digest()


def callback_token(key: bytes, message: Message, ttl: float = TOKEN_TTL, now: float | None = None) -> str:
    """``base64(json [message id, project, device, path, expires]) . base64(HMAC)[:16]``."""
    expires = int((time.time() if now is None else now) + ttl)
    body = json.dumps([message.id, message.project_id, message.device_id, message.path, expires],
                      separators=(",", ":")).encode()
    mac = hmac.new(key, body, hashlib.sha256).digest()[:16]
    return (base64.urlsafe_b64encode(body).rstrip(b"=") + b"." +
            base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()


def result_document(prediction: dict[str, Any], frame_id: str) -> dict[str, Any]:
    metrics = prediction.get("metrics") or {}
    return {
        "frame_id": frame_id,
        "prediction_id": prediction.get("id"),
        "status": prediction.get("status"),
        "output": prediction.get("output"),
        "error": prediction.get("error"),
        "model": prediction.get("model"),
        "version": prediction.get("version"),
        "created_at": prediction.get("created_at"),
        "completed_at": prediction.get("completed_at"),
        "predict_time": metrics.get("predict_time") if isinstance(metrics, dict) else None,
    }


def _problem(status: int, detail: str) -> Response:
    return JSONResponse({"title": "Bad Request" if status == 400 else "Not Found", "detail": detail,
                         "status": status}, status_code=status, media_type="application/problem+json")


def own_webhook_secret(store_path: Any) -> str:
    """The secret the router made and keeps in its store (a fresh one per process for an
    in-memory store)."""
    if str(store_path) == ":memory:":
        return "whsec_" + base64.b64encode(os.urandom(32)).decode()
    from pipelines.http_auth import KeyStore
    return KeyStore(store_path).webhook_secret()


async def fetch_webhook_secret(client: httpx.AsyncClient, base_url: str, authorization: str) -> str:
    """``GET {base}/v1/webhooks/default/secret`` → ``whsec_...`` (the API's own secret)."""
    r = await client.get(base_url.rstrip("/") + "/v1/webhooks/default/secret",
                         headers={"Authorization": authorization}, timeout=15)
    r.raise_for_status()
    return r.json()["key"]
