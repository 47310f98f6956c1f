"""Counts of CoAP datagrams the ingest could not take as they came, and a summarising logger.

Usage::

    DATAGRAMS.note("undecodable", "Uri-Path is not UTF-8", log)   # count; log at most every 60 s
    DATAGRAMS.counts()        # {"undecodable": 12, "truncated": 1, ...}: what /metrics exports

One table per process (``DATAGRAMS``), exported by ``pipelines.metrics`` as
``pipeline_coap_datagrams_refused_total{reason=...}``. This module imports nothing heavy so the
metrics page can read it without loading aiocoap.

Reasons:

* ``truncated``: longer than the receive buffer; answered 4.13 with Size1.
* ``unparsable``: not a CoAP message; a CON gets RST, the rest is dropped.
* ``undecodable_option``: an option value of the wrong form (a Uri-Path that is not UTF-8);
  answered 4.02.
* ``bad_option``: unknown critical, repeated or proxy options; 4.02 / 5.05, answered before
  aiocoap's request machinery.
* ``misfit``: type and code do not go together; a CON gets RST.
* ``token_in_use``: a new request on a token whose request is still in progress; 4.00 (see
  ``coap_datagrams``).
* ``dispatch_error``: aiocoap failed on a message it had decoded; logged once per interval with
  its traceback.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable


class DatagramCounts:
    """Counters by reason, and a log line at most once per ``interval`` seconds."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._total: Counter[str] = Counter()
        self._since_log: Counter[str] = Counter()
        self._last_log: float | None = None
        self._examples: dict[str, str] = {}

    def counts(self) -> dict[str, int]:
        return dict(self._total)

    def note(self, reason: str, detail: str, logger: logging.Logger,
             exc_info: BaseException | None = None) -> bool:
        """Count one datagram; log a summary if the last one is ``interval`` old. True if logged."""
        self._total[reason] += 1
        self._since_log[reason] += 1
        self._examples.setdefault(reason, detail)
        now = self._clock()
        if self._last_log is not None and now - self._last_log < self.interval:
            return False
        summary = ", ".join(f"{n} {r} (e.g. {self._examples[r]})" for r, n in sorted(self._since_log.items()))
        window = "" if self._last_log is None else f" in the last {now - self._last_log:.0f} s"
        logger.warning("CoAP: refused datagrams%s: %s; next summary in %.0f s at the earliest",
                       window, summary, self.interval, exc_info=exc_info)
        self._last_log = now
        self._since_log.clear()
        self._examples.clear()
        return True


#: The process's table (every CoAP ingest in the process counts here).
DATAGRAMS = DatagramCounts()
