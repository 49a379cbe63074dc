"""Shared fixtures: the emulator, in-process brokers wired to it, clients, and a log capture.

Every test starts what it needs on free loopback ports and in its own temporary directory.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from string import Template
from typing import Any

import aiohttp
import pytest

from broker.config import parse_config
from broker.emulator import Emulator
from broker.logs import JsonFormatter, _Redact
from broker.service import Broker

# Everything the broker logs during the session, through the production formatter and filter;
# tests that run the broker as a subprocess append its stderr. test_zz_canary.py reads both.
LOG_CAPTURE = io.StringIO()
SERVED_VALUES: set[str] = set()  # every token or secret value a test received from the broker

_handler = logging.StreamHandler(LOG_CAPTURE)
_handler.setFormatter(JsonFormatter())
_handler.addFilter(_Redact())
_handler.setLevel(logging.DEBUG)
logging.getLogger().addHandler(_handler)
logging.getLogger("broker").setLevel(logging.DEBUG)
logging.getLogger("connectors").setLevel(logging.DEBUG)

_AZURE_ENV = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "AZURE_KUBERNETES_TOKEN_PROXY",
)
_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def _loopback(host: object) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly, instead of reaching out, if anything in the test process tries a non-loopback
    address (IMDS above all); and start every test without Azure or proxy settings."""
    for name in _AZURE_ENV + _PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _loopback(host):
            raise OSError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def check(address: Any) -> None:
        if isinstance(address, tuple) and not _loopback(address[0]):
            raise OSError(f"test tried to connect to {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


KEY = "test-client-key-0123456789"
OTHER_KEY = "other-client-key-0123456789"

BASE_CONFIG = """
[server]
socket = "$socket"
socket_mode = "0600"
http = "127.0.0.1:0"
health = "127.0.0.1:0"
shutdown_grace = 5

[identity]
source = "app_service"
endpoint = "$identity_url"
timeout = 2
attempts = 2
"""

DEFAULT_CLIENTS = f"""
[[clients]]
name = "owner"
uids = [{os.getuid()}]
resources = ["*"]
secrets = ["*/*"]
databases = ["*"]
identities = ["*"]
admin = true

[[clients]]
name = "tcp"
key = "{KEY}"
resources = ["*"]
identities = ["11111111-2222-3333-4444-555555555555"]

[[clients]]
name = "limited"
key = "{OTHER_KEY}"
resources = ["https://database.windows.net/"]
"""


def record(value: str) -> str:
    SERVED_VALUES.add(value)
    return value


# (test, identity requests, key vault requests) as the emulator saw them, for the summary.
UPSTREAM_LOAD: list[tuple[str, int, int]] = []


@pytest.fixture
async def emulator(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Emulator]:
    async with Emulator(state_dir=tmp_path / "emulator") as emu:
        yield emu
        UPSTREAM_LOAD.append((request.node.nodeid, emu.requests("identity"), emu.requests("keyvault")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not UPSTREAM_LOAD:
        return
    terminalreporter.section("upstream requests, heaviest tests")
    for nodeid, identity, vault in sorted(UPSTREAM_LOAD, key=lambda row: -(row[1] + row[2]))[:3]:
        terminalreporter.write_line(f"{identity:5d} identity  {vault:5d} key vault  {nodeid}")


class RunningBroker:
    """A broker under test, with clients for each of its listeners."""

    def __init__(self, broker: Broker, emulator: Emulator) -> None:
        self.broker = broker
        self.emulator = emulator
        sock = broker.listener("socket")
        http = broker.listener("http")
        health = broker.listener("health")
        self.socket_path = sock.address if sock else ""
        self.http_url = f"http://{http.address}" if http else ""
        self.health_url = f"http://{health.address}" if health else ""
        self._sessions: list[aiohttp.ClientSession] = []

    def unix(self) -> aiohttp.ClientSession:
        """A session whose requests go over the broker's Unix socket (use http://localhost/...)."""
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket_path))
        self._sessions.append(session)
        return session

    def tcp(self) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession()
        self._sessions.append(session)
        return session

    async def token(self, resource: str, *, key: str = KEY, **params: str) -> tuple[int, dict[str, Any]]:
        async with self.tcp().get(
            f"{self.http_url}/msi/token",
            params={"resource": resource, **params},
            headers={"X-IDENTITY-HEADER": key},
        ) as response:
            body = await response.json()
            if "access_token" in body:
                record(body["access_token"])
            return response.status, body

    async def close(self) -> None:
        for session in self._sessions:
            await session.close()


BrokerFactory = Callable[..., Awaitable[RunningBroker]]


@pytest.fixture
async def make_broker(emulator: Emulator, tmp_path: Path) -> AsyncIterator[BrokerFactory]:
    """Start brokers wired to the emulator; ``extra`` TOML is appended to the base config."""
    running: list[RunningBroker] = []

    async def start(extra: str = DEFAULT_CLIENTS, *, base: str = BASE_CONFIG,
                    environ: dict[str, str] | None = None) -> RunningBroker:
        text = Template(base + extra).safe_substitute(
            socket=str(tmp_path / f"b{len(running)}" / "broker.sock"),
            identity_url=emulator.identity_url,
            vault_url=emulator.vault_url("main"),
            ca_file=str(emulator.ca_file),
        )
        env = {"IDENTITY_HEADER": emulator.identity_header, **(environ or {})}
        config = parse_config(text, environ=env, base_dir=tmp_path)
        broker = Broker(config, environ=env, emulator=emulator)
        await broker.start()
        item = RunningBroker(broker, emulator)
        running.append(item)
        return item

    yield start
    for item in running:
        await item.close()
        await item.broker.stop()


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> RunningBroker:
    return await make_broker()
