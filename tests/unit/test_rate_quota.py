"""The request rate quota's token buckets (sgw.provider.auth.rates) on a clock the test
moves: the burst, the refill, the refusal's wait, and rates set and replaced."""

from __future__ import annotations

import pytest

from sgw.common.errors import RateLimitedError
from sgw.provider.auth.rates import BURST_S, RateLimiter
from tests.fixtures.clock import FakeClock


def served(limiter: RateLimiter, account: str, n: int) -> int:
    """How many of ``n`` requests in a row (no time passing) are served."""
    count = 0
    for _ in range(n):
        try:
            limiter.take(account)
        except RateLimitedError:
            continue
        count += 1
    return count


def test_a_bucket_serves_its_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock(100.0)
    limiter = RateLimiter(default_rate=10.0, clock=clock)
    assert served(limiter, "a", 100) == int(10 * BURST_S)
    with pytest.raises(RateLimitedError) as refused:
        limiter.take("a")
    assert refused.value.retry_after == pytest.approx(0.1)
    assert "more than 10 requests per second" in str(refused.value)
    assert "sgw accounts quota-set a --rate N" in str(refused.value)
    clock.now += 0.5  # five requests' worth
    assert served(limiter, "a", 100) == 5
    clock.now += 3600  # never more than the burst
    assert served(limiter, "a", 100) == int(10 * BURST_S)
    # Accounts have buckets of their own.
    assert served(limiter, "b", 5) == 5


def test_a_set_rate_applies_at_once_and_replace_follows_the_database() -> None:
    clock = FakeClock()
    limiter = RateLimiter(default_rate=1000.0, clock=clock)
    limiter.set_rate("a", 1.0)
    assert limiter.rate("a") == 1.0 and limiter.rate("b") == 1000.0
    assert served(limiter, "a", 10) == int(BURST_S)  # a burst of at least one request
    limiter.replace({"b": 2.0})  # "a" lifted elsewhere, "b" set elsewhere
    assert limiter.rate("a") == 1000.0 and limiter.rate("b") == 2.0
    assert served(limiter, "a", 10) == 10
    assert served(limiter, "b", 10) == int(2 * BURST_S)
    limiter.set_rate("b", None)
    assert served(limiter, "b", 10) == 10
