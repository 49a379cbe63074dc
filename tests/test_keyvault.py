"""VaultClient: the real SecretClient against the emulator's Key Vault over TLS, tokens from the
real IdentityClient against its managed-identity endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from azure.keyvault.secrets._shared import http_challenge_cache

from broker.emulator import Emulator, Fault
from connectors import errors
from connectors.identity import IdentityClient, Source, Token
from connectors.keyvault import VaultClient, valid_name, valid_version
from connectors.retry import RetryPolicy

VALUE = "correct-horse-battery-staple"
VAULT_RESOURCE = "https://vault.azure.net"
FAST = RetryPolicy(attempts=2, timeout=2.0, base_delay=0.01, max_delay=0.02, max_retry_after=2.0)


class Tokens:
    """A TokenSource over the real IdentityClient that remembers which resources were asked for."""

    def __init__(self, identity: IdentityClient) -> None:
        self.identity = identity
        self.resources: list[str] = []

    async def __call__(self, resource: str) -> Token:
        self.resources.append(resource)
        return await self.identity.fetch(resource)


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(token_lifetime=3600) as emulator:
        yield emulator


@pytest.fixture
async def tokens(emu: Emulator) -> AsyncIterator[Tokens]:
    identity = IdentityClient(Source("app_service", endpoint=emu.identity_url, header=emu.identity_header))
    yield Tokens(identity)
    await identity.close()


@pytest.fixture
def outcomes() -> list[str]:
    return []


@pytest.fixture
async def vault(emu: Emulator, tokens: Tokens, outcomes: list[str]) -> AsyncIterator[VaultClient]:
    client = make_client(emu, tokens, observe=lambda outcome, seconds: outcomes.append(outcome))
    yield client
    await client.close()


def make_client(emu: Emulator, tokens: Tokens, **options: object) -> VaultClient:
    settings: dict[str, object] = {
        "ca_file": str(emu.ca_file),
        # The emulator's challenge names https://vault.azure.net, which 127.0.0.1 is not under.
        "verify_challenge_resource": False,
        "retry": FAST,
        **options,
    }
    return VaultClient("main", emu.vault_url("main"), tokens, **settings)  # type: ignore[arg-type]


async def warm(emu: Emulator, vault: VaultClient) -> None:
    """One successful read, so the challenge is done and later request counts are exact."""
    emu.set_secret("main", "warm-up", "x")
    await vault.get("warm-up")
    emu.reset_stats()


# reads


async def test_latest_with_its_properties(emu: Emulator, vault: VaultClient) -> None:
    emu.set_secret("main", "db-pass", "old")
    not_before = datetime(2020, 1, 1, tzinfo=UTC)
    expires_on = datetime(2099, 1, 1, tzinfo=UTC)
    version = emu.set_secret(
        "main", "db-pass", VALUE, content_type="text/plain", tags={"team": "data"},
        not_before=not_before, expires_on=expires_on,
    )
    secret = await vault.get("db-pass")
    assert (secret.vault, secret.name, secret.version, secret.value) == ("main", "db-pass", version, VALUE)
    assert (secret.content_type, secret.enabled) == ("text/plain", True)
    assert (secret.not_before, secret.expires_on) == (not_before, expires_on)
    assert secret.updated_on is not None and secret.updated_on.tzinfo is not None
    assert dict(secret.tags) == {"team": "data"}
    with pytest.raises(TypeError):
        secret.tags["team"] = "other"  # type: ignore[index]
    assert VALUE not in repr(secret)


async def test_unset_properties(emu: Emulator, vault: VaultClient) -> None:
    emu.set_secret("main", "plain", VALUE)
    secret = await vault.get("plain")
    assert (secret.content_type, secret.not_before, secret.expires_on, dict(secret.tags)) == (None, None, None, {})


async def test_a_named_version(emu: Emulator, vault: VaultClient) -> None:
    first = emu.set_secret("main", "db-pass", "first")
    emu.set_secret("main", "db-pass", "second")
    secret = await vault.get("db-pass", first)
    assert (secret.version, secret.value) == (first, "first")


async def test_observe_reports_each_attempt(emu: Emulator, vault: VaultClient, outcomes: list[str]) -> None:
    await warm(emu, vault)
    emu.set_secret("main", "db-pass", VALUE)
    emu.add_fault("keyvault", Fault(mode="status", status=503, count=1))
    secret = await vault.get("db-pass")  # one 503, retried
    assert secret.value == VALUE
    assert outcomes[-2:] == ["ServerError", "ok"]
    assert emu.requests("keyvault") == 2


# the challenge and the shared token


async def test_challenge_round_trip_uses_the_token_source(emu: Emulator, tokens: Tokens) -> None:
    http_challenge_cache.clear()  # process-wide in the SDK: a reused port must not skip the challenge
    emu.set_secret("main", "db-pass", VALUE)
    vault = make_client(emu, tokens)
    try:
        assert (await vault.get("db-pass")).value == VALUE
        # the unauthenticated probe answered 401 with the challenge, then the real request
        assert emu.requests("keyvault") == 2
        # the client's prefetch (outside the vault's timeout), then the SDK's own request
        assert tokens.resources == [VAULT_RESOURCE, VAULT_RESOURCE]
        await vault.get("db-pass")
        assert emu.requests("keyvault") == 3
        # only the prefetch: the SDK kept its token
        assert tokens.resources == [VAULT_RESOURCE] * 3
    finally:
        await vault.close()


async def test_challenge_for_a_foreign_resource_is_refused(emu: Emulator, tokens: Tokens) -> None:
    emu.set_secret("main", "db-pass", VALUE)
    vault = make_client(emu, tokens, verify_challenge_resource=True)
    try:
        with pytest.raises(errors.Rejected) as info:
            await vault.get("db-pass")
    finally:
        await vault.close()
    assert "verify_challenge_resource" in info.value.message
    # only the prefetch: the SDK never asked for a token to hand to a host outside the resource
    assert tokens.resources == [VAULT_RESOURCE]


async def test_token_source_failure_passes_through_unretried(emu: Emulator) -> None:
    failure = errors.Unreachable("identity endpoint", "cannot connect")
    asked: list[str] = []

    async def broken(resource: str) -> Token:
        asked.append(resource)
        raise failure

    emu.set_secret("main", "db-pass", VALUE)
    vault = VaultClient(
        "main", emu.vault_url("main"), broken, ca_file=str(emu.ca_file),
        verify_challenge_resource=False, retry=FAST,
    )
    try:
        with pytest.raises(errors.Unreachable) as info:
            await vault.get("db-pass")
    finally:
        await vault.close()
    assert info.value is failure
    assert asked == [VAULT_RESOURCE]


# failures and their families


async def test_missing_secret_and_version_are_not_found(emu: Emulator, vault: VaultClient) -> None:
    with pytest.raises(errors.NotFound) as info:
        await vault.get("nope")
    assert (info.value.status, info.value.code, info.value.upstream) == (404, "SecretNotFound", "vault main")
    emu.set_secret("main", "db-pass", VALUE)
    with pytest.raises(errors.NotFound):
        await vault.get("db-pass", "0" * 32)


async def test_denied_is_forbidden(emu: Emulator, vault: VaultClient) -> None:
    emu.set_secret("main", "db-pass", VALUE)
    emu.deny("main", "db-pass")
    with pytest.raises(errors.Forbidden) as info:
        await vault.get("db-pass")
    assert (info.value.status, info.value.code) == (403, "AccessDenied")


async def test_disabled_is_forbidden_with_its_code(emu: Emulator, vault: VaultClient) -> None:
    emu.set_secret("main", "db-pass", VALUE, enabled=False)
    with pytest.raises(errors.Forbidden) as info:
        await vault.get("db-pass")
    assert info.value.code == "SecretDisabled"
    assert "disabled" in info.value.message


async def test_server_error_after_retries(emu: Emulator, vault: VaultClient, outcomes: list[str]) -> None:
    await warm(emu, vault)
    emu.set_secret("main", "db-pass", VALUE)
    emu.add_fault("keyvault", Fault(mode="status", status=500, count=5))
    with pytest.raises(errors.ServerError) as info:
        await vault.get("db-pass")
    assert info.value.status == 500
    assert emu.requests("keyvault") == FAST.attempts
    assert outcomes[-2:] == ["ServerError", "ServerError"]


async def test_throttled_with_retry_after(emu: Emulator, vault: VaultClient) -> None:
    await warm(emu, vault)
    emu.set_secret("main", "db-pass", VALUE)
    emu.add_fault("keyvault", Fault(mode="status", status=429, count=5, retry_after=30))
    with pytest.raises(errors.Throttled) as info:
        await vault.get("db-pass")
    assert info.value.retry_after == 30
    assert emu.requests("keyvault") == 1  # too long to sleep through: the caller is told at once


async def test_refused_connection_is_unreachable(emu: Emulator, vault: VaultClient) -> None:
    await warm(emu, vault)
    await emu.refuse("keyvault", True)
    with pytest.raises(errors.Unreachable) as info:
        await vault.get("db-pass")
    assert info.value.message == "cannot connect"


async def test_dropped_connection_is_unreachable(emu: Emulator, vault: VaultClient) -> None:
    await warm(emu, vault)
    emu.set_secret("main", "db-pass", VALUE)
    emu.add_fault("keyvault", Fault(mode="drop", count=10))
    with pytest.raises(errors.Unreachable):
        await vault.get("db-pass")
    emu.clear_faults()
    assert (await vault.get("db-pass")).value == VALUE


async def test_slow_vault_times_out(emu: Emulator, tokens: Tokens) -> None:
    emu.set_secret("main", "db-pass", VALUE)
    vault = make_client(emu, tokens, retry=RetryPolicy(attempts=1, timeout=0.3))
    try:
        await vault.get("db-pass")
        emu.add_fault("keyvault", Fault(mode="delay", delay=1.0, count=1))
        with pytest.raises(errors.TimedOut):
            await vault.get("db-pass")
    finally:
        await vault.close()


async def test_untrusted_certificate_is_unreachable(emu: Emulator, tokens: Tokens) -> None:
    emu.set_secret("main", "db-pass", VALUE)
    vault = make_client(emu, tokens, ca_file="")
    try:
        with pytest.raises(errors.Unreachable):
            await vault.get("db-pass")
    finally:
        await vault.close()


async def test_closed_client_refuses(vault: VaultClient) -> None:
    await vault.close()
    with pytest.raises(errors.Unreachable, match="shutting down"):
        await vault.get("db-pass")


# input checks


def test_name_and_version_rules() -> None:
    assert valid_name("a") and valid_name("A-9" * 42 + "z") and not valid_name("a" * 128)
    assert not valid_name("") and not valid_name("under_score") and not valid_name("dot.ted")
    assert not valid_name("slash/../x") and not valid_name("ümlaut") and not valid_name("a\n")
    assert valid_version("0123abcdEF") and valid_version("a" * 64)
    assert not valid_version("a" * 65) and not valid_version("with-hyphen") and not valid_version("")


@pytest.mark.parametrize(
    ("name", "version"),
    [("", ""), ("a" * 128, ""), ("under_score", ""), ("x/../y", ""), ("ok", "bad-version"), ("ok", "../x")],
)
async def test_invalid_input_sends_no_request(
    emu: Emulator, vault: VaultClient, tokens: Tokens, name: str, version: str
) -> None:
    with pytest.raises(errors.Rejected) as info:
        await vault.get(name, version)
    assert info.value.status == 400
    assert emu.requests("keyvault") == 0
    assert tokens.resources == []


# nothing secret in messages


async def test_no_error_message_carries_the_value_or_a_token(emu: Emulator, vault: VaultClient) -> None:
    caught: list[errors.ConnectorError] = []

    async def expect_failure() -> None:
        with pytest.raises(errors.ConnectorError) as info:
            await vault.get("db-pass")
        caught.append(info.value)

    emu.set_secret("main", "db-pass", VALUE)
    assert (await vault.get("db-pass")).value == VALUE
    emu.set_enabled("main", "db-pass", False)
    await expect_failure()
    emu.set_secret("main", "db-pass", VALUE)
    for status in (400, 401, 429, 500, 503):
        emu.add_fault("keyvault", Fault(mode="status", status=status, count=FAST.attempts, retry_after=60))
        await expect_failure()
        emu.clear_faults()
    emu.deny("main", "db-pass")
    await expect_failure()
    emu.delete_secret("main", "db-pass")
    await expect_failure()
    assert len(caught) == 8
    for exc in caught:
        for text in (str(exc), repr(exc), exc.message):
            assert VALUE not in text
            assert "eyJ" not in text  # no JWT


async def test_sequential_reads_share_one_tls_connection(emu: Emulator, vault: VaultClient) -> None:
    """With a ca_file the TLS context is built once, so aiohttp can keep reusing its connection."""
    for n in range(10):
        emu.set_secret("main", "reused", f"value-{n}")
        assert (await vault.get("reused")).value == f"value-{n}"
    assert emu.requests("keyvault") >= 11  # the challenge, then ten reads
    assert emu.connections("keyvault") <= 2


async def test_a_slow_token_is_not_a_slow_vault(emu: Emulator, tokens: Tokens) -> None:
    """The token is fetched outside the vault's per-attempt timeout."""
    emu.set_secret("main", "db-pass", VALUE)
    emu.add_fault("identity", Fault(mode="delay", delay=0.6))
    vault = make_client(emu, tokens, retry=RetryPolicy(attempts=1, timeout=0.5))
    try:
        assert (await vault.get("db-pass")).value == VALUE
    finally:
        await vault.close()
