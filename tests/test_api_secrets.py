"""Secrets through the broker: the real azure-keyvault-secrets client talks TLS to the emulated
vault (challenge included), the cache answers repeats, policy decides who reads what."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from broker.emulator import Emulator, Fault
from tests.conftest import KEY, LOG_CAPTURE, OTHER_KEY, BrokerFactory, RunningBroker, record

ADMIN_KEY = "admin-client-key-0123456789"
CANARY = "canary-secret-value-4f1c2b9e"


def vault_config(ttl: float = 300, stale: float = 3600) -> str:
    return f"""
[vaults.main]
url = "$vault_url"
ca_file = "$ca_file"
verify_challenge_resource = false
cache_ttl = {ttl}
stale_if_error = {stale}

[[clients]]
name = "runbook"
uids = [{os.getuid()}]
secrets = ["main/app-*"]

[[clients]]
name = "tcp-runbook"
key = "{KEY}"
secrets = ["main/app-*"]

[[clients]]
name = "admin"
key = "{ADMIN_KEY}"
secrets = ["*/*"]
admin = true

[[clients]]
name = "nothing"
key = "{OTHER_KEY}"
resources = ["*"]
"""


async def read(broker: RunningBroker, path: str, *, key: str = ADMIN_KEY, unix: bool = False,
               headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    session = broker.unix() if unix else broker.tcp()
    base = "http://localhost" if unix else broker.http_url
    auth = {"Metadata": "true"} if unix else {"X-IDENTITY-HEADER": key}
    async with session.get(base + path, headers={**auth, **(headers or {})}) as response:
        if response.content_type == "application/json":
            body = await response.json()
            if isinstance(body, dict) and isinstance(body.get("value"), str):
                record(body["value"])
        else:
            body = record(await response.text())
        return response.status, body, response.headers


@pytest.fixture
async def vault_broker(make_broker: BrokerFactory, emulator: Emulator) -> RunningBroker:
    emulator.set_secret("main", "app-db", "Server=db;Password=hunter2", content_type="text/plain",
                        tags={"owner": "team-a"})
    emulator.set_secret("main", "root-pw", "do-not-leak")
    return await make_broker(vault_config())


async def test_read_latest_and_version(vault_broker: RunningBroker, emulator: Emulator) -> None:
    old = emulator.set_secret("main", "app-api", "app-api-value-1")
    emulator.set_secret("main", "app-api", "app-api-value-2")
    status, body, headers = await read(vault_broker, "/v1/secrets/main/app-api")
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert set(body) == {"vault", "name", "version", "value", "content_type", "enabled", "not_before",
                         "expires_on", "updated_on", "tags", "stale"}
    assert (body["vault"], body["name"], body["value"], body["stale"]) == ("main", "app-api", "app-api-value-2", False)
    assert body["content_type"] is None and body["tags"] == {} and body["enabled"] is True
    assert body["updated_on"].endswith("Z")
    status, body, _ = await read(vault_broker, f"/v1/secrets/main/app-api/{old}")
    assert (status, body["value"], body["version"]) == (200, "app-api-value-1", old)
    status, body, _ = await read(vault_broker, "/v1/secrets/main/app-db")
    assert body["content_type"] == "text/plain" and body["tags"] == {"owner": "team-a"}


async def test_raw_format_and_accept_text(vault_broker: RunningBroker) -> None:
    status, body, headers = await read(vault_broker, "/v1/secrets/main/app-db?format=raw")
    assert (status, body) == (200, "Server=db;Password=hunter2")
    assert headers["Content-Type"].startswith("text/plain")
    status, body, _ = await read(vault_broker, "/v1/secrets/main/app-db", headers={"Accept": "text/plain"})
    assert (status, body) == (200, "Server=db;Password=hunter2")


async def test_vault_errors_passed_on(vault_broker: RunningBroker, emulator: Emulator) -> None:
    status, body, _ = await read(vault_broker, "/v1/secrets/main/app-missing")
    assert (status, body["error"]) == (404, "not_found")
    emulator.deny("main", "app-denied")
    emulator.set_secret("main", "app-denied", "x")
    status, body, _ = await read(vault_broker, "/v1/secrets/main/app-denied")
    assert (status, body["error"]) == (403, "forbidden")
    emulator.set_secret("main", "app-off", "x", enabled=False)
    status, body, _ = await read(vault_broker, "/v1/secrets/main/app-off")
    assert (status, body["error"]) == (403, "forbidden")
    assert "disabled" in body["error_description"].lower()


async def test_cached_within_ttl_and_one_request_for_100_cold_reads(vault_broker: RunningBroker,
                                                                    emulator: Emulator) -> None:
    emulator.set_secret("main", "app-cold", "cold-value")
    emulator.add_fault("keyvault", Fault(mode="delay", delay=0.2, count=2))
    results = await asyncio.gather(*(read(vault_broker, "/v1/secrets/main/app-cold") for _ in range(100)))
    assert {r[1]["value"] for r in results} == {"cold-value"}
    # the SDK's first request draws the 401 challenge; then exactly one read
    assert emulator.requests("keyvault") <= 2
    seen = emulator.requests("keyvault")
    status, _, _ = await read(vault_broker, "/v1/secrets/main/app-cold")
    assert status == 200
    assert emulator.requests("keyvault") == seen


async def test_stale_if_error_then_503(make_broker: BrokerFactory, emulator: Emulator) -> None:
    emulator.set_secret("main", "app-db", "first")
    broker = await make_broker(vault_config(ttl=1, stale=5))
    fetched = time.monotonic()
    status, body, _ = await read(broker, "/v1/secrets/main/app-db")
    assert (status, body["stale"]) == (200, False)
    for fault in (Fault(status=500, count=100), Fault(status=429, retry_after=1, count=100)):
        emulator.clear_faults()
        emulator.add_fault("keyvault", fault)
        await asyncio.sleep(1.1)  # past the TTL
        status, body, _ = await read(broker, "/v1/secrets/main/app-db")
        assert (status, body["value"], body["stale"]) == (200, "first", True), fault
    emulator.clear_faults()
    await emulator.refuse("keyvault", True)
    status, body, _ = await read(broker, "/v1/secrets/main/app-db")
    assert (status, body["stale"]) == (200, True)
    await asyncio.sleep(fetched + 6.1 - time.monotonic())  # past ttl + stale_if_error
    status, body, headers = await read(broker, "/v1/secrets/main/app-db")
    assert (status, body["error"]) == (503, "unavailable")
    assert "Retry-After" in headers
    await emulator.refuse("keyvault", False)
    status, body, _ = await read(broker, "/v1/secrets/main/app-db")
    assert (status, body["stale"]) == (200, False)


async def test_deleted_secret_is_404_after_ttl(make_broker: BrokerFactory, emulator: Emulator) -> None:
    emulator.set_secret("main", "app-gone", "soon")
    broker = await make_broker(vault_config(ttl=0.5))
    status, _, _ = await read(broker, "/v1/secrets/main/app-gone")
    assert status == 200
    emulator.delete_secret("main", "app-gone")
    await asyncio.sleep(0.6)
    status, body, _ = await read(broker, "/v1/secrets/main/app-gone")
    assert (status, body["error"]) == (404, "not_found")


@pytest.mark.parametrize("unix", [True, False], ids=["socket-uid", "tcp-key"])
async def test_policy_globs(vault_broker: RunningBroker, unix: bool) -> None:
    status, body, _ = await read(vault_broker, "/v1/secrets/main/app-db", key=KEY, unix=unix)
    assert (status, body["value"]) == (200, "Server=db;Password=hunter2")
    before = vault_broker.emulator.requests("keyvault")
    status, body, _ = await read(vault_broker, "/v1/secrets/main/root-pw", key=KEY, unix=unix)
    assert (status, body["error"]) == (403, "forbidden")
    assert vault_broker.emulator.requests("keyvault") == before  # refused before any vault request


async def test_default_deny_unknown_vault_and_bad_names(vault_broker: RunningBroker) -> None:
    status, body, _ = await read(vault_broker, "/v1/secrets/main/app-db", key=OTHER_KEY)
    assert (status, body["error"]) == (403, "forbidden")  # a client naming no secrets gets none
    status, body, _ = await read(vault_broker, "/v1/secrets/other/app-db")
    assert (status, body["error"]) == (404, "not_found")
    assert "other" in body["error_description"]
    for bad in ("bad_name", "x" * 128, "semi%3Bcolon"):
        status, body, _ = await read(vault_broker, f"/v1/secrets/main/{bad}")
        assert (status, body["error"]) == (400, "invalid_request"), bad
    status, body, _ = await read(vault_broker, "/v1/secrets/main/app-db/not-hex!")
    assert status == 400
    assert vault_broker.emulator.requests("keyvault") == 0


async def test_dapr_compatible_path(vault_broker: RunningBroker) -> None:
    session = vault_broker.tcp()
    async with session.get(f"{vault_broker.http_url}/v1.0/secrets/main/app-db",
                           headers={"dapr-api-token": ADMIN_KEY}) as response:
        assert response.status == 200
        assert await response.json() == {"app-db": "Server=db;Password=hunter2"}


async def test_flush_is_admin_only_and_drops(vault_broker: RunningBroker, emulator: Emulator) -> None:
    await read(vault_broker, "/v1/secrets/main/app-db")
    session = vault_broker.tcp()
    async with session.post(f"{vault_broker.http_url}/v1/cache/flush", json={"vault": "main"},
                            headers={"X-IDENTITY-HEADER": KEY}) as response:
        assert response.status == 403
    emulator.set_secret("main", "app-db", "rotated")
    async with session.post(f"{vault_broker.http_url}/v1/cache/flush", json={"vault": "main", "name": "app-db"},
                            headers={"X-IDENTITY-HEADER": ADMIN_KEY}) as response:
        assert (response.status, await response.json()) == (200, {"dropped": 1})
    _, body, _ = await read(vault_broker, "/v1/secrets/main/app-db")
    assert body["value"] == "rotated"


async def test_status_metrics_and_cli_show_no_values(vault_broker: RunningBroker, emulator: Emulator) -> None:
    from tests.test_cli import cli

    emulator.set_secret("main", "app-canary", CANARY)
    _, body, _ = await read(vault_broker, "/v1/secrets/main/app-canary")
    assert body["value"] == CANARY
    await read(vault_broker, "/v1/secrets/main/app-canary")  # a hit
    emulator.add_fault("keyvault", Fault(status=500, count=10))
    status, error_body, _ = await read(vault_broker, "/v1/secrets/main/app-canary-missing")
    assert status == 502 and CANARY not in str(error_body)
    status, error_body, _ = await read(vault_broker, "/v1/secrets/main/root-pw", key=KEY)
    assert status == 403 and CANARY not in str(error_body)
    code, out, err = await cli("secret", "main", "app-canary", "--socket", vault_broker.socket_path)
    assert (code, out.strip()) == (0, CANARY)
    code, out, _ = await cli("status", "--socket", vault_broker.socket_path)
    assert "app-canary" in out and CANARY not in out
    code, _, err = await cli("secret", "main", "root-pw", "--socket", vault_broker.socket_path)
    assert code == 1 and "may not read main/root-pw" in err
    async with vault_broker.tcp().get(f"{vault_broker.http_url}/metrics") as response:
        metrics = await response.text()
    assert 'tokenbroker_secret_requests_total{outcome="hit",vault="main"}' in metrics
    assert 'tokenbroker_secret_requests_total{outcome="miss",vault="main"}' in metrics
    assert "tokenbroker_vault_request_seconds_bucket" in metrics
    assert "tokenbroker_secret_cache_entries" in metrics
    assert CANARY not in metrics
    assert CANARY not in LOG_CAPTURE.getvalue()
