"""A size cap on aiocoap's table of recent exchanges, its duplicate detection.

aiocoap remembers every incoming message for EXCHANGE_LIFETIME (247 s, RFC 7252) so that a
retransmitted confirmable request is answered from the cache instead of being processed twice.
At one request per 1 KB block that costs 3-4 KB of memory per block: a fleet sending 800
blocks/s would hold some 700 MB, and a faster sender more, whatever the router's other limits.
The cap keeps the newest ``limit`` entries; the oldest go first. Retransmissions come within
MAX_TRANSMIT_SPAN (45 s) and mostly within seconds, so the newest entries are the ones that
matter, and a Block1 block that arrives again after its entry went is recognised by the upload
itself (``Block1Assembler`` answers a repeated block as before)::

    cap_recent_exchanges(context, limit=30_000)    # once the context's transports are up

aiocoap also schedules one timer per incoming message (``loop.call_later(247 s, pop)``) to
forget it: at 800 blocks/s that is 200,000 live timers (each holding the remote address and a
partial), which outlive the cap and made the memory stay long after the traffic. The table
here expires its own entries (they are in arrival order, so expiry is a walk from the front),
and ``cap_recent_exchanges`` puts a duplicate check without timers in place of aiocoap's
``MessageManager._deduplicate_message`` (same behaviour otherwise). Upstream: aiocoap could
expire the table from one periodic sweep instead of a timer per message.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiocoap

log = logging.getLogger("coap-ingest")


class RecentExchanges(OrderedDict):
    """aiocoap's ``(remote, message id) -> response or None`` table, oldest first, capped."""

    def __init__(self, limit: int, entries: Any = (), clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limit = max(1, limit)
        self.evicted = 0
        self.expired = 0
        self._clock = clock
        self._expires: dict[Any, float] = {}
        for key, value in dict(entries).items():
            self[key] = value

    def remember(self, key: Any, lifetime: float) -> None:
        """A new incoming message: kept for ``lifetime`` seconds (no response known yet)."""
        now = self._clock()
        self.expire(now)
        self[key] = None
        self._expires[key] = now + lifetime

    def remember_answered(self, key: Any, lifetime: float, answer: Any) -> None:
        """A new incoming message answered at once (``coap_fastpath``): ``remember`` and the
        answer in one step. ``answer`` is kept as it is."""
        now = self._clock()
        if self and self._expires.get(next(iter(self)), now + 1) <= now:
            self.expire(now)
        if key in self:
            super().pop(key)
        while len(self) >= self.limit:
            old, _ = self.popitem(last=False)
            self._expires.pop(old, None)
            self.evicted += 1
        OrderedDict.__setitem__(self, key, answer)
        self._expires[key] = now + lifetime

    def expire(self, now: float | None = None) -> int:
        """Forget entries whose lifetime is over; returns how many went."""
        now = self._clock() if now is None else now
        gone = 0
        while self:
            key = next(iter(self))
            if self._expires.get(key, now + 1) > now:
                break
            super().pop(key)
            self._expires.pop(key, None)
            gone += 1
        self.expired += gone
        return gone

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self:
            while len(self) >= self.limit:
                old, _ = self.popitem(last=False)
                self._expires.pop(old, None)
                self.evicted += 1
        elif value is not None and getattr(value, "request", None) is not None:
            # the response kept for a duplicate: without the request it answers (aiocoap keeps
            # it linked), whose payload (a whole 1 KB block) need not live for 247 s
            value = copy.copy(value)
            value.request = None
        super().__setitem__(key, value)

    def pop(self, key: Any, default: Any = None) -> Any:  # type: ignore[override]
        # aiocoap's expiry timer pops each key once; the cap may have dropped it already
        self._expires.pop(key, None)
        return super().pop(key, default)


def _deduplicate_without_timers(manager: Any, table: RecentExchanges) -> Callable[[Any], bool]:
    """aiocoap's ``MessageManager._deduplicate_message`` (0.4.17), remembering each message in
    ``table`` with its lifetime instead of scheduling a timer per message."""
    con = aiocoap.CON

    def deduplicate(message: Any) -> bool:
        key = (message.remote, message.mid)
        if key in table:
            if message.mtype is con and table[key] is not None:
                manager._send_initially(table[key])  # the response sent before, again
            return True
        table.remember(key, message.transport_tuning.EXCHANGE_LIFETIME)
        return False
    return deduplicate


def cap_recent_exchanges(context: Any, limit: int) -> list[RecentExchanges]:
    """Put a capped table in place of each message layer's in ``context``; returns them."""
    tables = []
    for interface in getattr(context, "request_interfaces", []):
        manager = getattr(interface, "token_interface", None)
        recent = getattr(manager, "_recent_messages", None)
        if isinstance(recent, RecentExchanges):
            tables.append(recent)
        elif isinstance(recent, dict):
            table = RecentExchanges(limit, recent)
            manager._recent_messages = table  # type: ignore[union-attr]
            if hasattr(manager, "_deduplicate_message") and hasattr(manager, "_send_initially"):
                manager._deduplicate_message = _deduplicate_without_timers(manager, table)
            tables.append(table)
    if not tables:
        log.warning("aiocoap's exchange table was not found: duplicate detection memory is not capped")
    return tables
