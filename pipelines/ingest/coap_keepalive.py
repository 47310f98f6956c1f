"""Answer the Golioth SDK's keep-alive: a NON Empty message (code 0.00, type NON, no token).

Golioth's Zephyr SDK (``src/coap_client_zephyr.c``) sends a NON Empty message after
``CONFIG_GOLIOTH_COAP_KEEPALIVE_INTERVAL_S`` (9 s) idle and drops its session when no
datagram at all has come back within ``CONFIG_GOLIOTH_COAP_CLIENT_RX_TIMEOUT_SEC`` (30 s):
any datagram resets that timer, before the SDK even parses it. aiocoap answers a CON Empty
("CoAP ping") with an RST but logs and drops a NON Empty, so an idle Zephyr device reconnected
every 30 s. This wraps each message layer of a context so a NON Empty is answered like a ping,
with an Empty RST carrying the same Message ID (RFC 7252 §4.3: a message that is not
processed may be rejected with an RST). It sits at the message layer, so it covers every
transport of the context, plain CoAP and DTLS alike::

    answer_empty_non(context, count=lambda: stats.update(...))   # once the transports are up

(The SDK's Linux port keeps alive with a path-less CON DELETE instead; the site answers it
4.04 without touching the rate limiter, which the SDK accepts.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import EMPTY
from aiocoap.numbers.types import NON, RST

log = logging.getLogger("coap-ingest")

_MARK = "_pipelines_answers_empty_non"


def answer_empty_non(context: Any, count: Callable[[], None] | None = None) -> int:
    """Wrap the message layer of each of ``context``'s transports; returns how many were wrapped.
    ``count()`` is called for each keep-alive answered. Wrapping twice is a no-op."""
    wrapped = 0
    for interface in getattr(context, "request_interfaces", []):
        manager = getattr(interface, "token_interface", None)
        if manager is None or not hasattr(manager, "dispatch_message") or not hasattr(manager, "_send_initially"):
            continue  # a transport without aiocoap's message layer (none today)
        if getattr(manager, _MARK, False):
            wrapped += 1
            continue
        _wrap(manager, count)
        wrapped += 1
    if not wrapped:
        log.warning("aiocoap's message layer was not found: NON Empty keep-alives go unanswered")
    return wrapped


def _wrap(manager: Any, count: Callable[[], None] | None) -> None:
    dispatch = manager.dispatch_message  # the bound method of aiocoap's MessageManager

    def dispatch_message(message: Any) -> None:
        if message.code is EMPTY and message.mtype is NON:
            rst = Message(_mtype=RST, _mid=message.mid, code=EMPTY, payload=b"")
            rst.remote = message.remote.as_response_address()
            # as aiocoap's own ping answer: straight to the wire, keeping the Message ID
            manager._send_initially(rst)
            if count is not None:
                count()
            return
        dispatch(message)

    manager.dispatch_message = dispatch_message
    setattr(manager, _MARK, True)
