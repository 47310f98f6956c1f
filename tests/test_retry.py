"""pipelines.retry: which failures are retried, how long we wait, when we give up."""

from __future__ import annotations

import random

import pydantic
import pytest

from pipelines.components import DeliveryError
from pipelines.outbound_http import is_retryable_status, parse_retry_after
from pipelines.retry import RetryPolicy, call_with_retry


def http_error(status: int, retry_after: float | None = None) -> DeliveryError:
    return DeliveryError(f"HTTP {status}", retryable=is_retryable_status(status), status=status,
                         retry_after=retry_after)


def test_defaults():
    p = RetryPolicy()
    assert (p.max_attempts, p.max_elapsed, p.initial_backoff, p.max_backoff, p.retry_after_cap) == \
        (10, 3600, 0.5, 60, 300)
    assert p.retry_on is None and p.drop_on is None


@pytest.mark.parametrize(("status", "expected"), [
    (408, True), (425, True), (429, True), (500, True), (503, True), (599, True),
    (501, False), (400, False), (404, False), (410, False),
])
def test_default_retryable_statuses(status, expected):
    assert RetryPolicy().is_retryable(http_error(status)) is expected


def test_connection_errors_follow_the_flag():
    p = RetryPolicy()
    assert p.is_retryable(DeliveryError("refused", retryable=True))
    assert not p.is_retryable(DeliveryError("bad url", retryable=False))


def test_retry_on_and_drop_on():
    p = RetryPolicy(retry_on=[409, 501], drop_on=[503, 409])
    assert p.is_retryable(http_error(501))        # retry_on adds
    assert not p.is_retryable(http_error(503))    # drop_on removes
    assert not p.is_retryable(http_error(409))    # drop_on wins over retry_on
    assert p.is_retryable(http_error(502))        # others unchanged
    assert not p.is_retryable(http_error(400))
    assert p.is_retryable(DeliveryError("timeout", retryable=True))  # no status: the flag


def test_full_jitter_stays_within_the_exponential_ceiling():
    p = RetryPolicy(initial_backoff=0.5, max_backoff=60)
    rng = random.Random(7)
    err = http_error(503)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (8, 60.0), (200, 60.0)]:
        assert p.backoff_ceiling(attempt) == ceiling
        samples = [p.next_delay(err, attempt, rng) for _ in range(400)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # full jitter spreads over the whole range, not a fixed step
        assert min(samples) < ceiling * 0.1 and max(samples) > ceiling * 0.9


def test_retry_after_is_honoured_and_capped():
    p = RetryPolicy(initial_backoff=0.5, max_backoff=60, retry_after_cap=300)
    rng = random.Random(1)
    for _ in range(100):
        assert p.next_delay(http_error(429, retry_after=7), 1, rng) == 7  # jitter ≤ 0.5 < 7
        assert p.next_delay(http_error(503, retry_after=10_000), 1, rng) == 300
    # a Retry-After shorter than the jittered backoff: the longer of the two
    delays = [p.next_delay(http_error(429, retry_after=1), 10, rng) for _ in range(300)]
    assert all(1 <= d <= 60 for d in delays) and max(delays) > 30


def test_retry_after_from_an_http_date_flows_into_the_delay():
    from datetime import UTC, datetime
    now = datetime(2026, 1, 1, tzinfo=UTC)
    seconds = parse_retry_after("Thu, 01 Jan 2026 00:00:45 GMT", now)
    assert RetryPolicy().next_delay(http_error(503, retry_after=seconds), 1) == 45


def test_should_give_up():
    p = RetryPolicy(max_attempts=3, max_elapsed=10)
    assert not p.should_give_up(1, 0)
    assert not p.should_give_up(2, 9.9)
    assert p.should_give_up(3, 0)
    assert p.should_give_up(1, 10)


@pytest.mark.parametrize("bad", [
    {"max_attempts": 0}, {"max_elapsed": 0}, {"initial_backoff": -1}, {"retry_on": [700]},
    {"drop_on": [42]}, {"max_atempts": 3}, {"retry_on": "429"},
])
def test_invalid_policies_are_rejected(bad):
    with pytest.raises(pydantic.ValidationError):
        RetryPolicy.model_validate(bad)


class Script:
    """An async callable failing with the given errors, then returning "ok"; a fake clock
    advanced by the recorded sleeps."""

    def __init__(self, *errors: DeliveryError) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.sleeps: list[float] = []
        self.now = 0.0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


async def test_call_with_retry_retries_until_success():
    s = Script(http_error(503), http_error(429, retry_after=2), DeliveryError("refused", retryable=True))
    assert await call_with_retry(RetryPolicy(), s, sleep=s.sleep, clock=s.clock) == "ok"
    assert s.calls == 4 and len(s.sleeps) == 3
    assert 0 <= s.sleeps[0] <= 0.5 and s.sleeps[1] == 2 and 0 <= s.sleeps[2] <= 2


async def test_call_with_retry_stops_at_a_permanent_error():
    s = Script(http_error(503), http_error(400), http_error(503))
    with pytest.raises(DeliveryError) as info:
        await call_with_retry(RetryPolicy(), s, sleep=s.sleep, clock=s.clock)
    assert info.value.status == 400 and info.value.attempts == 2 and s.calls == 2


async def test_call_with_retry_501_is_not_retried():
    s = Script(http_error(501))
    with pytest.raises(DeliveryError) as info:
        await call_with_retry(RetryPolicy(), s, sleep=s.sleep, clock=s.clock)
    assert info.value.status == 501 and s.calls == 1 and s.sleeps == []


async def test_call_with_retry_gives_up_after_max_attempts_with_the_last_error():
    s = Script(*[http_error(s) for s in (500, 502, 503, 504, 500, 502, 503)])
    with pytest.raises(DeliveryError) as info:
        await call_with_retry(RetryPolicy(max_attempts=4), s, sleep=s.sleep, clock=s.clock)
    assert info.value.status == 504 and info.value.attempts == 4 and s.calls == 4 and len(s.sleeps) == 3


async def test_call_with_retry_does_not_wait_past_max_elapsed():
    s = Script(*[http_error(429, retry_after=40) for _ in range(10)])
    with pytest.raises(DeliveryError) as info:
        await call_with_retry(RetryPolicy(max_elapsed=100), s, sleep=s.sleep, clock=s.clock)
    # waits 40, 40; a third wait would end at 120 > 100
    assert s.sleeps == [40, 40] and s.calls == 3 and info.value.attempts == 3


async def test_call_with_retry_drop_on_makes_a_status_permanent():
    s = Script(http_error(503))
    with pytest.raises(DeliveryError):
        await call_with_retry(RetryPolicy(drop_on=[503]), s, sleep=s.sleep, clock=s.clock)
    assert s.calls == 1


async def test_call_with_retry_real_sleep_is_short_with_small_backoff():
    s = Script(http_error(502), http_error(502))
    assert await call_with_retry(RetryPolicy(initial_backoff=0.001, max_backoff=0.002), s) == "ok"
    assert s.calls == 3
