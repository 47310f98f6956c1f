"""Per-key token buckets: a bounded map of ``key -> bucket``.

Usage::

    limiter = RateLimiter(rate=20.0, burst=300)    # 20 requests/s per device, bursts of 300
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

#: Defaults for the CoAP ingest (``pipeline serve --rate-limit/--rate-burst``). Measured with
#: ``bench/golioth_sdk_bursts.py`` (Golioth SDK Linux port, no limit, every request timed):
#:
#:     program          requests  peak/1s   burst@5/s  burst@10/s  burst@20/s  burst@50/s
#:     golioth_basics         33       27        26.8        26.5        26.1        24.7
#:     HIL lightdb            37       31        30.4        29.8        28.6        27.9
#:
#: The SDK sends ~30 requests at once when it connects (settings, RPC and OTA observations,
#: LightDB, and one ``/.s/logs`` POST per log line with automatic cloud logging) and then about
#: one a second. It neither retries a 4.29 nor honours Max-Age, and it logs each 4.29, which
#: (with cloud logging) is one more ``/.s/logs`` request: once a device is refused, it keeps
#: itself refused (875 x 4.29 in 0.36 s with the old 20/20). So the bucket is ten times the
#: largest burst measured, and the sustained rate twenty times the SDK's steady traffic: the
#: limit stops runaway or hostile senders, never a device behaving as the SDK does.
DEFAULT_RATE = 20.0
DEFAULT_BURST = 300.0


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
