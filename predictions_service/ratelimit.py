"""Per-token rate limits in Replicate's style: a token bucket per API token and kind of call.

    limits = RateLimiter(per_minute=600)
    decision = limits.take("r8_token")
    decision.allowed, decision.remaining, decision.reset_seconds

The bucket holds ``per_minute`` calls and refills continuously, so short bursts above the average
rate pass, as Replicate says they do. ``reset_seconds`` is the time until one more call is allowed
(what ``ratelimit-reset`` and ``Retry-After`` report).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int
    reset_seconds: int


class RateLimiter:
    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)

    def take(self, key: str) -> Decision:
        now = self.clock()
        tokens, last = self.buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self.buckets[key] = (tokens, now)
        missing = max(0.0, 1.0 - tokens)
        reset = max(1, math.ceil(missing / self.rate)) if missing else 1
        return Decision(allowed, int(tokens), reset)
