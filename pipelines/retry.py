"""The retry policy for every destination delivery and every webhook transformer call.

Usage::

    from pipelines.retry import RetryPolicy, call_with_retry

    policy = RetryPolicy(max_attempts=5)                 # or RetryPolicy.model_validate(step["retry"])
    response = await call_with_retry(policy, lambda: post_message(client, url, msg))

    # a queue that schedules its own retries uses the pieces:
    if policy.is_retryable(err) and not policy.should_give_up(attempts, elapsed):
        run_again_in(policy.next_delay(err, attempts))

Exponential backoff with full jitter: before attempt n+1 wait uniform(0, min(max_backoff,
initial_backoff * 2**(n-1))) seconds. When the receiver sent ``Retry-After`` we wait at least
that long (capped at ``retry_after_cap``). Which failures are retried is the
``DeliveryError.retryable`` flag (connection errors, timeouts, 408, 425, 429, 5xx except 501),
adjusted per step by ``retry_on`` (more statuses to retry) and ``drop_on`` (statuses never
retried, winning over everything).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.components import DeliveryError

T = TypeVar("T")


class RetryPolicy(BaseModel):
    """How often and how patiently one failing call is retried."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(default=10, ge=1, description="Attempts in all, the first included.",
                              examples=[10])
    max_elapsed: float = Field(default=3600.0, gt=0,
                               description="Seconds after the first attempt after which we give up.",
                               examples=[3600])
    initial_backoff: float = Field(default=0.5, gt=0, description="Backoff ceiling after attempt 1, s.",
                                   examples=[0.5])
    max_backoff: float = Field(default=60.0, gt=0, description="Largest backoff ceiling, s.",
                               examples=[60])
    retry_after_cap: float = Field(default=300.0, ge=0,
                                   description="Longest Retry-After we honour, s.", examples=[300])
    retry_on: list[int] | None = Field(default=None, description="Extra HTTP statuses to retry.",
                                       examples=[[409]])
    drop_on: list[int] | None = Field(default=None,
                                      description="HTTP statuses never retried, even if normally retryable.",
                                      examples=[[503]])

    @field_validator("retry_on", "drop_on")
    @classmethod
    def _statuses(cls, value: list[int] | None) -> list[int] | None:
        for status in value or ():
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status (100-599)")
        return value

    def is_retryable(self, err: DeliveryError) -> bool:
        if err.status is not None:
            if self.drop_on and err.status in self.drop_on:
                return False
            if self.retry_on and err.status in self.retry_on:
                return True
        return err.retryable

    def backoff_ceiling(self, attempt: int) -> float:
        """The upper bound of the jittered wait after ``attempt`` (1-based) failed."""
        exponent = min(max(attempt, 1) - 1, 64)  # 2**64 * anything already exceeds any max_backoff
        return min(self.max_backoff, self.initial_backoff * 2.0**exponent)

    def next_delay(self, err: DeliveryError, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        jittered = (rng or random).uniform(0.0, self.backoff_ceiling(attempt))
        if err.retry_after is not None:
            return max(min(err.retry_after, self.retry_after_cap), jittered)
        return jittered

    def should_give_up(self, attempts: int, elapsed: float) -> bool:
        """True once ``attempts`` calls were made or ``elapsed`` seconds have passed."""
        return attempts >= self.max_attempts or elapsed >= self.max_elapsed


async def call_with_retry(
    policy: RetryPolicy,
    fn: Callable[[], Awaitable[T]],
    *,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Await ``fn()`` until it returns, retrying ``DeliveryError`` per ``policy``.

    Gives up by re-raising the last ``DeliveryError`` (with ``.attempts`` set to the number
    of calls made) when it is not retryable, when attempts or time are used up, or when the
    next wait would end past ``max_elapsed``."""
    start = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except DeliveryError as err:
            err.attempts = attempt  # type: ignore[attr-defined]
            if not policy.is_retryable(err):
                raise
            elapsed = clock() - start
            if policy.should_give_up(attempt, elapsed):
                raise
            delay = policy.next_delay(err, attempt)
            if elapsed + delay > policy.max_elapsed:
                raise
            await sleep(delay)
