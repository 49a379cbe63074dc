"""The emulator, driven by the real azure-identity and azure-keyvault-secrets clients where possible."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import aiohttp
import jwt
import pytest
from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.secrets._shared import http_challenge_cache
from azure.keyvault.secrets.aio import SecretClient

from broker.emulator import Emulator, Fault, InvalidToken, seed_demo
from broker.emulator.tokens import TokenIssuer, system_identity

VAULT = "https://vault.azure.net"
SCOPE = VAULT + "/.default"
LIFETIME = 30

@pytest.fixture(autouse=True)
def _fresh_challenge_cache() -> Iterator[None]:
    # The SDK caches Key Vault challenges per origin for the whole process; a port reused by a later
    # test would otherwise skip the unauthenticated first request and change what the test sees.
    http_challenge_cache.clear()
    yield
    http_challenge_cache.clear()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator(token_lifetime=LIFETIME) as emu:
        yield emu


@pytest.fixture
def app_service_env(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", emulator.identity_url)
    monkeypatch.setenv("IDENTITY_HEADER", emulator.identity_header)


@pytest.fixture
async def credential(app_service_env: None) -> AsyncIterator[ManagedIdentityCredential]:
    async with ManagedIdentityCredential(retry_total=0) as cred:
        yield cred


@pytest.fixture
async def vault_client(
    emulator: Emulator, credential: ManagedIdentityCredential
) -> AsyncIterator[Callable[[str], SecretClient]]:
    clients: list[SecretClient] = []

    def make(vault: str = "default") -> SecretClient:
        client = SecretClient(
            vault_url=emulator.vault_url(vault),
            credential=credential,
            verify_challenge_resource=False,
            connection_verify=str(emulator.ca_file),
            retry_total=0,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def tls_context(emulator: Emulator) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(emulator.ca_file))


async def app_service_token(
    http: aiohttp.ClientSession, emulator: Emulator, resource: str = VAULT, **params: str
) -> dict[str, Any]:
    async with http.get(
        emulator.identity_url,
        params={"api-version": "2019-08-01", "resource": resource, **params},
        headers={"X-IDENTITY-HEADER": emulator.identity_header},
    ) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def kv_get(
    http: aiohttp.ClientSession, emulator: Emulator, path: str, token: str | None, **params: str
) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.get(
        emulator.keyvault_base + path,
        params={"api-version": "7.5", **params},
        headers=headers,
        ssl=tls_context(emulator),
    ) as response:
        return response.status, dict(response.headers), await response.json()


# managed identity: the real azure-identity clients


async def test_app_service_credential_gets_a_token_key_vault_accepts(
    emulator: Emulator, credential: ManagedIdentityCredential
) -> None:
    before = time.time()
    token = await credential.get_token(SCOPE)
    claims = emulator.verify_token(token.token, VAULT)
    assert claims["aud"] == VAULT
    assert claims["iss"] == f"https://sts.windows.net/{emulator.tenant_id}/"
    assert claims["tid"] == emulator.tenant_id
    assert claims["exp"] == token.expires_on
    assert claims["exp"] - claims["iat"] in (LIFETIME, LIFETIME + 1)
    assert claims["exp"] >= before + LIFETIME
    assert claims["nbf"] <= time.time()
    assert claims["oid"] == claims["sub"]
    assert claims["appid"] == system_identity(emulator.tenant_id).client_id
    assert jwt.get_unverified_header(token.token)["typ"] == "JWT"
    assert emulator.tokens_issued == 1
    assert emulator.requests("identity") == 1


async def test_imds_credential_uses_the_emulator_as_imds(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", emulator.imds_host)
    async with ManagedIdentityCredential() as cred:
        token = await cred.get_token(SCOPE)
    assert emulator.verify_token(token.token, VAULT)["aud"] == VAULT
    assert emulator.requests("identity") == 1
    assert emulator.tokens_issued == 1


async def test_user_assigned_client_id_is_reflected(emulator: Emulator, app_service_env: None) -> None:
    client_id = "0f6b1d2c-1111-4a4a-8b8b-123456789abc"
    async with ManagedIdentityCredential(client_id=client_id, retry_total=0) as cred:
        token = await cred.get_token(SCOPE)
    claims = emulator.verify_token(token.token, VAULT)
    assert claims["appid"] == client_id
    assert claims["oid"] != system_identity(emulator.tenant_id).object_id


@pytest.mark.parametrize(
    ("param", "claim"),
    [("object_id", "oid"), ("principal_id", "oid"), ("mi_res_id", "xms_mirid"), ("client_id", "appid")],
)
async def test_user_assigned_ids_reach_the_claims(
    emulator: Emulator, http: aiohttp.ClientSession, param: str, claim: str
) -> None:
    value = "/subscriptions/x/uami" if param == "mi_res_id" else "5a5a5a5a-0000-4000-8000-000000000005"
    body = await app_service_token(http, emulator, **{param: value})
    claims = emulator.verify_token(body["access_token"], VAULT)
    assert claims[claim] == value
    assert body["client_id"] == claims["appid"]


async def test_app_service_answer_shape(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    first = await app_service_token(http, emulator)
    second = await app_service_token(http, emulator)
    assert set(first) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
    assert first["resource"] == VAULT
    assert first["token_type"] == "Bearer"
    assert isinstance(first["expires_on"], str)
    assert int(first["expires_on"]) == emulator.verify_token(first["access_token"], VAULT)["exp"]
    assert first["access_token"] != second["access_token"]
    uti = {emulator.verify_token(b["access_token"], VAULT)["uti"] for b in (first, second)}
    assert len(uti) == 2


async def test_refresh_in_and_lifetime_change_at_runtime(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    assert "refresh_in" not in await app_service_token(http, emulator)
    emulator.refresh_in = 10
    emulator.token_lifetime = 5
    body = await app_service_token(http, emulator)
    assert body["refresh_in"] == 10
    claims = emulator.verify_token(body["access_token"], VAULT)
    assert claims["exp"] - claims["iat"] in (5, 6)
    async with http.get(
        emulator.imds_host + "/metadata/identity/oauth2/token",
        params={"api-version": "2018-02-01", "resource": VAULT},
        headers={"Metadata": "true"},
    ) as response:
        imds = await response.json()
    assert imds["refresh_in"] == "10"
    with pytest.raises(ValueError, match="token_lifetime"):
        emulator.token_lifetime = 0


def test_token_times_are_whole_seconds_rounded_up() -> None:
    issuer = TokenIssuer("t", clock=lambda: 1000.25)
    identity = system_identity("t")
    token = issuer.issue(VAULT, identity, 30)
    claims = jwt.decode(token.access_token, options={"verify_signature": False})
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (1000, 1000, 1031)
    short = issuer.issue(VAULT, identity, 0.5)
    assert short.expires_on == 1001  # never shorter than asked
    exact = TokenIssuer("t", clock=lambda: 1000.0).issue(VAULT, identity, 30)
    assert exact.expires_on - exact.not_before == 30


def test_verify_rejects_foreign_expired_and_wrong_audience_tokens() -> None:
    issuer = TokenIssuer("t")
    identity = system_identity("t")
    good = issuer.issue(VAULT, identity, 60).access_token
    assert issuer.verify(good, VAULT + "/")["aud"] == VAULT
    with pytest.raises(InvalidToken) as wrong_aud:
        issuer.verify(issuer.issue("https://management.azure.com", identity, 60).access_token, VAULT)
    assert wrong_aud.value.problem == "audience"
    with pytest.raises(InvalidToken) as foreign:
        TokenIssuer("t").verify(good, VAULT)
    assert foreign.value.problem == "signature"
    stale = TokenIssuer("t", clock=lambda: time.time() - 120)
    with pytest.raises(InvalidToken) as expired:
        stale.verify(stale.issue(VAULT, identity, 60).access_token, VAULT)
    assert expired.value.problem == "expired"
    with pytest.raises(InvalidToken) as garbage:
        issuer.verify("not-a-jwt", VAULT)
    assert garbage.value.problem == "malformed"


@pytest.mark.parametrize(
    ("params", "headers", "status", "error"),
    [
        ({"api-version": "2019-08-01", "resource": VAULT}, {}, 401, "unauthorized_client"),
        ({"api-version": "2019-08-01", "resource": VAULT}, {"X-IDENTITY-HEADER": "wrong"}, 401, None),
        ({"api-version": "2019-08-01"}, None, 400, "invalid_request"),
        ({"api-version": "2019-08-01", "resource": SCOPE}, None, 400, "invalid_resource"),
        ({"resource": VAULT}, None, 400, "invalid_request"),
        ({"api-version": "2017-09-01", "resource": VAULT}, None, 400, "invalid_request"),
        (
            {"api-version": "2019-08-01", "resource": VAULT, "client_id": "a", "object_id": "b"},
            None,
            400,
            None,
        ),
    ],
    ids=["no-header", "wrong-header", "no-resource", "scope", "no-api-version", "old-api", "two-ids"],
)
async def test_app_service_rejects_bad_requests(
    emulator: Emulator,
    http: aiohttp.ClientSession,
    params: dict[str, str],
    headers: dict[str, str] | None,
    status: int,
    error: str | None,
) -> None:
    sent = {"X-IDENTITY-HEADER": emulator.identity_header} if headers is None else headers
    async with http.get(emulator.identity_url, params=params, headers=sent) as response:
        body = await response.json()
        assert response.status == status
    assert "access_token" not in body
    assert body["error_description"]
    if error is not None:
        assert body["error"] == error
    assert emulator.tokens_issued == 0


@pytest.mark.parametrize(
    ("params", "headers", "description"),
    [
        ({"api-version": "2018-02-01", "resource": VAULT}, {}, "Required metadata header not specified"),
        ({"resource": VAULT}, {"Metadata": "true"}, "Required query variable 'api-version' is missing"),
        ({"api-version": "2018-02-01"}, {"Metadata": "true"}, "Required audience parameter not specified"),
    ],
)
async def test_imds_rejects_bad_requests(
    emulator: Emulator,
    http: aiohttp.ClientSession,
    params: dict[str, str],
    headers: dict[str, str],
    description: str,
) -> None:
    async with http.get(
        emulator.imds_host + "/metadata/identity/oauth2/token", params=params, headers=headers
    ) as response:
        assert response.status == 400
        assert await response.json() == {"error": "invalid_request", "error_description": description}


async def test_imds_answer_is_all_strings(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    async with http.get(
        emulator.imds_host + "/metadata/identity/oauth2/token",
        params={"api-version": "2018-02-01", "resource": VAULT, "object_id": "obj-1"},
        headers={"Metadata": "true"},
    ) as response:
        body = await response.json()
    assert set(body) == {
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    }
    assert all(isinstance(v, str) for v in body.values())
    assert int(body["expires_on"]) - int(body["not_before"]) == int(body["expires_in"])
    assert emulator.verify_token(body["access_token"], VAULT)["oid"] == "obj-1"


async def test_post_form_like_azure_automation(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    form = {"resource": "https://management.azure.com/"}
    async with http.post(
        emulator.identity_url, data=form, headers={"X-IDENTITY-HEADER": emulator.identity_header}
    ) as response:
        assert response.status == 200
        body = await response.json()
    assert body["resource"] == "https://management.azure.com/"
    assert emulator.verify_token(body["access_token"], "https://management.azure.com/")["aud"] == (
        "https://management.azure.com/"
    )
    async with http.post(emulator.identity_url, data=form) as response:
        assert response.status == 401
        assert "access_token" not in await response.json()


# key vault: the real SecretClient over TLS


async def test_get_latest_and_a_version(
    emulator: Emulator, vault_client: Callable[[str], SecretClient]
) -> None:
    expires = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = emulator.set_secret("default", "db-password", "one")
    second = emulator.set_secret(
        "default",
        "db-password",
        "two",
        content_type="text/plain",
        tags={"env": "test"},
        not_before=datetime(2020, 1, 1, tzinfo=UTC),
        expires_on=expires,
    )
    assert len(second) == 32
    assert int(second, 16) >= 0
    assert first != second
    client = vault_client("default")
    latest = await client.get_secret("db-password")
    assert latest.value == "two"
    assert latest.properties.version == second
    assert latest.properties.content_type == "text/plain"
    assert latest.properties.tags == {"env": "test"}
    assert latest.properties.enabled is True
    assert latest.properties.expires_on == expires
    assert latest.properties.recovery_level == "Recoverable+Purgeable"
    assert latest.id == f"{emulator.keyvault_base}/secrets/db-password/{second}"
    older = await client.get_secret("db-password", first)
    assert older.value == "one"
    assert older.properties.tags is None


async def test_vaults_are_paths_on_one_port(
    emulator: Emulator, vault_client: Callable[[str], SecretClient]
) -> None:
    emulator.set_secret("default", "shared", "from-default")
    emulator.set_secret("demo", "shared", "from-demo")
    emulator.set_secret("other-vault", "shared", "from-other")
    assert emulator.vault_url("default") == emulator.keyvault_base
    assert emulator.vault_url("Demo") == emulator.keyvault_base + "/demo"
    assert (await vault_client("default").get_secret("shared")).value == "from-default"
    assert (await vault_client("demo").get_secret("shared")).value == "from-demo"
    assert (await vault_client("other-vault").get_secret("SHARED")).value == "from-other"
    with pytest.raises(ResourceNotFoundError):
        await vault_client("empty-vault").get_secret("shared")
    with pytest.raises(ValueError, match="invalid vault name"):
        emulator.vault_url("secrets")


async def test_listing_secrets_and_versions(
    emulator: Emulator, vault_client: Callable[[str], SecretClient]
) -> None:
    first = emulator.set_secret("demo", "a", "1")
    second = emulator.set_secret("demo", "a", "2")
    emulator.set_secret("demo", "b", "3", enabled=False)
    emulator.set_secret("default", "elsewhere", "4")
    client = vault_client("demo")
    listed = {p.name: p async for p in client.list_properties_of_secrets()}
    assert set(listed) == {"a", "b"}
    assert listed["b"].enabled is False
    assert listed["a"].version is None  # Key Vault lists secrets without their versions
    versions = [p.version async for p in client.list_properties_of_secret_versions("a")]
    assert versions == [first, second]


async def test_missing_secret_and_version_are_404(
    emulator: Emulator, vault_client: Callable[[str], SecretClient]
) -> None:
    client = vault_client("default")
    with pytest.raises(ResourceNotFoundError) as missing:
        await client.get_secret("nope")
    assert missing.value.error is not None
    assert missing.value.error.code == "SecretNotFound"
    assert "A secret with (name/id) nope was not found in this key vault" in str(missing.value)
    emulator.set_secret("default", "there", "v")
    with pytest.raises(ResourceNotFoundError):
        await client.get_secret("there", "0" * 32)
    emulator.delete_secret("default", "there")
    with pytest.raises(ResourceNotFoundError):
        await client.get_secret("there")


async def test_denied_secret_is_403_access_denied(
    emulator: Emulator, vault_client: Callable[[str], SecretClient]
) -> None:
    emulator.set_secret("demo", "locked", "v")
    emulator.set_secret("demo", "open", "ok")
    emulator.deny("demo", "locked")
    client = vault_client("demo")
    with pytest.raises(HttpResponseError) as denied:
        await client.get_secret("locked")
    assert denied.value.status_code == 403
    assert denied.value.error is not None
    assert denied.value.error.code == "Forbidden"
    assert denied.value.error.innererror == {"code": "AccessDenied"}
    assert "does not have secrets get permission on key vault 'demo" in str(denied.value.error.message)
    assert (await client.get_secret("open")).value == "ok"


async def test_disabled_version_is_403_secret_disabled(
    emulator: Emulator, vault_client: Callable[[str], SecretClient]
) -> None:
    old = emulator.set_secret("default", "rotating", "old")
    emulator.set_secret("default", "rotating", "new")
    emulator.set_enabled("default", "rotating", False)
    client = vault_client("default")
    with pytest.raises(HttpResponseError) as disabled:
        await client.get_secret("rotating")
    assert disabled.value.status_code == 403
    assert disabled.value.error is not None
    assert disabled.value.error.innererror == {"code": "SecretDisabled"}
    assert disabled.value.error.message == "Operation get is not allowed on a disabled secret."
    assert (await client.get_secret("rotating", old)).value == "old"
    emulator.set_enabled("default", "rotating", True)
    assert (await client.get_secret("rotating")).value == "new"
    emulator.set_secret("default", "born-disabled", "x", enabled=False)
    with pytest.raises(HttpResponseError, match="disabled"):
        await client.get_secret("born-disabled")


async def test_set_secret_through_the_sdk(
    emulator: Emulator, vault_client: Callable[[str], SecretClient]
) -> None:
    client = vault_client("demo")
    created = await client.set_secret("from-sdk", "s3cret", content_type="text/plain", tags={"a": "b"})
    assert created.value == "s3cret"
    assert created.properties.version is not None
    assert len(created.properties.version) == 32
    fetched = await client.get_secret("from-sdk")
    assert fetched.value == "s3cret"
    assert fetched.properties.version == created.properties.version
    assert fetched.properties.tags == {"a": "b"}
    newer = emulator.set_secret("demo", "from-sdk", "rotated")
    assert (await client.get_secret("from-sdk")).properties.version == newer
    # The SDK's first request was the bodiless challenge probe; then the PUT and two GETs.
    assert emulator.requests("keyvault") == 4


async def test_throttling_fault_surfaces_as_429(
    emulator: Emulator, vault_client: Callable[[str], SecretClient]
) -> None:
    emulator.set_secret("default", "s", "v")
    emulator.add_fault("keyvault", Fault(status=429, retry_after=2.5))
    client = vault_client("default")
    with pytest.raises(HttpResponseError) as throttled:
        await client.get_secret("s")
    assert throttled.value.status_code == 429
    assert throttled.value.error is not None
    assert throttled.value.error.code == "Throttled"
    assert throttled.value.response is not None
    # azure-core types the response loosely; at runtime it is an AsyncHttpResponse with headers.
    assert cast(Any, throttled.value.response).headers["Retry-After"] == "3"
    assert (await client.get_secret("s")).value == "v"


async def test_unauthenticated_request_gets_the_real_challenge(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    status, headers, body = await kv_get(http, emulator, "/secrets/x", None)
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        f'Bearer authorization="https://login.microsoftonline.com/{emulator.tenant_id}", '
        'resource="https://vault.azure.net"'
    )
    assert body == {
        "error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}
    }


async def test_bad_tokens_are_401_without_echoing_them(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    wrong_audience = (await app_service_token(http, emulator, "https://management.azure.com"))["access_token"]
    async with Emulator() as stranger:
        foreign = (await app_service_token(http, stranger))["access_token"]
    emulator.token_lifetime = 0.01
    expiring = await app_service_token(http, emulator)
    await asyncio.sleep(max(0.0, int(expiring["expires_on"]) - time.time() + 0.05))
    cases = [
        (wrong_audience, "AKV10022: Invalid audience"),
        (foreign, "AKV10046"),
        (expiring["access_token"], "expired"),
    ]
    for token, expected in cases:
        status, headers, body = await kv_get(http, emulator, "/secrets/x", token)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer authorization=")
        assert body["error"]["code"] == "Unauthorized"
        assert expected in body["error"]["message"]
        assert token not in str(body)


async def test_api_version_is_required(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.set_secret("default", "x", "v")
    token = (await app_service_token(http, emulator))["access_token"]
    async with http.get(
        emulator.keyvault_base + "/secrets/x",
        headers={"Authorization": f"Bearer {token}"},
        ssl=tls_context(emulator),
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "BadParameter"
    status, _, body = await kv_get(http, emulator, "/secrets/x/", token)
    assert status == 200
    assert body["value"] == "v"


async def test_seed_demo(emulator: Emulator, vault_client: Callable[[str], SecretClient]) -> None:
    seed_demo(emulator)
    client = vault_client("demo")
    app_db = await client.get_secret("app-db")
    assert app_db.value is not None
    assert "Server=" in app_db.value
    assert app_db.properties.content_type is not None
    assert (await client.get_secret("api-key")).value == "demo-api-key-v2-not-a-real-key"
    assert (await client.get_secret("greeting")).value


# faults


async def test_status_fault_counts_down_and_matches_paths(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    emulator.add_fault("identity", Fault(status=503, count=2, retry_after=1, path_contains="/metadata/"))
    # Does not match the path: answered normally and the fault stays queued.
    await app_service_token(http, emulator)
    for _ in range(2):
        async with http.get(
            emulator.imds_host + "/metadata/identity/oauth2/token",
            params={"api-version": "2018-02-01", "resource": VAULT},
            headers={"Metadata": "true"},
        ) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"] == "temporarily_unavailable"
    async with http.get(
        emulator.imds_host + "/metadata/identity/oauth2/token",
        params={"api-version": "2018-02-01", "resource": VAULT},
        headers={"Metadata": "true"},
    ) as response:
        assert response.status == 200
    assert emulator.requests("identity") == 4
    assert emulator.tokens_issued == 2


async def test_identity_fault_reaches_azure_identity(
    emulator: Emulator, credential: ManagedIdentityCredential
) -> None:
    emulator.add_fault("identity", Fault(status=500))
    with pytest.raises(Exception, match="500") as failed:
        await credential.get_token(SCOPE)
    assert "access_token" not in str(failed.value)
    assert (await credential.get_token(SCOPE)).token


async def test_drop_closes_the_connection_without_an_answer(
    emulator: Emulator, http: aiohttp.ClientSession, vault_client: Callable[[str], SecretClient]
) -> None:
    # aiohttp resends an idempotent request once after a dropped connection, so drop both attempts.
    emulator.add_fault("identity", Fault(mode="drop", count=2))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await app_service_token(http, emulator)
    assert emulator.requests("identity") == 2
    assert emulator.tokens_issued == 0

    emulator.set_secret("default", "s", "v")
    emulator.add_fault("keyvault", Fault(mode="drop", count=2))
    client = vault_client("default")
    with pytest.raises((ServiceRequestError, ServiceResponseError)):
        await client.get_secret("s")
    assert (await client.get_secret("s")).value == "v"


async def test_delay_fault_slows_but_answers(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.add_fault("identity", Fault(mode="delay", delay=0.3))
    started = time.monotonic()
    body = await app_service_token(http, emulator)
    assert time.monotonic() - started >= 0.3
    assert body["access_token"]
    emulator.add_fault("identity", Fault(mode="delay", delay=1.0))
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(emulator.identity_url, timeout=aiohttp.ClientTimeout(total=0.2)):
            pass
    emulator.add_fault("identity", Fault(status=502, delay=0.2))
    started = time.monotonic()
    async with http.get(emulator.identity_url) as response:
        assert response.status == 502
    assert time.monotonic() - started >= 0.2


async def test_refuse_then_listen_again_on_the_same_port(
    emulator: Emulator, http: aiohttp.ClientSession, vault_client: Callable[[str], SecretClient]
) -> None:
    port = emulator.identity_port
    await app_service_token(http, emulator)  # leaves a kept-alive connection, which refuse must also close
    await emulator.refuse("identity", True)
    with pytest.raises(aiohttp.ClientConnectorError):
        await app_service_token(http, emulator)
    await emulator.refuse("identity", False)
    assert emulator.identity_port == port
    assert (await app_service_token(http, emulator))["access_token"]

    emulator.set_secret("default", "s", "v")
    client = vault_client("default")
    assert (await client.get_secret("s")).value == "v"
    await emulator.refuse("keyvault", True)
    with pytest.raises(ServiceRequestError):
        await client.get_secret("s")
    await emulator.refuse("keyvault", False)
    assert (await client.get_secret("s")).value == "v"


async def test_control_api_and_stats(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    control = emulator.imds_host + "/_emulator/"
    async with http.post(
        control + "faults", json={"target": "identity", "status": 429, "count": 1}
    ) as response:
        assert response.status == 201
    async with http.post(control + "faults", json={"target": "nowhere"}) as response:
        assert response.status == 400
    async with http.post(control + "faults", json={"target": "identity", "count": 0}) as response:
        assert response.status == 400
    async with http.get(control + "stats") as response:
        stats = await response.json()
    assert stats["requests"] == {"identity": 0, "keyvault": 0}
    assert stats["pending_faults"]["identity"][0]["status"] == 429
    async with http.get(emulator.identity_url) as response:
        assert response.status == 429
    await app_service_token(http, emulator)
    async with http.post(control + "faults", json={"target": "identity", "mode": "drop"}) as response:
        assert response.status == 201
    async with http.delete(control + "faults") as response:
        assert response.status == 204
    await app_service_token(http, emulator)  # the drop was cleared
    async with http.get(control + "stats") as response:
        stats = await response.json()
    assert stats["requests"]["identity"] == 3
    assert stats["tokens_issued"] == 2
    assert emulator.stats.identity_requests == 3
    emulator.reset_stats()
    assert (emulator.requests("identity"), emulator.requests("keyvault"), emulator.tokens_issued) == (0, 0, 0)


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="count"):
        Fault(count=0)
    with pytest.raises(ValueError, match="mode"):
        Fault(mode="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status"):
        Fault(status=200)
    assert Fault(retry_after=0.2).retry_after_header == "1"


# lifecycle and hygiene


async def test_files_describe_and_cleanup(tmp_path: Path) -> None:
    async with Emulator() as owned:
        ca = owned.ca_file
        assert ca.read_text().startswith("-----BEGIN CERTIFICATE-----")
        lines = "\n".join(owned.describe())
        for expected in (owned.identity_url, owned.identity_header, owned.imds_host, str(ca)):
            assert expected in lines
    assert not ca.parent.exists()
    async with Emulator(state_dir=tmp_path / "state") as kept:
        assert kept.ca_file.parent == tmp_path / "state"
    assert (tmp_path / "state" / kept.ca_file.name).exists()
    assert (tmp_path / "state" / "emulator-server.pem").stat().st_mode & 0o077 == 0


async def test_tokens_and_secret_values_are_never_logged(
    emulator: Emulator,
    vault_client: Callable[[str], SecretClient],
    credential: ManagedIdentityCredential,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="broker.emulator")
    emulator.set_secret("default", "logged", "hunter2-value")
    emulator.add_fault("keyvault", Fault(mode="delay", delay=0.01))
    secret = await vault_client("default").get_secret("logged")
    token = await credential.get_token(SCOPE)
    assert caplog.records, "the emulator should log requests at debug level"
    assert secret.value is not None
    assert secret.value not in caplog.text
    assert token.token not in caplog.text
    assert emulator.identity_header not in caplog.text


async def test_expires_on_naive_datetime_is_utc(
    emulator: Emulator, vault_client: Callable[[str], SecretClient]
) -> None:
    naive = datetime(2030, 6, 1, 12, 0, 0)
    emulator.set_secret("default", "n", "v", expires_on=naive)
    got = await vault_client("default").get_secret("n")
    assert got.properties.expires_on == naive.replace(tzinfo=UTC)
    assert got.properties.expires_on - datetime.now(UTC) > timedelta(days=1)


# Entra ID (app registrations) on the HTTPS port


APP = "0a0a0a0a-0000-4000-8000-0000000000e1"


async def aad_post(
    http: aiohttp.ClientSession, emulator: Emulator, form: dict[str, str], tenant: str | None = None
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{emulator.authority_host}/{tenant or emulator.tenant_id}/oauth2/v2.0/token",
        data=form,
        ssl=tls_context(emulator),
    ) as response:
        return response.status, await response.json()


async def test_aad_client_credentials_answer_shape(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    secret = emulator.register_app(APP)
    form = {"grant_type": "client_credentials", "client_id": APP, "client_secret": secret, "scope": SCOPE}
    status, body = await aad_post(http, emulator, form)
    assert status == 200
    assert set(body) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], int)
    assert body["expires_in"] in (LIFETIME, LIFETIME + 1)
    claims = emulator.verify_token(body["access_token"], VAULT)
    assert (claims["aud"], claims["appid"], claims["tid"]) == (VAULT, APP, emulator.tenant_id)
    assert "xms_mirid" not in claims
    # Key Vault takes the app's token like a managed identity's.
    emulator.set_secret("default", "s", "v")
    assert (await kv_get(http, emulator, "/secrets/s", body["access_token"]))[2]["value"] == "v"
    assert (emulator.requests("identity"), emulator.requests("keyvault"), emulator.tokens_issued) == (1, 1, 1)
    recorded = emulator.received("identity")[0]
    assert recorded.form["client_secret"] == "[redacted]"
    assert secret not in repr(emulator.received())


@pytest.mark.parametrize(
    ("change", "status", "error", "code"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client", 7000215),
        ({"client_id": "unknown-app"}, 400, "unauthorized_client", 700016),
        ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
        ({"scope": VAULT}, 400, "invalid_scope", 1002012),
        ({"scope": f"{SCOPE} https://graph.microsoft.com/.default"}, 400, "invalid_scope", 1002012),
        ({"client_secret": ""}, 400, "invalid_request", 90014),  # with an assertion too, below
        ({"tenant": "00000000-0000-4000-8000-000000000000"}, 400, "invalid_request", 90002),
    ],
    ids=["wrong-secret", "unknown-app", "grant", "resource-not-scope", "two-scopes", "two-credentials", "tenant"],
)
async def test_aad_rejects_like_entra(
    emulator: Emulator, http: aiohttp.ClientSession, change: dict[str, str], status: int, error: str, code: int
) -> None:
    secret = emulator.register_app(APP)
    form = {"grant_type": "client_credentials", "client_id": APP, "client_secret": secret, "scope": SCOPE, **change}
    tenant = form.pop("tenant", None)
    if form["client_secret"] == "":
        form["client_secret"] = secret
        form["client_assertion"] = emulator.federated_token(APP)
        form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    got, body = await aad_post(http, emulator, form, tenant)
    assert (got, body["error"], body["error_codes"]) == (status, error, [code])
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert {"timestamp", "trace_id", "correlation_id"} <= set(body)
    assert secret not in str(body)
    assert emulator.tokens_issued == 0


async def test_aad_federated_assertions(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.register_app(APP)
    assertion = emulator.federated_token(APP, "system:serviceaccount:ns:sa")
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert claims["aud"] == ["api://AzureADTokenExchange"]
    assert claims["sub"] == "system:serviceaccount:ns:sa"
    form = {
        "grant_type": "client_credentials",
        "client_id": APP,
        "scope": "https://management.azure.com/.default",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    status, body = await aad_post(http, emulator, form)
    assert status == 200
    assert emulator.verify_token(body["access_token"], "https://management.azure.com")["appid"] == APP
    expired = emulator.federated_token(APP, "system:serviceaccount:ns:sa", lifetime=0.001)
    await asyncio.sleep(1.1)
    for bad, code in [("not-a-jwt", 50027), (expired, 700024)]:
        status, body = await aad_post(http, emulator, {**form, "client_assertion": bad})
        assert body["error_codes"] == [code]
        assert bad not in str(body)
    status, body = await aad_post(http, emulator, {**form, "client_assertion_type": "something-else"})
    assert (status, body["error_codes"]) == (400, [50027])
    with pytest.raises(KeyError):
        emulator.federated_token("never-registered")


async def test_aad_other_methods_and_metadata(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    base = f"{emulator.authority_host}/{emulator.tenant_id}"
    async with http.get(base + "/oauth2/v2.0/token", ssl=tls_context(emulator)) as response:
        assert response.status == 405
        assert (await response.json())["error_codes"] == [900561]
    async with http.get(base + "/v2.0/.well-known/openid-configuration", ssl=tls_context(emulator)) as response:
        metadata = await response.json()
    assert metadata["token_endpoint"] == base + "/oauth2/v2.0/token"
    assert emulator.requests("identity") == 2
    assert emulator.requests("keyvault") == 0


async def test_sync_msal_credential_reads_the_openid_configuration(emulator: Emulator) -> None:
    # MSAL (behind the synchronous credentials) looks up the tenant's metadata first; instance discovery
    # would ask login.microsoftonline.com, so it has to be off for any local authority.
    from azure.identity import ClientSecretCredential

    secret = emulator.register_app(APP)
    credential = ClientSecretCredential(
        emulator.tenant_id,
        APP,
        secret,
        authority=emulator.authority_host,
        connection_verify=str(emulator.ca_file),
        disable_instance_discovery=True,
    )
    token = await asyncio.to_thread(credential.get_token, SCOPE)
    assert emulator.verify_token(token.token, VAULT)["appid"] == APP
    assert [r.path.rsplit("/", 1)[-1] for r in emulator.received("identity")] == ["openid-configuration", "token"]


async def test_aad_faults_are_identity_faults_with_entras_body(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    secret = emulator.register_app(APP)
    form = {"grant_type": "client_credentials", "client_id": APP, "client_secret": secret, "scope": SCOPE}
    emulator.add_fault("identity", Fault(status=503, retry_after=4))
    status, body = await aad_post(http, emulator, form)
    assert (status, body["error"]) == (503, "temporarily_unavailable")
    assert body["error_description"].startswith("AADSTS")
    emulator.add_fault("keyvault", Fault(status=500))  # Key Vault's faults leave Entra alone
    status, _ = await aad_post(http, emulator, form)
    assert status == 200
    assert (emulator.requests("identity"), emulator.requests("keyvault")) == (2, 0)


async def test_register_apps_through_the_control_api(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    async with http.post(emulator.imds_host + "/_emulator/apps", json={"client_id": APP}) as response:
        assert response.status == 201
        created = await response.json()
    assert created["authority_host"] == emulator.authority_host
    assert created["tenant_id"] == emulator.tenant_id
    form = {"grant_type": "client_credentials", "client_id": APP, "client_secret": created["secret"], "scope": SCOPE}
    assert (await aad_post(http, emulator, form))[0] == 200
    assertion_form = {
        **{k: v for k, v in form.items() if k != "client_secret"},
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": created["federated_token"],
    }
    assert (await aad_post(http, emulator, assertion_form))[0] == 200
    for bad in ({}, {"client_id": APP, "secret": 5}, {"client_id": APP, "extra": 1}):
        async with http.post(emulator.imds_host + "/_emulator/apps", json=bad) as response:
            assert response.status == 400
    with pytest.raises(ValueError, match="secret"):
        emulator.register_app(APP, "")


# Azure Arc (himds) on the identity port


async def arc_get(
    http: aiohttp.ClientSession, emulator: Emulator, headers: dict[str, str], version: str = "2019-11-01"
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with http.get(
        emulator.arc_endpoint, params={"api-version": version, "resource": VAULT}, headers=headers
    ) as response:
        return response.status, dict(response.headers), await response.json()


async def test_arc_challenge_and_answer(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with Emulator(arc_key_dir=tmp_path / "tokens") as emulator:
        status, headers, body = await arc_get(http, emulator, {"Metadata": "true"})
        assert status == 401
        assert headers["WWW-Authenticate"] == f"Basic realm={emulator.arc_key_file}"
        assert "access_token" not in body
        key = emulator.arc_key_file.read_text()
        status, _, _ = await arc_get(http, emulator, {"Metadata": "true", "Authorization": "Basic wrong"})
        assert status == 401
        for version in ("2019-11-01", "2020-06-01"):
            status, _, body = await arc_get(
                http, emulator, {"Metadata": "true", "Authorization": f"Basic {key}"}, version
            )
            assert status == 200
            assert all(isinstance(v, str) for v in body.values())
            assert emulator.verify_token(body["access_token"], VAULT)["appid"] == system_identity(
                emulator.tenant_id
            ).client_id
        status, _, body = await arc_get(http, emulator, {"Authorization": f"Basic {key}"})
        assert (status, body["error_description"]) == (400, "Required metadata header not specified")
        assert emulator.tokens_issued == 2
        assert key not in repr(emulator.received())
        assert any("Azure Arc" in line and emulator.arc_endpoint in line for line in emulator.describe())
    assert not (tmp_path / "tokens").exists()


async def test_arc_off_says_why(http: aiohttp.ClientSession) -> None:
    async with Emulator(arc_key_dir=None) as emulator:
        assert not emulator.arc_enabled
        status, _, body = await arc_get(http, emulator, {"Metadata": "true"})
        assert status == 400
        assert "Arc is off" in body["error_description"]
        assert emulator.arc_unavailable_reason in body["error_description"]
        with pytest.raises(RuntimeError, match="Arc is off"):
            _ = emulator.arc_key_file
        # IMDS's own api-versions on the same path are unaffected.
        async with http.get(
            emulator.imds_host + "/metadata/identity/oauth2/token",
            params={"api-version": "2018-02-01", "resource": VAULT},
            headers={"Metadata": "true"},
        ) as response:
            assert response.status == 200
