"""Every status of CONTRACT section 3's table, in its documented JSON shape, and the check order."""

from __future__ import annotations

import os
from typing import Any

import pytest

from broker.emulator import Emulator, Fault
from tests.conftest import BASE_CONFIG, KEY, OTHER_KEY, BrokerFactory, RunningBroker

VAULT = "https://vault.azure.net"


async def get(broker: RunningBroker, path: str, *, headers: dict[str, str] | None = None,
              params: dict[str, str] | None = None, unix: bool = False) -> tuple[int, dict[str, Any], Any]:
    session = broker.unix() if unix else broker.tcp()
    base = "http://localhost" if unix else broker.http_url
    async with session.get(base + path, headers=headers or {}, params=params) as response:
        return response.status, await response.json(), response.headers


def assert_error(status: int, body: dict[str, Any], expected: int, code: str) -> None:
    assert status == expected, body.get("error")
    assert set(body) == {"error", "error_description"}
    assert body["error"] == code
    assert body["error_description"]


async def test_400_missing_resource(broker: RunningBroker) -> None:
    status, body, _ = await get(broker, "/msi/token", headers={"X-IDENTITY-HEADER": KEY})
    assert_error(status, body, 400, "invalid_request")
    assert "resource" in body["error_description"]


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded"])
async def test_400_proxy_headers(broker: RunningBroker, header: str) -> None:
    for unix in (False, True):
        status, body, _ = await get(broker, "/msi/token", params={"resource": VAULT}, unix=unix,
                                    headers={"X-IDENTITY-HEADER": KEY, "Metadata": "true", header: "1.2.3.4"})
        assert_error(status, body, 400, "invalid_request")


async def test_400_foreign_host(broker: RunningBroker) -> None:
    status, body, _ = await get(broker, "/msi/token", params={"resource": VAULT},
                                headers={"X-IDENTITY-HEADER": KEY, "Host": "evil.example:8765"})
    assert_error(status, body, 400, "invalid_request")
    assert "Host" in body["error_description"]
    for host in ("localhost:1", "127.0.0.1", "[::1]:80", "127.7.7.7:9"):
        status, _, _ = await get(broker, "/msi/token", params={"resource": VAULT},
                                 headers={"X-IDENTITY-HEADER": KEY, "Host": host})
        assert status == 200, host


async def test_400_duplicate_query_parameter(broker: RunningBroker) -> None:
    status, body, _ = await get(broker, f"/msi/token?resource={VAULT}&resource=https://evil",
                                headers={"X-IDENTITY-HEADER": KEY})
    assert_error(status, body, 400, "invalid_request")
    assert "resource" in body["error_description"]


async def test_400_socket_request_without_metadata(broker: RunningBroker) -> None:
    status, body, _ = await get(broker, "/msi/token", params={"resource": VAULT}, unix=True)
    assert_error(status, body, 400, "invalid_request")
    assert "Metadata" in body["error_description"]
    # probes need no Metadata header
    status, _, _ = await get(broker, "/livez", unix=True)
    assert status == 200


async def test_401_tcp_without_or_with_wrong_key_whatever_else(broker: RunningBroker) -> None:
    status, body, _ = await get(broker, "/msi/token", params={"resource": VAULT})
    assert_error(status, body, 401, "unauthorized")
    # 401 comes first, even for a request that is also malformed
    status, body, _ = await get(broker, "/msi/token", headers={"X-IDENTITY-HEADER": "wrong-key-000000000",
                                                               "X-Forwarded-For": "1.2.3.4"})
    assert_error(status, body, 401, "unauthorized")
    status, body, _ = await get(broker, "/nonexistent", headers={"Metadata": "true"})
    assert_error(status, body, 401, "unauthorized")


async def test_403_resource_and_identity_policy(broker: RunningBroker) -> None:
    status, body, _ = await get(broker, "/msi/token", params={"resource": VAULT},
                                headers={"X-IDENTITY-HEADER": OTHER_KEY})
    assert_error(status, body, 403, "forbidden")
    assert "limited" in body["error_description"]
    status, _, _ = await get(broker, "/msi/token", params={"resource": "https://database.windows.net"},
                             headers={"X-IDENTITY-HEADER": OTHER_KEY})
    assert status == 200  # trailing slash differences name the same audience
    status, body, _ = await get(broker, "/msi/token", headers={"X-IDENTITY-HEADER": KEY},
                                params={"resource": VAULT, "client_id": "99999999-0000-0000-0000-000000000000"})
    assert_error(status, body, 403, "forbidden")
    assert broker.emulator.requests("identity") == 1  # only the allowed request went upstream


async def test_403_socket_peer_matching_no_client(make_broker: BrokerFactory) -> None:
    broker = await make_broker(f'[[clients]]\nname = "someone-else"\nuids = [{os.getuid() + 4242}]\n'
                               'resources = ["*"]\n')
    status, body, _ = await get(broker, "/msi/token", params={"resource": VAULT},
                                headers={"Metadata": "true"}, unix=True)
    assert_error(status, body, 403, "forbidden")
    assert str(os.getuid()) in body["error_description"]


async def test_403_quitquitquit_needs_admin(broker: RunningBroker) -> None:
    async with broker.tcp().post(f"{broker.http_url}/quitquitquit",
                                 headers={"X-IDENTITY-HEADER": KEY}) as response:
        assert_error(response.status, await response.json(), 403, "forbidden")
    assert not broker.broker.lifecycle.stop.is_set()


async def test_404_imds_path_off_and_unknown_path(broker: RunningBroker) -> None:
    status, body, _ = await get(broker, "/metadata/identity/oauth2/token", params={"resource": VAULT},
                                headers={"X-IDENTITY-HEADER": KEY, "Metadata": "true"})
    assert_error(status, body, 404, "not_found")
    assert "imds_compat" in body["error_description"]
    status, body, _ = await get(broker, "/nope", headers={"X-IDENTITY-HEADER": KEY})
    assert_error(status, body, 404, "not_found")


async def test_413_body_over_64k(broker: RunningBroker) -> None:
    async with broker.tcp().post(
        f"{broker.http_url}/msi/token",
        data={"resource": VAULT, "padding": "x" * (65 * 1024)},
        headers={"X-IDENTITY-HEADER": KEY},
    ) as response:
        assert_error(response.status, await response.json(), 413, "payload_too_large")


async def test_429_rate_limit_with_retry_after(make_broker: BrokerFactory) -> None:
    broker = await make_broker(f'[[clients]]\nname = "slow"\nkey = "{KEY}"\nresources = ["*"]\nrate_limit = 2\n')
    statuses = []
    for _ in range(8):
        status, body, headers = await get(broker, "/msi/token", params={"resource": VAULT},
                                          headers={"X-IDENTITY-HEADER": KEY})
        statuses.append(status)
    assert statuses[:4] == [200] * 4  # burst = 2 x rate
    assert 429 in statuses
    assert_error(status, body, 429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1


async def test_502_upstream_refuses(broker: RunningBroker) -> None:
    broker.emulator.add_fault("identity", Fault(status=400))
    status, body, _ = await get(broker, "/msi/token", params={"resource": VAULT},
                                headers={"X-IDENTITY-HEADER": KEY})
    assert_error(status, body, 502, "upstream_error")
    assert "400" in body["error_description"]
    assert broker.emulator.requests("identity") == 1  # a 4xx is not retried


async def test_503_upstream_unreachable(broker: RunningBroker) -> None:
    await broker.emulator.refuse("identity", True)
    status, body, headers = await get(broker, "/msi/token", params={"resource": VAULT},
                                      headers={"X-IDENTITY-HEADER": KEY})
    assert_error(status, body, 503, "unavailable")
    assert "Retry-After" in headers


async def test_504_upstream_timeout(broker: RunningBroker) -> None:
    # identity.timeout = 2 and attempts = 2 in the test config
    broker.emulator.add_fault("identity", Fault(mode="delay", delay=3, count=2))
    status, body, _ = await get(broker, "/msi/token", params={"resource": VAULT},
                                headers={"X-IDENTITY-HEADER": KEY})
    assert_error(status, body, 504, "upstream_timeout")


async def test_503_upstream_500_retried_then_reported_502(broker: RunningBroker) -> None:
    broker.emulator.add_fault("identity", Fault(status=500, count=2))
    status, body, _ = await get(broker, "/msi/token", params={"resource": VAULT},
                                headers={"X-IDENTITY-HEADER": KEY})
    assert_error(status, body, 502, "upstream_error")
    assert broker.emulator.requests("identity") == 2  # retried once (attempts = 2)
    status, _, _ = await get(broker, "/msi/token", params={"resource": VAULT},
                             headers={"X-IDENTITY-HEADER": KEY})
    assert status == 200


async def test_health_listener_serves_probes_only(broker: RunningBroker) -> None:
    session = broker.tcp()
    async with session.get(f"{broker.health_url}/livez", headers={"Host": "10.1.2.3:8766"}) as response:
        assert response.status == 200  # kubelet sends the pod IP as Host
    async with session.get(f"{broker.health_url}/msi/token", params={"resource": VAULT},
                           headers={"X-IDENTITY-HEADER": KEY}) as response:
        assert_error(response.status, await response.json(), 404, "not_found")


async def test_health_listener_on_wildcard_address(make_broker: BrokerFactory) -> None:
    """kubelet probes reach a 0.0.0.0 listener on the pod IP; 127.0.0.2 plays that part here."""
    broker = await make_broker(base=BASE_CONFIG.replace('health = "127.0.0.1:0"', 'health = "0.0.0.0:0"'))
    port = broker.health_url.rsplit(":", 1)[1]
    session = broker.tcp()
    async with session.get(f"http://127.0.0.2:{port}/readyz", headers={"Host": "10.1.2.3:8766"}) as response:
        assert response.status == 200
    async with session.get(f"http://127.0.0.2:{port}/msi/token", params={"resource": VAULT},
                           headers={"X-IDENTITY-HEADER": KEY, "Host": "localhost"}) as response:
        assert_error(response.status, await response.json(), 404, "not_found")


async def test_denied_requests_cannot_use_up_metric_labels(broker: RunningBroker) -> None:
    for n in range(80):
        status, _, _ = await get(broker, "/msi/token", params={"resource": f"https://junk{n}.example"},
                                 headers={"X-IDENTITY-HEADER": OTHER_KEY})
        assert status == 403
    status, _, _ = await get(broker, "/msi/token", params={"resource": VAULT}, headers={"X-IDENTITY-HEADER": KEY})
    assert status == 200
    async with broker.tcp().get(f"{broker.http_url}/metrics") as response:
        text = await response.text()
    assert 'tokenbroker_token_requests_total{outcome="denied",resource="other"} 80.0' in text
    assert f'tokenbroker_token_requests_total{{outcome="miss",resource="{VAULT}"}} 1.0' in text
    assert "junk" not in text


async def test_400_checks_come_before_an_unknown_socket_peer_403(make_broker: BrokerFactory) -> None:
    broker = await make_broker(f'[[clients]]\nname = "someone-else"\nuids = [{os.getuid() + 4242}]\n')
    status, body, _ = await get(broker, "/msi/token", headers={"Metadata": "true"}, unix=True)
    assert_error(status, body, 400, "invalid_request")  # missing resource
    status, body, _ = await get(broker, "/v1/status", headers={"Metadata": "true"}, unix=True)
    assert_error(status, body, 403, "forbidden")


async def test_flush_body_checked_before_admin(broker: RunningBroker) -> None:
    session = broker.tcp()
    for body in ({"vault": "main", "name": 5}, {"name": "x"}, {"other": 1}):
        async with session.post(f"{broker.http_url}/v1/cache/flush", json=body,
                                headers={"X-IDENTITY-HEADER": OTHER_KEY}) as response:
            assert_error(response.status, await response.json(), 400, "invalid_request")
    async with session.post(f"{broker.http_url}/v1/cache/flush", json={},
                            headers={"X-IDENTITY-HEADER": OTHER_KEY}) as response:
        assert_error(response.status, await response.json(), 403, "forbidden")


async def test_object_id_answer_does_not_claim_a_client_id(make_broker: BrokerFactory) -> None:
    broker = await make_broker(f'[[clients]]\nname = "any"\nkey = "{KEY}"\nresources = ["*"]\nidentities = ["*"]\n')
    status, body = await broker.token(VAULT, object_id="aaaaaaaa-0000-0000-0000-000000000001")
    assert status == 200 and body["client_id"] == ""
    status, body = await broker.token(VAULT, client_id="bbbbbbbb-0000-0000-0000-000000000002")
    assert status == 200 and body["client_id"] == "bbbbbbbb-0000-0000-0000-000000000002"


APP_SOURCE = """
[server]
socket = "$socket"
http = "127.0.0.1:0"
health = ""

[identity]
source = "client_secret"
tenant_id = "$tenant"
client_id = "$app"
client_secret_env = "APP_SECRET"
endpoint = "$authority"
ca_file = "$ca_file"
"""


async def test_client_secret_source_through_the_broker(make_broker: BrokerFactory, emulator: Emulator) -> None:
    app = "cccccccc-0000-4000-8000-000000000003"
    secret = emulator.register_app(app)
    base = (APP_SOURCE.replace("$tenant", emulator.tenant_id).replace("$app", app)
            .replace("$authority", emulator.authority_host))
    broker = await make_broker(f'[[clients]]\nname = "any"\nkey = "{KEY}"\nresources = ["*"]\nidentities = ["*"]\n',
                               base=base, environ={"APP_SECRET": secret})
    status, body = await broker.token(VAULT)
    assert status == 200
    assert emulator.verify_token(body["access_token"], VAULT)["appid"] == app
    status, body = await broker.token(VAULT, client_id="dddddddd-0000-0000-0000-000000000004")
    assert (status, body["error"]) == (400, "invalid_request")
    assert "one identity" in body["error_description"]
