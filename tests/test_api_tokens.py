"""/msi/token end to end: real azure-identity clients and runbook code against the broker,
which gets its tokens from the emulator through the real identity code."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from broker.emulator import Fault
from tests.conftest import BASE_CONFIG, KEY, BrokerFactory, RunningBroker, record

VAULT = "https://vault.azure.net"
SQL = "https://database.windows.net/"


@pytest.fixture
def identity_env(broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> RunningBroker:
    """Point azure-identity in this process at the broker, as a runbook's environment would."""
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{broker.http_url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", KEY)
    for name in ("MSI_ENDPOINT", "MSI_SECRET", "IMDS_ENDPOINT", "AZURE_CLIENT_ID", "AZURE_TENANT_ID",
                 "AZURE_FEDERATED_TOKEN_FILE", "AZURE_POD_IDENTITY_AUTHORITY_HOST"):
        monkeypatch.delenv(name, raising=False)
    return broker


async def test_azure_identity_aio_gets_token_and_second_call_is_cached(identity_env: RunningBroker) -> None:
    from azure.identity.aio import ManagedIdentityCredential

    emulator = identity_env.emulator
    before = emulator.tokens_issued
    async with ManagedIdentityCredential() as credential:
        token = await credential.get_token(f"{VAULT}/.default")
    claims = emulator.verify_token(record(token.token), VAULT)
    assert claims["aud"] == VAULT
    assert token.expires_on > time.time() + 3000
    # a fresh credential has no SDK cache of its own: this one is answered by the broker's cache
    async with ManagedIdentityCredential() as credential:
        again = await credential.get_token(f"{VAULT}/.default")
    assert again.token == token.token
    assert emulator.tokens_issued == before + 1


async def test_azure_identity_sync_and_default_credential(identity_env: RunningBroker) -> None:
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    emulator = identity_env.emulator

    def fetch_both() -> tuple[str, str]:
        sync_token = ManagedIdentityCredential().get_token(SQL + ".default").token
        default = DefaultAzureCredential(exclude_interactive_browser_credential=True)
        return sync_token, default.get_token(SQL + ".default").token

    sync_token, default_token = await asyncio.to_thread(fetch_both)
    audience = SQL.rstrip("/")  # the scope ".../.default" names the resource without its slash
    assert emulator.verify_token(record(sync_token), audience)["aud"] == audience
    assert default_token == sync_token
    assert emulator.tokens_issued == 1


RUNBOOK = textwrap.dedent("""
    # The Python runbook sample of the Azure Automation documentation, unchanged.
    import os
    import requests

    endPoint = os.getenv('IDENTITY_ENDPOINT') + "?resource=https://management.azure.com/"
    identityHeader = os.getenv('IDENTITY_HEADER')
    payload = {}
    headers = {
        'X-IDENTITY-HEADER': identityHeader,
        'Metadata': 'True'
    }
    response = requests.request("GET", endPoint, headers=headers, data=payload)
    print(response.text)
""")

RUNBOOK_POST = textwrap.dedent("""
    import os
    import requests

    response = requests.post(
        os.environ['IDENTITY_ENDPOINT'],
        headers={'X-IDENTITY-HEADER': os.environ['IDENTITY_HEADER'], 'Metadata': 'True'},
        data={'resource': 'https://management.azure.com/'},
    )
    print(response.text)
""")


@pytest.mark.parametrize("script", [RUNBOOK, RUNBOOK_POST], ids=["get", "post-form"])
async def test_automation_runbook_sample_runs_unchanged(broker: RunningBroker, script: str) -> None:
    env = {**os.environ, "IDENTITY_ENDPOINT": f"{broker.http_url}/msi/token", "IDENTITY_HEADER": KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    body = json.loads(out)
    assert body["resource"] == "https://management.azure.com/"
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], int) and isinstance(body["expires_on"], str)
    claims = broker.emulator.verify_token(record(body["access_token"]), "https://management.azure.com/")
    assert claims["exp"] == int(body["expires_on"])


async def test_curl_over_unix_socket(broker: RunningBroker) -> None:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "--unix-socket", broker.socket_path, "-H", "Metadata: true",
        f"http://localhost/msi/token?resource={VAULT}", stdout=subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    body = json.loads(out)
    assert broker.emulator.verify_token(record(body["access_token"]), VAULT)["aud"] == VAULT


async def test_response_shape_and_default_suffix(broker: RunningBroker) -> None:
    status, body = await broker.token(f"{VAULT}/.default", **{"api-version": "2019-08-01"})
    assert status == 200
    assert set(body) == {"access_token", "expires_on", "expires_in", "not_before", "resource",
                         "token_type", "client_id"}
    assert body["resource"] == f"{VAULT}/.default"  # echoed byte for byte
    assert broker.emulator.verify_token(body["access_token"], VAULT)["aud"] == VAULT
    assert 3500 < body["expires_in"] <= 3600
    # the bare resource shares the cache entry
    status, bare = await broker.token(VAULT)
    assert bare["access_token"] == body["access_token"] and bare["resource"] == VAULT
    assert broker.emulator.tokens_issued == 1


async def test_post_form_and_clientid_spelling(broker: RunningBroker) -> None:
    client_id = "11111111-2222-3333-4444-555555555555"
    async with broker.tcp().post(
        f"{broker.http_url}/msi/token",
        data={"resource": VAULT, "clientid": client_id},
        headers={"X-IDENTITY-HEADER": KEY},
    ) as response:
        body = await response.json()
    assert response.status == 200
    assert body["client_id"] == client_id
    claims = broker.emulator.verify_token(record(body["access_token"]), VAULT)
    assert claims["appid"] == client_id


async def test_legacy_secret_header_and_metadata_any_case(broker: RunningBroker) -> None:
    async with broker.tcp().get(f"{broker.http_url}/msi/token", params={"resource": VAULT},
                                headers={"secret": KEY}) as response:
        assert response.status == 200
    async with broker.unix().get("http://localhost/msi/token", params={"resource": VAULT},
                                 headers={"METADATA": "TRUE"}) as response:
        assert response.status == 200


async def test_200_concurrent_cold_requests_make_one_upstream_request(broker: RunningBroker) -> None:
    broker.emulator.add_fault("identity", Fault(mode="delay", delay=0.3))
    session = broker.unix()

    async def one() -> str:
        async with session.get("http://localhost/msi/token", params={"resource": SQL},
                               headers={"Metadata": "true"}) as response:
            assert response.status == 200
            return str((await response.json())["access_token"])

    tokens = await asyncio.gather(*(one() for _ in range(200)))
    assert len(set(tokens)) == 1
    assert broker.emulator.requests("identity") == 1


async def test_short_lived_tokens_stay_fresh(make_broker: BrokerFactory) -> None:
    """30 s tokens polled for 40 s: every served token has >= 3 s left; few upstream requests."""
    broker = await make_broker()
    broker.emulator.token_lifetime = 30
    session = broker.unix()
    least = float("inf")
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        async with session.get("http://localhost/msi/token", params={"resource": VAULT},
                               headers={"Metadata": "true"}) as response:
            body = await response.json()
        assert response.status == 200
        exp = broker.emulator.verify_token(body["access_token"], VAULT)["exp"]
        least = min(least, exp - time.time())
        await asyncio.sleep(0.25)
    assert least >= 3, least
    assert broker.emulator.tokens_issued <= 6


async def test_upstream_failure_serves_cached_until_expiry_then_503(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    emulator = broker.emulator
    emulator.token_lifetime = 6
    status, first = await broker.token(VAULT)
    assert status == 200
    emulator.add_fault("identity", Fault(status=500, count=10_000))
    await asyncio.sleep(3.5)  # past half-life: background refresh failed
    assert emulator.requests("identity") > 1
    status, body = await broker.token(VAULT)
    assert status == 200 and body["access_token"] == first["access_token"]
    await emulator.refuse("identity", True)
    margin = 0.6  # 10 % of the 6 s lifetime
    await asyncio.sleep(int(first["expires_on"]) - margin - time.time() + 0.05)
    status, body = await broker.token(VAULT)
    assert status == 503, body.get("error")
    assert "access_token" not in body
    assert body["error"] == "unavailable"


async def test_upstream_429_is_honoured(broker: RunningBroker) -> None:
    emulator = broker.emulator
    emulator.add_fault("identity", Fault(status=429, retry_after=5))
    async with broker.tcp().get(f"{broker.http_url}/msi/token", params={"resource": VAULT},
                                headers={"X-IDENTITY-HEADER": KEY}) as response:
        assert response.status == 503
        assert 4 <= int(response.headers["Retry-After"]) <= 5
    assert emulator.requests("identity") == 1
    for _ in range(5):
        status, _ = await broker.token(SQL)
        assert status == 503
        await asyncio.sleep(0.5)
    assert emulator.requests("identity") == 1  # nothing sent inside the 5 s
    await asyncio.sleep(3.0)  # now past the 5 s
    status, _ = await broker.token(VAULT)
    assert status == 200
    assert emulator.requests("identity") == 2


async def test_stale_socket_file_does_not_block_start(make_broker: BrokerFactory, tmp_path: Path) -> None:
    import socket as socketlib

    path = tmp_path / "b0" / "broker.sock"
    path.parent.mkdir()
    dead = socketlib.socket(socketlib.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: as after a crash
    broker = await make_broker()
    assert broker.socket_path == str(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    await broker.broker.stop()
    assert not path.exists()


IMDS_BASE = BASE_CONFIG.replace("shutdown_grace = 5", 'shutdown_grace = 5\nimds_compat = true\nimds_client = "limited"')


async def test_imds_compat_path(make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = await make_broker(base=IMDS_BASE)
    path = f"{broker.http_url}/metadata/identity/oauth2/token"
    params = {"api-version": "2018-02-01", "resource": SQL}
    session = broker.tcp()
    # over TCP with no key: the imds_client's rights, as with the real IMDS
    async with session.get(path, params=params, headers={"Metadata": "true"}) as response:
        assert response.status == 200
        record((await response.json())["access_token"])
    async with session.get(path, params={**params, "resource": VAULT}, headers={"Metadata": "true"}) as response:
        assert response.status == 403  # "limited" may not have vault tokens
    async with session.get(path, params=params) as response:
        assert response.status == 400  # Metadata: true is required
    # azure-identity's IMDS client, pointed at the broker the way pod identity does
    from azure.identity.aio import ManagedIdentityCredential

    for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "IMDS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", broker.http_url)
    async with ManagedIdentityCredential() as credential:
        token = await credential.get_token(SQL + ".default")
    assert broker.emulator.verify_token(record(token.token), SQL.rstrip("/"))
