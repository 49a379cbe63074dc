"""The token cache's rules: margins, refresh timing, single flight, failures, throttling."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.tokens import TokenCache, TokenKey, margin, refresh_at, refresh_backoff, servable
from connectors import errors
from connectors.identity import DEFAULT_IDENTITY, Token
from connectors.retry import RetryPolicy
from connectors.retry import retry_delay as upstream_retry_delay

KEY = TokenKey(DEFAULT_IDENTITY, "https://vault.azure.net")


def tok(obtained: float, lifetime: float, refresh_on: float | None = None, value: str = "t") -> Token:
    return Token(value=value, expires_on=obtained + lifetime, obtained_at=obtained, refresh_on=refresh_on)


def test_margin_is_ten_percent_capped_at_600s() -> None:
    assert margin(tok(0, 30)) == pytest.approx(3)
    assert margin(tok(0, 3600)) == pytest.approx(360)
    assert margin(tok(0, 86400)) == 600


def test_servable_until_margin() -> None:
    t = tok(1000, 30)
    assert servable(t, 1026.9)
    assert not servable(t, 1027.1)
    assert not servable(t, 1031)


def test_refresh_at_half_life_or_refresh_in() -> None:
    assert refresh_at(tok(1000, 3600)) == 2800
    assert refresh_at(tok(1000, 3600, refresh_on=1100)) == 1100
    # a refresh_in past the point where the token stops being servable is pulled in
    assert refresh_at(tok(1000, 30, refresh_on=1029)) == pytest.approx(1027)


def test_retry_delay_grows_and_caps() -> None:
    assert [refresh_backoff(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert refresh_backoff(50) == 60


def test_upstream_retry_rules() -> None:
    policy = RetryPolicy(attempts=3, base_delay=1, max_delay=8, max_retry_after=2)
    server = errors.ServerError("x", "boom", 500)
    assert upstream_retry_delay(policy, 1, server, 0.0) == 0.5
    assert upstream_retry_delay(policy, 2, server, 0.999) == pytest.approx(2 * 0.9995)
    assert upstream_retry_delay(policy, 3, server, 0.0) is None  # attempts used up
    assert upstream_retry_delay(policy, 1, errors.Rejected("x", "no", 400), 0.0) is None
    assert upstream_retry_delay(policy, 1, errors.Rejected("x", "updating", 410), 0.0) == 0.5
    assert upstream_retry_delay(policy, 1, errors.Throttled("x", "slow", 1.5), 0.0) == 1.5
    assert upstream_retry_delay(policy, 1, errors.Throttled("x", "slow", 5), 0.0) is None
    assert upstream_retry_delay(policy, 1, errors.TimedOut("x", "t"), 0.0) == 0.5
    assert upstream_retry_delay(policy, 1, errors.Unreachable("x", "u"), 0.0) == 0.5


class FakeUpstream:
    """Hands out tokens of a given lifetime; can be told to fail."""

    def __init__(self, lifetime: float, delay: float = 0.0) -> None:
        self.lifetime = lifetime
        self.delay = delay
        self.calls = 0
        self.fail: errors.ConnectorError | None = None

    async def __call__(self, key: TokenKey) -> Token:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return tok(time.time(), self.lifetime, value=f"token-{self.calls}")


async def test_concurrent_misses_share_one_fetch() -> None:
    upstream = FakeUpstream(3600, delay=0.05)
    cache = TokenCache(fetch=upstream)
    results = await asyncio.gather(*(cache.get(KEY) for _ in range(200)))
    assert upstream.calls == 1
    assert {t.value for t, _ in results} == {"token-1"}
    assert [hit for _, hit in results].count(False) == 200  # all waited on the one fetch
    token, hit = await cache.get(KEY)
    assert hit and token.value == "token-1"
    await cache.close()


async def test_cancelled_caller_does_not_cancel_shared_fetch() -> None:
    upstream = FakeUpstream(3600, delay=0.1)
    cache = TokenCache(fetch=upstream)
    first = asyncio.create_task(cache.get(KEY))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(cache.get(KEY))
    await asyncio.sleep(0.01)
    first.cancel()
    token, _ = await second
    assert token.value == "token-1" and upstream.calls == 1
    await cache.close()


async def test_background_refresh_at_half_life() -> None:
    upstream = FakeUpstream(1.0)
    cache = TokenCache(fetch=upstream)
    await cache.get(KEY)
    await asyncio.sleep(0.7)  # past half-life: the refresh ran without any caller
    assert upstream.calls == 2
    second, hit = await cache.get(KEY)
    assert hit and second.value == "token-2"
    await cache.close()


async def test_failed_refresh_keeps_serving_valid_token_never_expired() -> None:
    upstream = FakeUpstream(2.0)
    cache = TokenCache(fetch=upstream)
    good, _ = await cache.get(KEY)
    upstream.fail = errors.ServerError("identity endpoint", "answered 500", 500)
    await asyncio.sleep(1.3)  # refresh at 1.0 s failed
    assert upstream.calls >= 2
    served, hit = await cache.get(KEY)
    assert hit and served.value == good.value
    state = cache.states()[0]
    assert state.failures >= 1 and "500" in state.last_error
    await asyncio.sleep(0.75)  # now under the 10 % margin: must not be served
    with pytest.raises(errors.ServerError):
        await cache.get(KEY)
    await cache.close()


async def test_throttled_upstream_is_left_alone_for_retry_after() -> None:
    upstream = FakeUpstream(3600)
    upstream.fail = errors.Throttled("identity endpoint", "answered 429", 0.5)
    cache = TokenCache(fetch=upstream)
    with pytest.raises(errors.Throttled):
        await cache.get(KEY)
    assert upstream.calls == 1
    with pytest.raises(errors.Throttled) as held:
        await cache.get(KEY)
    assert upstream.calls == 1  # no request while held off
    assert 0 < (held.value.retry_after or 0) <= 0.5
    upstream.fail = None
    await asyncio.sleep(0.55)
    token, _ = await cache.get(KEY)
    assert token.value == "token-2"
    await cache.close()


async def test_cache_is_bounded() -> None:
    upstream = FakeUpstream(3600)
    cache = TokenCache(fetch=upstream, maxsize=4)
    for i in range(10):
        await cache.get(TokenKey(DEFAULT_IDENTITY, f"https://r{i}"))
    assert len(cache.states()) == 4
    await cache.close()


async def test_already_expired_token_from_upstream_is_refused_without_a_loop() -> None:
    """Clock skew: the upstream hands out a token that is already past its margin."""
    calls = 0

    async def skewed(key: TokenKey) -> Token:
        nonlocal calls
        calls += 1
        return tok(time.time() - 100, 95)  # expired 5 s ago

    cache = TokenCache(fetch=skewed)
    with pytest.raises(errors.ServerError, match="expires in"):
        await cache.get(KEY)
    await asyncio.sleep(0.2)
    assert calls == 1  # no background refetch loop
    assert cache.states() == []
    await cache.close()


async def test_failed_lookups_do_not_evict_warm_entries() -> None:
    upstream = FakeUpstream(3600)
    cache = TokenCache(fetch=upstream, maxsize=2)
    await cache.get(KEY)
    upstream.fail = errors.Rejected("identity endpoint", "answered 400", 400)
    for i in range(5):
        with pytest.raises(errors.Rejected):
            await cache.get(TokenKey(DEFAULT_IDENTITY, f"https://junk{i}"))
    upstream.fail = None
    token, hit = await cache.get(KEY)
    assert hit and token.value == "token-1"
    await cache.close()


def test_no_retry_past_the_deadline() -> None:
    policy = RetryPolicy(attempts=10, base_delay=1, max_delay=8, deadline=5)
    server = errors.ServerError("x", "boom", 500)
    assert upstream_retry_delay(policy, 1, server, 0.0, elapsed=3.0) == 0.5
    assert upstream_retry_delay(policy, 3, server, 0.0, elapsed=3.5) is None  # 3.5 + 2 > 5
