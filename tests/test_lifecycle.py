"""The broker as a real process: start, probes, SIGTERM and /quitquitquit draining, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from broker.emulator import Emulator, Fault
from tests.conftest import KEY, LOG_CAPTURE, record

VAULT = "https://vault.azure.net"


@dataclass
class BrokerProcess:
    proc: asyncio.subprocess.Process
    socket_path: str
    config_path: Path

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket_path))

    async def finish(self, timeout: float = 30) -> tuple[int, str]:
        _, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        text = err.decode()
        LOG_CAPTURE.write(text)  # for the canary check at the end of the suite
        assert self.proc.returncode is not None
        return self.proc.returncode, text


def write_config(tmp_path: Path, emulator: Emulator, extra: str = "", grace: float = 10) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[server]
socket = "{tmp_path / 'run' / 'broker.sock'}"
http = "127.0.0.1:0"
health = "127.0.0.1:0"
shutdown_grace = {grace}

[identity]
source = "app_service"
endpoint = "{emulator.identity_url}"
timeout = 5
warm = ["{VAULT}"]

[[clients]]
name = "owner"
uids = [{os.getuid()}]
resources = ["*"]
admin = true

[[clients]]
name = "tcp"
key = "{KEY}"
resources = ["*"]
{extra}
""")
    return path


async def start_broker(config: Path, emulator: Emulator) -> BrokerProcess:
    env = {**os.environ, "IDENTITY_HEADER": emulator.identity_header, "TOKENBROKER_LOG_LEVEL": "debug"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", "--config", str(config),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    sock = str(config.parent / "run" / "broker.sock")
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.returncode is not None or time.monotonic() > deadline:
            _, err = await proc.communicate()
            raise AssertionError(f"broker did not start: {err.decode()[-2000:]}")
        await asyncio.sleep(0.05)
    return BrokerProcess(proc, sock, config)


@pytest.fixture
async def running(tmp_path: Path, emulator: Emulator) -> AsyncIterator[BrokerProcess]:
    process = await start_broker(write_config(tmp_path, emulator), emulator)
    yield process
    if process.proc.returncode is None:
        process.proc.kill()
        await process.finish()


def slow_request(session: aiohttp.ClientSession) -> asyncio.Task[aiohttp.ClientResponse]:
    """A token request for an uncached resource, left in flight (the tests make the upstream slow)."""
    return asyncio.create_task(session.get(
        "http://localhost/msi/token", params={"resource": "https://slow.example"}, headers={"Metadata": "true"}))


async def wait_ready(process: BrokerProcess) -> None:
    async with process.session() as session:
        for _ in range(200):
            async with session.get("http://localhost/readyz") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("broker never became ready")


async def test_sigterm_lets_slow_inflight_request_finish(running: BrokerProcess, emulator: Emulator) -> None:
    await wait_ready(running)
    emulator.add_fault("identity", Fault(mode="delay", delay=2))
    async with running.session() as session:
        request = slow_request(session)
        await asyncio.sleep(0.5)  # the request is now waiting on the slow upstream
        running.proc.send_signal(signal.SIGTERM)
        for _ in range(100):  # the socket file goes as the drain starts
            if not os.path.exists(running.socket_path):
                break
            await asyncio.sleep(0.01)
        assert not os.path.exists(running.socket_path)
        # a successor can start on the same path while the old broker drains
        successor = await start_broker(running.config_path, emulator)
        response = await request
        assert response.status == 200
        record((await response.json())["access_token"])
    code, err = await running.finish()
    assert code == 0, err[-2000:]
    assert "stopping" in err
    assert os.path.exists(successor.socket_path)  # the old broker left the new file alone
    successor.proc.send_signal(signal.SIGTERM)
    code, _ = await successor.finish()
    assert code == 0
    assert not os.path.exists(successor.socket_path)


async def test_readiness_goes_503_at_once_when_draining(running: BrokerProcess, emulator: Emulator) -> None:
    await wait_ready(running)
    emulator.add_fault("identity", Fault(mode="delay", delay=2))
    async with running.session() as session:
        slow = slow_request(session)
        await asyncio.sleep(0.3)
        async with session.post("http://localhost/quitquitquit", headers={"Metadata": "true"}) as response:
            assert response.status == 202
        response = await slow
        assert response.status == 200
        response.release()
    code, _ = await running.finish()
    assert code == 0


async def test_probes_status_and_metrics(running: BrokerProcess) -> None:
    await wait_ready(running)
    async with running.session() as session:
        async with session.get("http://localhost/startupz") as response:
            assert response.status == 200
        async with session.get("http://localhost/readyz?verbose") as response:
            body = await response.json()
            assert body == {"status": "ready", "checks": {"listeners": "ok", "tokens": "ok", "draining": "ok"}}
        async with session.get("http://localhost/msi/token", params={"resource": VAULT},
                               headers={"Metadata": "true"}) as response:
            token = record((await response.json())["access_token"])
        async with session.get("http://localhost/v1/status", headers={"Metadata": "true"}) as response:
            status = await response.json()
            assert status["ready"] is True
            (entry,) = status["tokens"]
            assert entry["resource"] == VAULT and 3500 < entry["expires_in"] <= 3601  # exp is rounded up
            assert 1700 < entry["refresh_in"] <= 1801
            assert token not in json.dumps(status)
        async with session.get("http://localhost/metrics") as response:
            text = await response.text()
    assert 'tokenbroker_token_requests_total{outcome="hit",resource="https://vault.azure.net"} 1.0' in text
    assert 'tokenbroker_token_expires_in_seconds{identity="default",resource="https://vault.azure.net"}' in text
    assert 'tokenbroker_upstream_request_seconds_count{outcome="ok",upstream="identity"} 1.0' in text
    assert token not in text
    running.proc.send_signal(signal.SIGINT)
    code, _ = await running.finish()
    assert code == 0


async def test_not_ready_until_warm_up_succeeds(tmp_path: Path, emulator: Emulator) -> None:
    await emulator.refuse("identity", True)
    process = await start_broker(write_config(tmp_path, emulator), emulator)
    try:
        async with process.session() as session:
            await asyncio.sleep(0.5)
            async with session.get("http://localhost/readyz") as response:
                assert response.status == 503
                body = await response.json()
                assert body["checks"]["tokens"].startswith("pending")
            async with session.get("http://localhost/livez") as response:
                assert response.status == 200
            await emulator.refuse("identity", False)
        await wait_ready(process)
    finally:
        process.proc.send_signal(signal.SIGTERM)
        code, _ = await process.finish()
    assert code == 0


async def test_second_broker_on_same_socket_is_refused(running: BrokerProcess, emulator: Emulator) -> None:
    env = {**os.environ, "IDENTITY_HEADER": emulator.identity_header}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", "--config", str(running.config_path),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "another broker is listening" in err.decode()
    assert os.path.exists(running.socket_path)  # the running broker's socket is untouched


def test_readiness_after_a_partial_warm_up() -> None:
    from broker.api.control import readiness
    from broker.api.state import Lifecycle

    lifecycle = Lifecycle(started=True)
    assert readiness(lifecycle, 1)["tokens"].startswith("pending")  # one of several warm tokens
    lifecycle.warm_failed_at = 1
    assert readiness(lifecycle, 1)["tokens"].startswith("pending")
    assert readiness(lifecycle, 2)["tokens"] == "ok"  # a token obtained since the failed round
    lifecycle.warm_failed_at, lifecycle.warmed = None, True
    assert readiness(lifecycle, 0) == {"listeners": "ok", "tokens": "ok", "draining": "ok"}


async def test_second_signal_stops_at_once(tmp_path: Path, emulator: Emulator) -> None:
    process = await start_broker(write_config(tmp_path, emulator, grace=30), emulator)
    await wait_ready(process)
    emulator.add_fault("identity", Fault(mode="delay", delay=20))
    async with process.session() as session:
        slow = slow_request(session)
        await asyncio.sleep(0.5)
        process.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        started = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        code, err = await process.finish(timeout=10)
        slow.cancel()
    assert code == 1
    assert time.monotonic() - started < 5  # not the 30 s grace
    assert "second signal" in err
    assert not os.path.exists(process.socket_path)
