"""Every identity source, through the real IdentityClient and azure-identity, against the emulator.

``connectors.identity.IdentityClient`` drives azure-identity's protocol code (request shapes, Arc's
challenge, Entra's client-credentials exchange); the emulator plays each platform. The second half
unit-tests ``broker.service.identity_source``, which picks the source from config and environment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from broker.config import IdentityConfig, parse_config
from broker.emulator import ARC_KEY_DIR, Emulator, Fault
from broker.emulator.tokens import system_identity
from broker.errors import ConfigError
from broker.service import identity_source
from connectors import errors
from connectors.identity import IMDS_DEFAULT, Identity, IdentityClient, Source
from connectors.retry import RetryPolicy
from tests.conftest import record

VAULT = "https://vault.azure.net"
LIFETIME = 600
APP_ID = "3c3c3c3c-0000-4000-8000-0000000000a1"
WORKLOAD_APP_ID = "3c3c3c3c-0000-4000-8000-0000000000b2"
TOKEN_PATH_END = "/oauth2/v2.0/token"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

ALL_KINDS = ("app_service", "imds", "arc", "client_secret", "workload")
APP_KINDS = ("client_secret", "workload")

@pytest.fixture
async def emu(tmp_path: Path) -> AsyncIterator[Emulator]:
    # Arc's key file must sit where azure-identity looks for it (possible as root, as in CI).
    async with Emulator(token_lifetime=LIFETIME, state_dir=tmp_path / "emulator", arc_key_dir=ARC_KEY_DIR) as emulator:
        yield emulator


class Sleeps:
    """IdentityClient's sleep: records each back-off and really waits, so timing stays honest."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(delay)


MakeClient = Callable[..., IdentityClient]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    made: list[IdentityClient] = []

    def make(source: Source, retry: RetryPolicy | None = None, sleeps: Sleeps | None = None) -> IdentityClient:
        # rand=0: the smallest back-off (base_delay / 2 = 0.25 s), so the expected waits are exact.
        client = IdentityClient(
            source, retry or RetryPolicy(attempts=2, timeout=5), rand=lambda: 0.0, sleep=sleeps or Sleeps()
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def make_source(kind: str, emu: Emulator, tmp_path: Path, **overrides: Any) -> Source:
    """The Source the broker would build on each platform, pointing at the emulator."""
    if kind == "app_service":
        source = Source("app_service", endpoint=emu.identity_url, header=emu.identity_header)
    elif kind == "imds":
        source = Source("imds", endpoint=emu.imds_host)
    elif kind == "arc":
        if not emu.arc_enabled:
            pytest.skip(f"Azure Arc needs its key directory (usually root): {emu.arc_unavailable_reason}")
        # IDENTITY_ENDPOINT on an Arc machine is the full token URL; azure-identity adds only the query.
        source = Source("arc", endpoint=emu.arc_endpoint)
    elif kind == "client_secret":
        secret = record(emu.register_app(APP_ID))
        source = Source(
            "client_secret",
            client_id=APP_ID,
            tenant_id=emu.tenant_id,
            client_secret=secret,
            authority=emu.authority_host,
            ca_file=str(emu.ca_file),
        )
    else:
        emu.register_app(WORKLOAD_APP_ID)
        token_file = tmp_path / "azure-identity-token"
        token_file.write_text(emu.federated_token(WORKLOAD_APP_ID))
        source = Source(
            "workload",
            client_id=WORKLOAD_APP_ID,
            tenant_id=emu.tenant_id,
            token_file=str(token_file),
            authority=emu.authority_host,
            ca_file=str(emu.ca_file),
        )
    return dataclasses.replace(source, **overrides)


async def raises(kind: type[errors.ConnectorError], call: Awaitable[Any]) -> Any:
    with pytest.raises(kind) as caught:
        await call
    return caught.value


# every source: a token the emulator issued, for the resource asked for


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_each_source_gets_a_token_for_the_resource(
    kind: str, emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    client = make_client(make_source(kind, emu, tmp_path))
    before = time.time()
    token = await client.fetch(VAULT)
    record(token.value)
    claims = emu.verify_token(token.value, VAULT)  # signature, issuer and lifetime checked too
    assert claims["aud"] == VAULT
    assert claims["tid"] == emu.tenant_id
    if kind in APP_KINDS:
        assert claims["appid"] == (APP_ID if kind == "client_secret" else WORKLOAD_APP_ID)
        assert "xms_mirid" not in claims  # an app registration, not a managed identity
        # Entra sends a relative expires_in, which the client adds to its own request second: equal to exp,
        # or one less when the request and the answer straddle a second boundary; never later.
        assert claims["exp"] - 1 <= token.expires_on <= claims["exp"]
    else:
        assert claims["appid"] == system_identity(emu.tenant_id).client_id
        assert token.expires_on == claims["exp"]  # absolute, as the platforms send it
    assert before - 1 <= token.obtained_at <= time.time()
    assert LIFETIME - 2 <= token.lifetime <= LIFETIME + 2
    assert token.refresh_on is None  # the emulator sent no refresh_in
    assert emu.tokens_issued == 1

    sent = emu.received("identity")
    assert len(sent) == (2 if kind == "arc" else 1) == emu.requests("identity")
    last = sent[-1]
    if kind == "app_service":
        assert (last.method, last.path) == ("GET", "/msi/token")
        assert last.query == {"api-version": "2019-08-01", "resource": VAULT}
        assert last.has_header("X-IDENTITY-HEADER")
    elif kind == "imds":
        assert (last.method, last.path) == ("GET", "/metadata/identity/oauth2/token")
        assert last.query == {"api-version": "2018-02-01", "resource": VAULT}
        assert last.has_header("Metadata")
    elif kind == "arc":
        # The challenge round: no Authorization first, then Basic <key file content>.
        assert [r.has_header("Authorization") for r in sent] == [False, True]
        assert last.query == {"api-version": "2020-06-01", "resource": VAULT}
    else:
        assert (last.method, last.path) == ("POST", f"/{emu.tenant_id}{TOKEN_PATH_END}")
        assert last.form["grant_type"] == "client_credentials"
        assert last.form["scope"] == VAULT + "/.default"
        assert last.form["client_id"] == (APP_ID if kind == "client_secret" else WORKLOAD_APP_ID)
        if kind == "client_secret":
            assert last.form["client_secret"] == "[redacted]"
            assert "client_assertion" not in last.form
        else:
            assert last.form["client_assertion_type"] == JWT_BEARER
            assert last.form["client_assertion"] == "[redacted]"
            assert "client_secret" not in last.form

    # A second fetch goes upstream again: the SDK's own cache is bypassed, the broker's cache decides.
    again = await client.fetch(VAULT)
    record(again.value)
    assert again.value != token.value
    assert emu.tokens_issued == 2


@pytest.mark.parametrize("kind", APP_KINDS)
async def test_app_sources_pass_the_refresh_hint_on(
    kind: str, emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    emu.refresh_in = 120
    client = make_client(make_source(kind, emu, tmp_path))
    started = int(time.time())
    token = await client.fetch(VAULT)
    record(token.value)
    assert token.refresh_on is not None
    assert started + 120 <= token.refresh_on <= time.time() + 120


async def test_arc_works_with_a_key_directory_azure_identity_is_told_about(
    tmp_path: Path, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arc's challenge without root: the key goes to tmp_path, and azure-identity's path check is pointed there.

    Only the directory check is redirected; the 401, the key file read and the Basic header are the SDK's.
    """
    from azure.identity._credentials import azure_arc

    key_dir = tmp_path / "azcmagent" / "tokens"
    monkeypatch.setattr(azure_arc, "_get_key_file_path", lambda: str(key_dir))
    async with Emulator(arc_key_dir=key_dir, state_dir=tmp_path / "emulator") as emu:
        assert emu.arc_enabled, emu.arc_unavailable_reason
        key_file = emu.arc_key_file
        assert key_file.parent == key_dir
        assert key_file.suffix == ".key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        client = make_client(Source("arc", endpoint=emu.arc_endpoint))
        token = await client.fetch("https://management.azure.com")
        record(token.value)
        assert emu.verify_token(token.value, "https://management.azure.com")["aud"] == "https://management.azure.com"
        assert emu.requests("identity") == 2
        await client.close()
    assert not key_file.exists()
    assert not key_dir.exists()  # the emulator made it, so it went too


async def test_arc_key_outside_the_agent_directory_is_refused_by_azure_identity(
    tmp_path: Path, make_client: MakeClient
) -> None:
    # Without the redirect above, azure-identity refuses a key file anywhere but /var/opt/azcmagent/tokens:
    # the check that makes the emulator default to that directory. No token is issued.
    async with Emulator(arc_key_dir=tmp_path / "tokens", state_dir=tmp_path / "emulator") as emu:
        client = make_client(Source("arc", endpoint=emu.arc_endpoint), RetryPolicy(attempts=1, timeout=5))
        await raises(errors.ConnectorError, client.fetch(VAULT))
        assert emu.tokens_issued == 0
        assert emu.requests("identity") == 1  # the challenge; the SDK never sent the key
        await client.close()


async def test_arc_with_a_configured_client_id_does_not_hand_out_another_identity(
    emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    wanted = "4d4d4d4d-0000-4000-8000-00000000c0de"
    client = make_client(make_source("arc", emu, tmp_path, client_id=wanted), RetryPolicy(attempts=1, timeout=5))
    try:
        token = await client.fetch(VAULT)
    except errors.ConnectorError:
        return  # refusing is a right answer
    record(token.value)
    assert emu.verify_token(token.value, VAULT)["appid"] == wanted, "Arc answered for the system identity"


# user-assigned identities: each platform's parameter names


@pytest.mark.parametrize(
    ("kind", "id_kind", "param", "claim"),
    [
        ("app_service", "client_id", "client_id", "appid"),
        ("app_service", "object_id", "principal_id", "oid"),
        ("app_service", "mi_res_id", "mi_res_id", "xms_mirid"),
        ("imds", "client_id", "client_id", "appid"),
        ("imds", "object_id", "object_id", "oid"),
        ("imds", "mi_res_id", "msi_res_id", "xms_mirid"),
    ],
)
async def test_user_assigned_identities_use_the_platforms_parameter_names(
    kind: str, id_kind: Any, param: str, claim: str, emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    value = (
        "/subscriptions/5e5e/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app"
        if id_kind == "mi_res_id"
        else "6f6f6f6f-0000-4000-8000-0000000000ff"
    )
    client = make_client(make_source(kind, emu, tmp_path))
    token = await client.fetch(VAULT, Identity(id_kind, value))
    record(token.value)
    assert emu.verify_token(token.value, VAULT)[claim] == value
    query = emu.received("identity")[-1].query
    assert query[param] == value
    # Only the platform's spelling: one id parameter besides api-version and resource.
    assert set(query) == {"api-version", "resource", param}


@pytest.mark.parametrize("kind", ["app_service", "imds"])
async def test_the_sources_default_client_id_names_a_user_assigned_identity(
    kind: str, emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    default = "7a7a7a7a-0000-4000-8000-0000000000d1"
    client = make_client(make_source(kind, emu, tmp_path, client_id=default))
    token = await client.fetch(VAULT)
    record(token.value)
    assert emu.verify_token(token.value, VAULT)["appid"] == default
    # An explicitly named identity replaces the default rather than joining it (two ids would be a 400).
    other = await client.fetch(VAULT, Identity("object_id", "8b8b8b8b-0000-4000-8000-0000000000d2"))
    record(other.value)
    assert emu.received("identity")[-1].query.get("client_id") is None


@pytest.mark.parametrize("kind", [*APP_KINDS, "arc"])
async def test_sources_with_one_identity_refuse_user_assigned_ones_without_asking(
    kind: str, emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    client = make_client(make_source(kind, emu, tmp_path))
    failure = await raises(errors.Rejected, client.fetch(VAULT, Identity("client_id", APP_ID)))
    assert failure.status == 400
    assert emu.requests("identity") == 0


# Entra ID: credentials that do not fit


async def test_wrong_client_secret_is_rejected_without_repeating_it(
    emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    wrong = "wrong-secret-Zq8~not-the-registered-one"
    source = make_source("client_secret", emu, tmp_path, client_secret=wrong)
    failure = await raises(errors.Rejected, make_client(source).fetch(VAULT))
    assert failure.status == 401
    assert failure.code == "invalid_client"
    assert "AADSTS7000215" in failure.message
    assert wrong not in str(failure)
    assert source.client_secret not in repr(source)
    assert emu.requests("identity") == 1  # a 4xx is final
    assert emu.tokens_issued == 0


async def test_unknown_app_and_tenant_are_rejected(emu: Emulator, tmp_path: Path, make_client: MakeClient) -> None:
    unknown = make_source("client_secret", emu, tmp_path, client_id="9c9c9c9c-0000-4000-8000-00000000dead")
    failure = await raises(errors.Rejected, make_client(unknown).fetch(VAULT))
    assert (failure.status, failure.code) == (400, "unauthorized_client")
    assert "AADSTS700016" in failure.message
    elsewhere = make_source("client_secret", emu, tmp_path, tenant_id="0d0d0d0d-0000-4000-8000-000000000000")
    failure = await raises(errors.Rejected, make_client(elsewhere).fetch(VAULT))
    assert (failure.status, failure.code) == (400, "invalid_request")
    assert "AADSTS90002" in failure.message
    assert emu.tokens_issued == 0


async def test_workload_token_from_another_issuer_is_rejected_and_masked(
    emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    source = make_source("workload", emu, tmp_path)
    async with Emulator(arc_key_dir=None) as stranger:
        # Same issuer URL (same tenant), different signing key: only the signature check can tell.
        stranger.register_app(WORKLOAD_APP_ID)
        foreign = stranger.federated_token(WORKLOAD_APP_ID)
    Path(source.token_file).write_text(foreign)
    failure = await raises(errors.Rejected, make_client(source).fetch(VAULT))
    assert (failure.status, failure.code) == (401, "invalid_client")
    assert "AADSTS700027" in failure.message
    assert foreign not in str(failure)
    assert emu.tokens_issued == 0


async def test_workload_subject_must_be_federated(emu: Emulator, tmp_path: Path, make_client: MakeClient) -> None:
    source = make_source("workload", emu, tmp_path)
    emu.register_app(APP_ID)  # a second app, trusting another service account
    Path(source.token_file).write_text(emu.federated_token(APP_ID, "system:serviceaccount:other:sa"))
    failure = await raises(errors.Rejected, make_client(source).fetch(VAULT))
    assert failure.status == 401
    assert "AADSTS700213" in failure.message
    assert "system:serviceaccount:other:sa" in failure.message  # the subject is not secret, and says why


# retries: which failures are tried again, and how soon


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_a_server_error_is_retried_once_then_succeeds(
    kind: str, emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    sleeps = Sleeps()
    client = make_client(make_source(kind, emu, tmp_path), sleeps=sleeps)
    emu.add_fault("identity", Fault(status=500))
    token = await client.fetch(VAULT)
    record(token.value)
    assert emu.verify_token(token.value, VAULT)["aud"] == VAULT
    # Arc's retry starts over with the challenge: 500, then 401 + 200.
    assert emu.requests("identity") == (3 if kind == "arc" else 2)
    assert sleeps.delays == [0.25]
    assert emu.tokens_issued == 1


@pytest.mark.parametrize("kind", ["app_service", "client_secret"])
async def test_throttled_with_a_short_retry_after_waits_it_out(
    kind: str, emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    sleeps = Sleeps()
    client = make_client(make_source(kind, emu, tmp_path), sleeps=sleeps)
    emu.add_fault("identity", Fault(status=429, retry_after=1))
    started = time.monotonic()
    token = await client.fetch(VAULT)
    record(token.value)
    assert sleeps.delays == [1.0]  # the upstream's Retry-After, not the back-off
    assert 1.0 <= time.monotonic() - started < 3.0
    assert emu.requests("identity") == 2


async def test_throttled_with_a_long_retry_after_fails_at_once(
    emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    sleeps = Sleeps()
    client = make_client(make_source("imds", emu, tmp_path), RetryPolicy(attempts=4, timeout=5), sleeps)
    emu.add_fault("identity", Fault(status=429, retry_after=30))
    started = time.monotonic()
    failure = await raises(errors.Throttled, client.fetch(VAULT))
    assert failure.retry_after == 30
    assert time.monotonic() - started < 1.0
    assert sleeps.delays == []
    assert emu.requests("identity") == 1


async def test_imds_404_is_final(emu: Emulator, tmp_path: Path, make_client: MakeClient) -> None:
    sleeps = Sleeps()
    client = make_client(make_source("imds", emu, tmp_path), RetryPolicy(attempts=4, timeout=5), sleeps)
    emu.add_fault("identity", Fault(status=404))
    failure = await raises(errors.Rejected, client.fetch(VAULT))
    assert (failure.status, failure.code) == (404, "not_found")
    assert emu.requests("identity") == 1
    assert sleeps.delays == []


async def test_imds_410_is_retried(emu: Emulator, tmp_path: Path, make_client: MakeClient) -> None:
    sleeps = Sleeps()
    client = make_client(make_source("imds", emu, tmp_path), RetryPolicy(attempts=4, timeout=5), sleeps)
    emu.add_fault("identity", Fault(status=410, count=2))
    token = await client.fetch(VAULT)
    record(token.value)
    assert emu.requests("identity") == 3
    assert sleeps.delays == [0.25, 0.5]  # exponential back-off (rand=0: half of 0.5 s, then of 1 s)


@pytest.mark.parametrize("kind", ["imds", "workload"])
async def test_a_slow_answer_times_out(kind: str, emu: Emulator, tmp_path: Path, make_client: MakeClient) -> None:
    client = make_client(make_source(kind, emu, tmp_path), RetryPolicy(attempts=1, timeout=0.5))
    emu.add_fault("identity", Fault(mode="delay", delay=3))
    started = time.monotonic()
    failure = await raises(errors.TimedOut, client.fetch(VAULT))
    assert "0.5s" in failure.message
    assert 0.45 <= time.monotonic() - started < 2.0
    assert emu.tokens_issued == 0
    token = await client.fetch(VAULT)  # the client is usable after a timeout
    record(token.value)


@pytest.mark.parametrize(("kind", "port"), [("app_service", "identity"), ("client_secret", "keyvault")])
async def test_refused_connections_are_unreachable(
    kind: str, port: Any, emu: Emulator, tmp_path: Path, make_client: MakeClient
) -> None:
    sleeps = Sleeps()
    client = make_client(make_source(kind, emu, tmp_path), RetryPolicy(attempts=2, timeout=5), sleeps)
    await emu.refuse(port, True)  # Entra lives on the HTTPS port, so it is refused with it
    await raises(errors.Unreachable, client.fetch(VAULT))
    assert sleeps.delays == [0.25]  # transient: tried twice
    assert emu.requests("identity") == 0
    await emu.refuse(port, False)
    token = await client.fetch(VAULT)
    record(token.value)


# identity_source: which source the broker's config and environment choose


def identity_config(body: str = "", environ: dict[str, str] | None = None) -> IdentityConfig:
    return parse_config(f"[identity]\n{body}", environ=environ or {}).identity


def source_for(environ: dict[str, str], body: str = "") -> Source:
    return identity_source(identity_config(body, environ), environ)


def config_problem(environ: dict[str, str], body: str) -> str:
    with pytest.raises(ConfigError) as caught:
        source_for(environ, body)
    assert len(caught.value.problems) == 1
    return caught.value.problems[0]


APP_SERVICE_ENV = {"IDENTITY_ENDPOINT": "http://127.0.0.1:1/msi/token", "IDENTITY_HEADER": "h-e-a-d-e-r"}
ARC_ENV = {"IDENTITY_ENDPOINT": "http://127.0.0.1:2/metadata/identity/oauth2/token", "IMDS_ENDPOINT": "http://127.0.0.1:2"}
WORKLOAD_ENV = {
    "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
    "AZURE_TENANT_ID": "1e1e1e1e-0000-4000-8000-000000000001",
    "AZURE_CLIENT_ID": "2f2f2f2f-0000-4000-8000-000000000002",
}


@pytest.mark.parametrize(
    ("environ", "kind"),
    [
        ({**ARC_ENV, **WORKLOAD_ENV, **APP_SERVICE_ENV}, "app_service"),  # App Service wins over everything
        ({**ARC_ENV, **WORKLOAD_ENV}, "arc"),  # then Arc
        ({"IDENTITY_ENDPOINT": "http://127.0.0.1:3/x", **WORKLOAD_ENV}, "workload"),  # an endpoint alone is neither
        ({}, "imds"),
    ],
    ids=["app_service", "arc", "workload", "imds"],
)
def test_auto_picks_the_first_platform_whose_environment_is_complete(environ: dict[str, str], kind: str) -> None:
    source = source_for(environ)
    assert source.kind == kind
    if kind == "app_service":
        assert (source.endpoint, source.header) == (APP_SERVICE_ENV["IDENTITY_ENDPOINT"], "h-e-a-d-e-r")
    elif kind == "arc":
        assert source.endpoint == ARC_ENV["IDENTITY_ENDPOINT"]
    elif kind == "workload":
        assert source.token_file == WORKLOAD_ENV["AZURE_FEDERATED_TOKEN_FILE"]
        assert source.tenant_id == WORKLOAD_ENV["AZURE_TENANT_ID"]
        assert source.client_id == WORKLOAD_ENV["AZURE_CLIENT_ID"]
        assert source.authority == ""  # azure-identity's default, or AZURE_AUTHORITY_HOST when set
    else:
        assert source.endpoint == IMDS_DEFAULT


def test_imds_endpoint_comes_from_config_then_pod_identity_host() -> None:
    pod = {"AZURE_POD_IDENTITY_AUTHORITY_HOST": "http://127.0.0.1:4"}
    assert source_for(pod).endpoint == "http://127.0.0.1:4"
    configured = source_for(pod, 'source = "imds"\nendpoint = "http://127.0.0.1:5"\nclient_id = "c-1"')
    assert (configured.endpoint, configured.client_id) == ("http://127.0.0.1:5", "c-1")


def test_configured_values_beat_the_environment_for_app_registrations() -> None:
    environ = {**WORKLOAD_ENV, "AZURE_AUTHORITY_HOST": "https://login.example"}
    source = source_for(environ, 'source = "workload"\ntenant_id = "t-cfg"\nclient_id = "c-cfg"')
    assert (source.kind, source.tenant_id, source.client_id) == ("workload", "t-cfg", "c-cfg")
    assert source.authority == "https://login.example"


@pytest.mark.parametrize(
    ("environ", "body", "expected"),
    [
        (
            {"IDENTITY_ENDPOINT": "http://127.0.0.1:1/msi/token"},
            'source = "app_service"',
            "identity.source: app_service needs IDENTITY_ENDPOINT and IDENTITY_HEADER in the broker's environment",
        ),
        (
            {"IDENTITY_HEADER": "h"},
            'source = "app_service"',
            "identity.source: app_service needs IDENTITY_ENDPOINT and IDENTITY_HEADER in the broker's environment",
        ),
        ({}, 'source = "arc"', "identity.source: arc needs IDENTITY_ENDPOINT in the broker's environment"),
        (
            {k: v for k, v in WORKLOAD_ENV.items() if k != "AZURE_FEDERATED_TOKEN_FILE"},
            'source = "workload"',
            "identity.source: workload needs AZURE_FEDERATED_TOKEN_FILE, a client_id (or AZURE_CLIENT_ID) and a "
            "tenant_id (or AZURE_TENANT_ID)",
        ),
        (
            {k: v for k, v in WORKLOAD_ENV.items() if k != "AZURE_TENANT_ID"},
            'source = "workload"',
            "identity.source: workload needs AZURE_FEDERATED_TOKEN_FILE, a client_id (or AZURE_CLIENT_ID) and a "
            "tenant_id (or AZURE_TENANT_ID)",
        ),
        ({}, 'source = "dev"', "identity.source: 'dev' needs the embedded emulator (tokenbroker serve --dev)"),
    ],
    ids=["app_service-no-header", "app_service-no-endpoint", "arc", "workload-no-file", "workload-no-tenant", "dev"],
)
def test_incomplete_environments_are_named(environ: dict[str, str], body: str, expected: str) -> None:
    assert config_problem(environ, body) == expected


CLIENT_SECRET_CONFIG = (
    'source = "client_secret"\ntenant_id = "t-1"\nclient_id = "c-1"\nclient_secret_env = "APP_SECRET"'
)


def test_client_secret_comes_from_the_named_variable() -> None:
    source = source_for({"APP_SECRET": "s3cr3t-value"}, CLIENT_SECRET_CONFIG)
    assert (source.kind, source.tenant_id, source.client_id, source.client_secret) == (
        "client_secret",
        "t-1",
        "c-1",
        "s3cr3t-value",
    )
    assert "s3cr3t-value" not in repr(source)


def test_client_secret_variable_missing_is_named() -> None:
    # Loading the config checks the variable already...
    with pytest.raises(ConfigError) as at_load:
        identity_config(CLIENT_SECRET_CONFIG, {})
    assert "identity.client_secret_env: environment variable APP_SECRET is not set" in at_load.value.problems
    # ...and identity_source again, for the environment the broker actually starts with.
    cfg = identity_config(CLIENT_SECRET_CONFIG, {"APP_SECRET": "s3cr3t-value"})
    with pytest.raises(ConfigError) as at_start:
        identity_source(cfg, {})
    assert at_start.value.problems == ("identity.client_secret_env: environment variable APP_SECRET is not set",)


async def test_dev_source_is_the_emulators_app_service(emu: Emulator, make_client: MakeClient) -> None:
    source = identity_source(identity_config('source = "dev"\nclient_id = "c-dev"'), {}, emu)
    assert source == Source("app_service", endpoint=emu.identity_url, header=emu.identity_header, client_id="c-dev")
    token = await make_client(source).fetch(VAULT)
    record(token.value)
    assert emu.verify_token(token.value, VAULT)["appid"] == "c-dev"


async def test_client_secret_from_config_reaches_the_emulator(emu: Emulator, make_client: MakeClient) -> None:
    secret = record(emu.register_app(APP_ID))
    body = (
        f'source = "client_secret"\ntenant_id = "{emu.tenant_id}"\nclient_id = "{APP_ID}"\n'
        f'client_secret_env = "APP_SECRET"\nendpoint = "{emu.authority_host}"\nca_file = "{emu.ca_file}"'
    )
    environ = {"APP_SECRET": secret}
    source = identity_source(identity_config(body, environ), environ)
    assert source.authority == emu.authority_host
    token = await make_client(source).fetch(VAULT)
    record(token.value)
    assert emu.verify_token(token.value, VAULT)["appid"] == APP_ID


async def test_an_http_authority_is_refused_as_configuration(make_client: MakeClient) -> None:
    body = 'source = "client_secret"\ntenant_id = "t-1"\nclient_id = "c-1"\nclient_secret_env = "S"\n'
    environ = {"S": "secret-value"}
    source: Source | None = None
    problems: tuple[str, ...] = ()
    try:  # refused when the config is loaded or the broker starts, naming the key: the best answer
        source = identity_source(identity_config(body + 'endpoint = "http://127.0.0.1:9"', environ), environ)
    except ConfigError as exc:
        problems = exc.problems
    if source is None:
        assert any(problem.startswith("identity.endpoint") for problem in problems), problems
        return
    sleeps = Sleeps()
    failure = await raises(errors.ConnectorError, make_client(source, sleeps=sleeps).fetch(VAULT))
    assert isinstance(failure, errors.Rejected)
    assert "https" in failure.message
    assert sleeps.delays == []  # a configuration mistake does not get better by asking again


async def test_a_missing_token_file_is_named(emu: Emulator, tmp_path: Path, make_client: MakeClient) -> None:
    source = make_source("workload", emu, tmp_path, token_file=str(tmp_path / "not-mounted-yet"))
    failure = await raises(errors.ConnectorError, make_client(source).fetch(VAULT))
    assert emu.requests("identity") == 0
    assert "connection" not in failure.message
    assert "not-mounted-yet" in failure.message or "token file" in failure.message
