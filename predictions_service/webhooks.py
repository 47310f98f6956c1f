"""Webhook delivery as Replicate does it: signed, filtered, throttled, the terminal one retried.

    sender = WebhookSender(secret, httpx.AsyncClient(), retry_delays=(1, 2, 4, 8, 15, 30))  # httpx: https://
    sender.notify(pred, "start")                 # sent now if "start" is in the prediction's filter
    sender.notify(pred, "output", "logs")        # at most once per 500 ms per prediction
    sender.notify(pred, "completed")             # retried on connection errors and 4xx/5xx
                                                 # (also to pred.webhook_completed, if set)
    await sender.close()

Each POST body is the prediction object at send time, signed with the Standard Webhooks scheme
(``webhook-id`` stays the same across retries of one message; ``webhook-timestamp`` is the time of
each attempt). Sends for one prediction go out in order. Redirects are not followed. Plain
``http://`` receivers are posted to over our own keep-alive connections (``webhook_http``), the
rest through the httpx client given.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

import httpx

from .ids import new_message_id
from .records import Prediction
from .signing import finish_signature, signed_headers, start_signature
from .webhook_http import WebhookPoster, WebhookSendError

log = logging.getLogger("predictions_service.webhooks")


class _PerPrediction:
    __slots__ = ("flush", "last_intermediate", "lock")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # FIFO: sends leave in the order they were queued
        self.last_intermediate = 0.0
        self.flush: asyncio.TimerHandle | None = None


class WebhookSender:
    def __init__(
        self,
        secret: str,
        client: httpx.AsyncClient,
        retry_delays: tuple[float, ...] = (),
        throttle_seconds: float = 0.5,
    ) -> None:
        self.secret = secret
        self.client = client
        timeout = client.timeout.read if client.timeout.read is not None else 10.0
        self.poster = WebhookPoster(https_client=client, timeout=timeout)
        self.retry_delays = retry_delays
        self.throttle = throttle_seconds
        self.state: dict[str, _PerPrediction] = {}
        self.tasks: set[asyncio.Task] = set()
        # prediction id -> (webhook-id, timestamp, the signature fed with the body's head)
        self._prepared: dict[str, tuple[str, int, hmac.HMAC]] = {}
        self.delivered = 0
        self.failed = 0

    def prepare(self, pred: Prediction) -> None:
        """Start the completed webhook while the model runs: its id, and its signature over the
        part of the body already known (through the input: ~56 KB for a frame). When it is sent,
        only the rest is hashed, unless the second has changed (the timestamp is signed too)."""
        if not pred.webhook or "completed" not in pred.events:
            return
        head = pred.json_head()
        if head is None:
            return
        msg_id, timestamp = new_message_id(), int(time.time())
        mac = start_signature(self.secret, msg_id, timestamp)
        mac.update(head.encode())
        self._prepared[pred.id] = (msg_id, timestamp, mac)

    def notify(self, pred: Prediction, *kinds: str) -> None:
        if "completed" in kinds and pred.webhook_completed:
            # the legacy option: its own URL, told of completion only (whatever the filter says)
            self._queue(pred, self.state.get(pred.id) or _PerPrediction(), terminal=True,
                        url=pred.webhook_completed)
        if not pred.webhook:
            return
        if "completed" in kinds:  # the last event of a prediction: forget its throttle state
            st = self.state.pop(pred.id, None) or _PerPrediction()
            prepared = self._prepared.pop(pred.id, None)
            if "completed" in pred.events:
                if st.flush:
                    st.flush.cancel()
                    st.flush = None
                self._queue(pred, st, terminal=True, prepared=prepared)
            return
        if not pred.events.intersection(kinds):
            return
        st = self.state.setdefault(pred.id, _PerPrediction())
        if "start" in kinds:
            self._queue(pred, st, terminal=False)
            return
        # output/logs: throttled; the latest state goes out when the window reopens
        now = time.monotonic()
        wait = st.last_intermediate + self.throttle - now
        if wait <= 0:
            st.last_intermediate = now
            self._queue(pred, st, terminal=False)
        elif st.flush is None:
            st.flush = asyncio.get_running_loop().call_later(wait, self._flush, pred, st)

    def _flush(self, pred: Prediction, st: _PerPrediction) -> None:
        st.flush = None
        if pred.terminal and "completed" in pred.events:
            return  # the completed webhook carries this state already
        st.last_intermediate = time.monotonic()
        self._queue(pred, st, terminal=False)

    def _queue(self, pred: Prediction, st: _PerPrediction, terminal: bool,
               prepared: tuple[str, int, hmac.HMAC] | None = None, url: str | None = None) -> None:
        # the body is a snapshot now: later changes get their own event
        first: tuple[str, int, str] | None = None
        head = pred.json_head() if prepared else None
        if prepared and head is not None:
            tail = pred.json_tail(pred.as_json()).encode()
            body = head.encode() + tail
            msg_id, timestamp, mac = prepared
            mac.update(tail)
            first = (msg_id, timestamp, finish_signature(mac))
        else:
            body = pred.to_json().encode()
        target = url or pred.webhook or ""
        task = asyncio.create_task(self._deliver(st.lock, pred.id, target, body, terminal, first))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, lock: asyncio.Lock, pred_id: str, url: str, body: bytes, terminal: bool,
                       first: tuple[str, int, str] | None = None) -> None:
        msg_id = first[0] if first else new_message_id()
        delays = self.retry_delays if terminal else ()
        async with lock:
            for attempt in range(len(delays) + 1):
                now = int(time.time())
                made = first[2] if first and attempt == 0 and first[1] == now else None
                headers = signed_headers(self.secret, msg_id, now, body, precomputed=made)
                headers["content-type"] = "application/json"
                headers["user-agent"] = "iot-pipelines-predictions/0.1"
                try:
                    status = await self.poster.post(url, body, headers)
                    if status < 300:
                        self.delivered += 1
                        return
                    problem = f"HTTP {status}"
                    if status < 400:
                        self.failed += 1  # redirects are not followed, and not worth a retry
                        log.warning("webhook %s for %s answered %s; not following", msg_id, pred_id, problem)
                        return
                except WebhookSendError as exc:
                    problem = str(exc)
                if attempt < len(delays):
                    log.info(
                        "webhook %s for %s failed (%s); retry in %.1fs",
                        msg_id,
                        pred_id,
                        problem,
                        delays[attempt],
                    )
                    await asyncio.sleep(delays[attempt])
            self.failed += 1
            log.warning(
                "webhook %s for %s not delivered (%s)%s",
                msg_id,
                pred_id,
                problem,
                " after retries" if delays else "",
            )

    async def close(self) -> None:
        for st in self.state.values():
            if st.flush:
                st.flush.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.poster.close()
