"""The secret cache's rules: TTL, versions, single flight, stale-if-error, 403/404, 429, validity."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import MappingProxyType

import pytest

from broker import errors as broker_errors
from broker.secrets import (
    SecretCache,
    SecretKey,
    VaultRules,
    fresh,
    refresh_due,
    refusal,
    stale_servable,
)
from connectors import errors
from connectors.keyvault import Secret

T0 = 1_800_000_000.0
TTL = 300.0
STALE = 3600.0
RULES = {"main": VaultRules(cache_ttl=TTL, stale_if_error=STALE), "other": VaultRules(60.0, 0.0)}
LATEST = SecretKey("main", "db-pass", "")
VALUE = "s3cr3t-value-never-shown"


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def make_secret(
    key: SecretKey,
    n: int,
    *,
    enabled: bool = True,
    not_before: datetime | None = None,
    expires_on: datetime | None = None,
) -> Secret:
    return Secret(
        vault=key.vault,
        name=key.name,
        version=key.version or f"v{n}",
        value=f"{VALUE}-{n}",
        content_type=None,
        enabled=enabled,
        not_before=not_before,
        expires_on=expires_on,
        updated_on=None,
        tags=MappingProxyType({}),
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakeVault:
    """The cache's ``fetch``: counts calls, can be slowed, blocked or told to fail."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0
        self.fail: errors.ConnectorError | None = None
        self.gate: asyncio.Event | None = None
        self.attributes: dict[str, object] = {}

    async def __call__(self, key: SecretKey) -> Secret:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return make_secret(key, self.calls, **self.attributes)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def vault() -> FakeVault:
    return FakeVault()


@pytest.fixture
async def cache(vault: FakeVault, clock: Clock) -> AsyncIterator[SecretCache]:
    c = SecretCache(RULES, vault, clock=clock)
    yield c
    await c.close()


# the timing rules


def test_fresh_latest_for_ttl_versions_forever() -> None:
    rules = VaultRules(cache_ttl=100, stale_if_error=50)
    assert fresh(LATEST, 0, rules, 99.9)
    assert not fresh(LATEST, 0, rules, 100)
    assert fresh(SecretKey("main", "db-pass", "abc"), 0, rules, 1e9)


def test_stale_window_ends_stale_if_error_past_ttl() -> None:
    rules = VaultRules(cache_ttl=100, stale_if_error=50)
    assert stale_servable(0, rules, 150)
    assert not stale_servable(0, rules, 150.1)


def test_refresh_due_needs_three_quarters_and_two_reads() -> None:
    rules = VaultRules(cache_ttl=100, stale_if_error=0)
    assert refresh_due(LATEST, 0, 2, rules, 75)
    assert not refresh_due(LATEST, 0, 2, rules, 74.9)
    assert not refresh_due(LATEST, 0, 1, rules, 90)
    assert not refresh_due(SecretKey("main", "db-pass", "abc"), 0, 5, rules, 90)


def test_refusal_reasons() -> None:
    assert refusal(make_secret(LATEST, 1), T0) is None
    assert refusal(make_secret(LATEST, 1, enabled=False), T0) == "disabled"
    assert refusal(make_secret(LATEST, 1, expires_on=at(T0)), T0) == "expired"
    assert refusal(make_secret(LATEST, 1, expires_on=at(T0 + 1)), T0) is None
    assert refusal(make_secret(LATEST, 1, not_before=at(T0 + 1)), T0) == "not yet valid"
    assert refusal(make_secret(LATEST, 1, not_before=at(T0)), T0) is None


# hits, expiry, versions


async def test_hit_within_ttl_then_refetch_after(cache: SecretCache, vault: FakeVault, clock: Clock) -> None:
    first, outcome = await cache.get(LATEST)
    assert (outcome, vault.calls) == ("miss", 1)
    clock.now += TTL - 1
    again, outcome = await cache.get(LATEST)
    assert (outcome, vault.calls, again) == ("hit", 1, first)
    clock.now += 1
    newer, outcome = await cache.get(LATEST)
    assert (outcome, vault.calls) == ("miss", 2)
    assert newer.value != first.value


async def test_versioned_secret_kept_past_ttl(cache: SecretCache, vault: FakeVault, clock: Clock) -> None:
    key = SecretKey("main", "db-pass", "0123abcd")
    await cache.get(key)
    clock.now += 100 * TTL
    secret, outcome = await cache.get(key)
    assert (outcome, vault.calls, secret.version) == ("hit", 1, "0123abcd")


async def test_unknown_vault_is_not_found(cache: SecretCache, vault: FakeVault) -> None:
    with pytest.raises(broker_errors.NotFound):
        await cache.get(SecretKey("nope", "x", ""))
    assert vault.calls == 0


async def test_concurrent_cold_reads_share_one_fetch(clock: Clock) -> None:
    vault = FakeVault(delay=0.02)
    cache = SecretCache(RULES, vault, clock=clock)
    results = await asyncio.gather(*(cache.get(LATEST) for _ in range(100)))
    await cache.close()
    assert vault.calls == 1
    assert {outcome for _, outcome in results} == {"miss"}
    assert len({secret.value for secret, _ in results}) == 1


async def test_caller_giving_up_does_not_cancel_the_shared_fetch(cache: SecretCache, vault: FakeVault) -> None:
    vault.gate = asyncio.Event()
    impatient = asyncio.create_task(cache.get(LATEST))
    patient = asyncio.create_task(cache.get(LATEST))
    await asyncio.sleep(0)
    impatient.cancel()
    vault.gate.set()
    _, outcome = await patient
    assert (outcome, vault.calls) == ("miss", 1)
    assert impatient.cancelled()


# failures


async def test_stale_within_window_then_unavailable(cache: SecretCache, vault: FakeVault, clock: Clock) -> None:
    good, _ = await cache.get(LATEST)
    vault.fail = errors.ServerError("vault main", "answered 500", 500)
    clock.now += TTL + STALE  # the last moment of the window
    secret, outcome = await cache.get(LATEST)
    assert (outcome, secret, vault.calls) == ("stale", good, 2)
    assert cache.states()[0].stale
    clock.now += 1
    with pytest.raises(broker_errors.Unavailable) as info:
        await cache.get(LATEST)
    assert "past stale_if_error" in str(info.value)
    assert info.value.retry_after is not None and info.value.retry_after > 0
    assert VALUE not in str(info.value)
    # the failure did not replace the good value: once the vault answers, it is a plain miss
    vault.fail = None
    _, outcome = await cache.get(LATEST)
    assert outcome == "miss"


@pytest.mark.parametrize(
    "failure",
    [
        errors.TimedOut("vault main", "no answer"),
        errors.Unreachable("vault main", "cannot connect"),
        errors.Throttled("vault main", "answered 429", None),
    ],
)
async def test_every_transient_failure_serves_stale(
    cache: SecretCache, vault: FakeVault, clock: Clock, failure: errors.ConnectorError
) -> None:
    await cache.get(LATEST)
    clock.now += TTL
    vault.fail = failure
    _, outcome = await cache.get(LATEST)
    assert outcome == "stale"


async def test_no_cached_value_reraises_the_connector_error(cache: SecretCache, vault: FakeVault) -> None:
    vault.fail = errors.Unreachable("vault main", "cannot connect")
    with pytest.raises(errors.Unreachable):
        await cache.get(LATEST)
    assert len(cache) == 0  # a failed miss leaves no empty entry behind


async def test_non_transient_failure_is_not_masked(cache: SecretCache, vault: FakeVault, clock: Clock) -> None:
    await cache.get(LATEST)
    clock.now += TTL
    vault.fail = errors.Rejected("vault main", "answered 401", 401)
    with pytest.raises(errors.Rejected):
        await cache.get(LATEST)


@pytest.mark.parametrize(
    "failure",
    [
        errors.NotFound("vault main", "answered 404 SecretNotFound", 404, "SecretNotFound"),
        errors.Forbidden("vault main", "answered 403 AccessDenied", 403, "AccessDenied"),
    ],
)
async def test_403_and_404_pass_through_and_drop_every_version(
    cache: SecretCache, vault: FakeVault, clock: Clock, failure: errors.ConnectorError
) -> None:
    versioned = SecretKey("main", "DB-PASS", "0123abcd")
    unrelated = SecretKey("main", "other", "")
    for key in (LATEST, versioned, unrelated):
        await cache.get(key)
    clock.now += TTL  # well inside stale_if_error: the cache could mask it, and must not
    vault.fail = failure
    with pytest.raises(type(failure)):
        await cache.get(LATEST)
    assert [s.name for s in cache.states()] == ["other"]
    with pytest.raises(type(failure)):
        await cache.get(versioned)


async def test_429_holds_off_the_vault(cache: SecretCache, vault: FakeVault, clock: Clock) -> None:
    other_name = SecretKey("main", "api-key", "")
    await cache.get(other_name)
    vault.fail = errors.Throttled("vault main", "answered 429", 600)
    with pytest.raises(errors.Throttled):
        await cache.get(LATEST)
    assert vault.calls == 2
    clock.now += 10
    with pytest.raises(errors.Throttled) as info:
        await cache.get(LATEST)
    assert info.value.retry_after == pytest.approx(590)
    # another secret of the held vault, past its TTL: its stale copy, and still no request
    clock.now = T0 + TTL + 1
    _, outcome = await cache.get(other_name)
    assert outcome == "stale"
    assert vault.calls == 2
    # another vault is not held
    vault.fail = None
    await cache.get(SecretKey("other", "x", ""))
    assert vault.calls == 3
    clock.now = T0 + 599
    with pytest.raises(errors.Throttled):
        await cache.get(LATEST)
    assert vault.calls == 3
    clock.now = T0 + 601
    _, outcome = await cache.get(LATEST)
    assert (outcome, vault.calls) == ("miss", 4)


@pytest.mark.parametrize(
    ("attributes", "why"),
    [
        ({"enabled": False}, "disabled"),
        ({"expires_on": at(T0 - 1)}, "expired"),
        ({"not_before": at(T0 + 60)}, "not yet valid"),
    ],
)
async def test_invalid_secret_is_never_served(
    cache: SecretCache, vault: FakeVault, attributes: dict[str, object], why: str
) -> None:
    vault.attributes = attributes
    for _ in range(2):  # neither fetched nor from the cache
        with pytest.raises(broker_errors.Forbidden) as info:
            await cache.get(LATEST)
        assert str(info.value) == f"secret main/db-pass is {why}"
        assert VALUE not in str(info.value)
    assert vault.calls == 1


async def test_cached_copy_that_expires_is_refused(cache: SecretCache, vault: FakeVault, clock: Clock) -> None:
    vault.attributes = {"expires_on": at(T0 + 100)}
    _, outcome = await cache.get(LATEST)
    assert outcome == "miss"
    clock.now += 100
    with pytest.raises(broker_errors.Forbidden, match="expired"):
        await cache.get(LATEST)
    assert vault.calls == 1


# refresh-ahead


async def test_refresh_ahead_starts_exactly_one_background_fetch(
    cache: SecretCache, vault: FakeVault, clock: Clock
) -> None:
    vault.gate = asyncio.Event()
    task = asyncio.create_task(cache.get(LATEST))
    await asyncio.sleep(0)
    vault.gate.set()
    first, _ = await task
    vault.gate.clear()
    clock.now += 10
    await cache.get(LATEST)  # first read
    clock.now = T0 + 0.75 * TTL
    for _ in range(5):  # the second read triggers the refresh; the rest must not add any
        secret, outcome = await cache.get(LATEST)
        assert (outcome, secret) == ("hit", first)  # served from the cache while it refreshes
        await asyncio.sleep(0)
    assert vault.calls == 2
    vault.gate.set()
    for _ in range(3):
        await asyncio.sleep(0)
    clock.now = T0 + TTL + 1  # past the first value's TTL, within the refreshed one's
    secret, outcome = await cache.get(LATEST)
    assert outcome == "hit"
    assert secret.value != first.value
    assert vault.calls == 2


async def test_no_refresh_ahead_for_a_rarely_read_secret(
    cache: SecretCache, vault: FakeVault, clock: Clock
) -> None:
    await cache.get(LATEST)
    clock.now += 0.9 * TTL
    await cache.get(LATEST)  # one read since the fetch
    await asyncio.sleep(0.01)
    assert vault.calls == 1


async def test_no_refresh_ahead_while_the_vault_is_held(
    cache: SecretCache, vault: FakeVault, clock: Clock
) -> None:
    await cache.get(LATEST)
    vault.fail = errors.Throttled("vault main", "answered 429", 600)
    with pytest.raises(errors.Throttled):
        await cache.get(SecretKey("main", "api-key", ""))
    clock.now += 0.8 * TTL
    for _ in range(3):
        _, outcome = await cache.get(LATEST)
        assert outcome == "hit"
    await asyncio.sleep(0.01)
    assert vault.calls == 2


async def test_close_cancels_a_background_refresh(vault: FakeVault, clock: Clock) -> None:
    cache = SecretCache(RULES, vault, clock=clock)
    await cache.get(LATEST)
    vault.gate = asyncio.Event()
    clock.now += 0.8 * TTL
    await cache.get(LATEST)
    await cache.get(LATEST)
    await asyncio.sleep(0)
    assert vault.calls == 2
    await asyncio.wait_for(cache.close(), 1)  # would hang on the gate if not cancelled
    with pytest.raises(errors.Unreachable):
        await cache.get(LATEST)


# housekeeping


async def test_drop_by_vault_and_name(cache: SecretCache, vault: FakeVault) -> None:
    keys = [
        LATEST,
        SecretKey("main", "db-pass", "0123abcd"),
        SecretKey("main", "api-key", ""),
        SecretKey("other", "db-pass", ""),
    ]
    for key in keys:
        await cache.get(key)
    assert len(cache) == 4
    assert cache.drop("main", "DB-Pass") == 2
    assert cache.drop("main", "nothing") == 0
    assert cache.drop("main") == 1
    assert {s.vault for s in cache.states()} == {"other"}
    assert cache.drop() == 1
    assert len(cache) == 0
    _, outcome = await cache.get(LATEST)
    assert outcome == "miss"


async def test_bounded_size_evicts_least_recently_used(vault: FakeVault, clock: Clock) -> None:
    cache = SecretCache(RULES, vault, maxsize=3, clock=clock)
    keys = [SecretKey("main", f"s{i}", "") for i in range(5)]
    for key in keys:
        await cache.get(key)
    assert len(cache) == 3
    assert vault.calls == 5
    _, outcome = await cache.get(keys[4])
    assert outcome == "hit"
    _, outcome = await cache.get(keys[0])
    assert outcome == "miss"
    await cache.close()


async def test_states_show_age_and_reads_never_the_value(
    cache: SecretCache, vault: FakeVault, clock: Clock
) -> None:
    await cache.get(LATEST)
    clock.now += 42
    await cache.get(LATEST)
    await cache.get(LATEST)
    (state,) = cache.states()
    assert (state.vault, state.name, state.version) == ("main", "db-pass", "")
    assert (state.age, state.stale, state.reads) == (42, False, 2)
    assert VALUE not in repr(cache.states())
    secret, _ = await cache.get(LATEST)
    assert VALUE not in repr(secret)
