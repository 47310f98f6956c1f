"""``webhook`` transformer: POST the message to an HTTP endpoint; the response (body and
content type) becomes the message.

Pipeline step::

    transformer:
      type: webhook
      parameters:
        url: https://api.openai.com/v1/chat/completions
        headers: {Authorization: $OPENAI_TOKEN}
        embed: false

The request is the one the webhook destination sends (``pipelines.outbound_http``:
CloudEvents headers, the message's Content-Type, then the user's headers). A non-2xx answer
is retried per the step's retry policy (``context.extra["retry"]``: a ``RetryPolicy`` or its
fields as a dict; default ``TRANSFORMER_RETRY``: 3 attempts within 30 s), then is a failure. With ``embed: true`` and
JSON both in and out the result is ``{"input": <message>, "output": <response>}``;
otherwise the response as it came. JSON content types lose their parameters
(``application/json; charset=utf-8`` → ``application/json``) so filters and JSON steps match.
A response without a Content-Type is ``application/octet-stream``.

Uses the router's shared client (``context.http``); in a bare context it opens its own and
closes it in ``close()``.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import Field

from pipelines.components import DeliveryError, Transformer, TransformError
from pipelines.message import Message, NotJSONError, is_json_type
from pipelines.outbound_http import WebhookParams, post_message
from pipelines.retry import RetryPolicy, call_with_retry
from transformers.base import base_type
from transformers.registry import register

# A transformer call holds up its message's pipeline run (and an engine slot) while it waits,
# unlike a destination, whose queue retries in the background: so a short default budget;
# what still fails becomes a dead letter that `pipeline dlq replay` re-runs from this step.
TRANSFORMER_RETRY = RetryPolicy(max_attempts=3, max_elapsed=30.0)


def retry_policy(extra: dict[str, Any]) -> RetryPolicy:
    value = extra.get("retry")
    if value is None:
        return TRANSFORMER_RETRY
    if isinstance(value, RetryPolicy):
        return value
    return RetryPolicy.model_validate(value)


@register
class WebhookTransformer(Transformer):
    type = "webhook"
    version = "1.0.0"
    summary = "POST the message to a URL; the response body and content type become the message."

    class Params(WebhookParams):
        embed: bool = Field(default=False, strict=True,
                            description='With JSON in and out: {"input": <message>, "output": <response>}.',
                            examples=[False, True])

    _own_client: httpx.AsyncClient | None = None

    def _client(self) -> httpx.AsyncClient:
        if self.context.http is not None:
            return self.context.http
        if self._own_client is None:
            self._own_client = httpx.AsyncClient()
        return self._own_client

    async def close(self) -> None:
        if self._own_client is not None:
            await self._own_client.aclose()
            self._own_client = None

    async def transform(self, message: Message) -> Message:
        client = self._client()
        params = self.params
        try:
            response = await call_with_retry(
                retry_policy(self.context.extra),
                lambda: post_message(client, params.url, message, headers=params.headers,
                                     extra=self.context.extra),
            )
        except DeliveryError as err:
            attempts = getattr(err, "attempts", 1)
            answer = f": {err.response_excerpt[:200]!r}" if err.response_excerpt else ""
            raise TransformError(f"webhook: {err.reason} (after {attempts} attempt"
                                 f"{'s' if attempts != 1 else ''}){answer}") from None
        content_type = response.headers.get("content-type") or "application/octet-stream"
        if not is_json_type(content_type):
            return message.evolve(payload=response.content, content_type=content_type)
        content_type = base_type(content_type)
        if not (params.embed and is_json_type(message.content_type)):
            return message.evolve(payload=response.content, content_type=content_type)
        try:
            document = {"input": message.json(), "output": _parse(response.content)}
        except NotJSONError as exc:
            raise TransformError(f"webhook (embed): {exc}") from None
        return message.evolve(json=document, content_type=content_type)


def _parse(body: bytes) -> Any:
    probe = Message.new(device_id="", path="", content_type="application/json", payload=body)
    try:
        return probe.json()
    except NotJSONError as exc:
        raise NotJSONError(f"the response is not valid JSON ({exc})") from None
