"""Per-client rate limits, as pure functions of the clock."""

from __future__ import annotations

import pytest

from broker.ratelimit import RateLimiter


def test_burst_is_twice_the_rate_then_steady() -> None:
    limiter = RateLimiter.empty()
    assert [limiter.check("c", 2, 100.0) for _ in range(4)] == [0, 0, 0, 0]
    assert limiter.check("c", 2, 100.0) == pytest.approx(0.5)
    assert limiter.check("c", 2, 100.5) == 0


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.49])
def test_slow_rates_still_allow_requests(rate: float) -> None:
    limiter = RateLimiter.empty()
    assert limiter.check("c", rate, 0.0) == 0
    wait = limiter.check("c", rate, 0.0)
    assert wait == pytest.approx(1 / rate)
    assert limiter.check("c", rate, wait) == 0


def test_zero_is_unlimited_and_clients_are_separate() -> None:
    limiter = RateLimiter.empty()
    assert all(limiter.check("a", 0, 0.0) == 0 for _ in range(1000))
    assert limiter.check("b", 1, 0.0) == 0
    assert limiter.check("b", 1, 0.0) == 0
    assert limiter.check("b", 1, 0.0) > 0
    assert limiter.check("c", 1, 0.0) == 0
