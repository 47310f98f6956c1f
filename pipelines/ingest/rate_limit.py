"""Per-key token buckets: a bounded map of ``key -> bucket``.

Usage::

    limiter = RateLimiter(rate=20.0, burst=20)     # 20 requests/s per device, bursts of 20
    wait = limiter.take(("demo", "cam-01"))
    if wait:                                        # seconds until a token is available
        answer 4.29 Too Many Requests with Max-Age = ceil(wait)

``rate <= 0`` disables limiting. At most ``max_keys`` buckets are kept; the least recently
used one is forgotten first (a forgotten bucket comes back full, so this only ever errs
towards letting a request through).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable

#: Defaults for the CoAP ingest (``pipeline serve --rate-limit/--rate-burst``): see below.
DEFAULT_RATE = 20.0
DEFAULT_BURST = 20.0


class RateLimiter:
    def __init__(self, rate: float, burst: float | None = None, max_keys: int = 100_000,
                 clock=time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def take(self, key: Hashable, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens for ``key``: 0.0 if allowed, else seconds to wait (nothing spent)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= cost:
            tokens -= cost
            wait = 0.0
        else:
            wait = (cost - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
