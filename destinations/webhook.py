"""``webhook`` destination: POST the message (any content type) to a URL.

Pipeline step::

    destination:
      type: webhook
      parameters:
        url: https://api.replicate.com/v1/predictions
        headers: {Authorization: "Bearer ${REPLICATE_API_TOKEN}"}

One attempt per ``deliver()`` call: the router's delivery queue applies the retry policy.
The request (CloudEvents headers, Content-Type, URL overrides, timeout) is built by
``pipelines.outbound_http``; it needs the router's shared client, ``context.http``.
"""

from __future__ import annotations

from destinations.registry import register
from pipelines.components import ComponentError, Destination
from pipelines.message import Message
from pipelines.outbound_http import WebhookParams, post_message


@register
class WebhookDestination(Destination):
    type = "webhook"
    version = "1.0.0"
    summary = "HTTP POST of the payload with CloudEvents headers and the step's own headers."
    Params = WebhookParams

    async def deliver(self, message: Message) -> None:
        if self.context.http is None:
            raise ComponentError("webhook destination needs the router's HTTP client (context.http)")
        await post_message(self.context.http, self.params.url, message,
                           headers=self.params.headers, extra=self.context.extra)
