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
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger("coap-ingest")


class RecentExchanges(OrderedDict):
    """aiocoap's ``(remote, message id) -> response or None`` table, oldest first, capped."""

    def __init__(self, limit: int, entries: Any = ()) -> None:
        super().__init__()
        self.limit = max(1, limit)
        self.evicted = 0
        for key, value in dict(entries).items():
            self[key] = value

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self:
            while len(self) >= self.limit:
                self.popitem(last=False)
                self.evicted += 1
        super().__setitem__(key, value)

    def pop(self, key: Any, default: Any = None) -> Any:  # type: ignore[override]
        # aiocoap's expiry timer pops each key once; the cap may have dropped it already
        return super().pop(key, default)


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
            tables.append(table)
    if not tables:
        log.warning("aiocoap's exchange table was not found: duplicate detection memory is not capped")
    return tables
