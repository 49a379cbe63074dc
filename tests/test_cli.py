"""The command line: help, exit codes, client commands, and `serve --dev` as a newcomer runs it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import KEY, LOG_CAPTURE, RunningBroker, record

VAULT = "https://vault.azure.net"


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", *args, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_help_teaches() -> None:
    code, out, _ = await cli("--help")
    assert code == 0
    assert "tokenbroker serve --dev" in out and "check-config" in out
    code, out, _ = await cli("serve", "--help")
    assert code == 0 and "SIGTERM" in out and "TOKENBROKER_CONFIG" in out
    code, _, _ = await cli()
    assert code == 2


async def test_serve_without_config_names_dev(tmp_path: Path) -> None:
    code, _, err = await cli("serve", env={"TOKENBROKER_CONFIG": str(tmp_path / "missing.toml")})
    assert code == 2
    assert "--dev" in err and "missing.toml" in err
    assert "Traceback" not in err


async def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[server]\nsocket = ""\n[[clients]]\nname = "a"\nuids = [1001]\n')
    code, out, _ = await cli("check-config", str(good))
    assert (code, out.strip()) == (0, f"{good}: ok (1 clients, 0 vaults, 0 databases)")
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nhttp = "0.0.0.0:8765"\nbogus = 1\n[vaults.main]\nurl = "http://x"\n')
    code, out, err = await cli("check-config", str(bad))
    assert code == 2
    lines = err.strip().splitlines()
    assert any(line.startswith("server.http: ") for line in lines)
    assert "server.bogus: unknown key" in lines
    assert any(line.startswith("vaults.main.url: ") for line in lines)
    assert "Traceback" not in err
    code, _, err = await cli("serve", "--config", str(bad))
    assert code == 2 and "server.bogus: unknown key" in err


async def test_client_commands(broker: RunningBroker) -> None:
    env = {"TOKENBROKER_SOCKET": broker.socket_path}
    code, out, err = await cli("token", VAULT, env=env)
    assert code == 0, err
    broker.emulator.verify_token(record(out.strip()), VAULT)
    code, out, _ = await cli("token", VAULT, "--json", "--socket", broker.socket_path)
    assert code == 0 and json.loads(out)["resource"] == VAULT
    code, out, _ = await cli("status", env=env)
    assert code == 0
    assert "ready: yes" in out and VAULT in out
    assert re.search(r"(59m\d\ds|1h00m) +(29m|30m)", out), out
    code, out, _ = await cli("status", "--json", env=env)
    assert json.loads(out)["tokens"][0]["resource"] == VAULT


async def test_client_command_errors(broker: RunningBroker, tmp_path: Path) -> None:
    code, _, err = await cli("token", VAULT, "--socket", str(tmp_path / "nothing.sock"))
    assert code == 1
    assert "cannot reach the broker" in err and "TOKENBROKER_SOCKET" in err
    await broker.emulator.refuse("identity", True)
    code, _, err = await cli("token", "https://cold.example", "--socket", broker.socket_path)
    assert code == 1
    assert "identity endpoint" in err and "503" in err


async def test_env_prints_identity_endpoint(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nsocket = ""\nhttp = "127.0.0.1:8765"\n'
                      f'[[clients]]\nname = "runbooks"\nkey = "{KEY}"\nresources = ["*"]\n')
    code, out, _ = await cli("env", "--config", str(config), "--client", "runbooks")
    assert code == 0
    assert out.splitlines() == ["IDENTITY_ENDPOINT=http://127.0.0.1:8765/msi/token", f"IDENTITY_HEADER={KEY}"]
    code, _, err = await cli("env", "--config", str(config), "--client", "nobody")
    assert code == 2 and "nobody" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serve_dev_works_out_of_the_box(tmp_path: Path) -> None:
    sock = tmp_path / "dev" / "broker.sock"
    http, health = free_port(), free_port()
    env = {**os.environ, "TOKENBROKER_SOCKET": str(sock), "TOKENBROKER_HTTP": f"127.0.0.1:{http}",
           "TOKENBROKER_HEALTH": f"127.0.0.1:{health}"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", "--dev", env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    shown = ""
    deadline = time.monotonic() + 30
    while "Stop with Ctrl-C" not in shown and time.monotonic() < deadline:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            break
        shown += line.decode()
    try:
        assert str(sock) in shown and f"127.0.0.1:{http}" in shown
        # run the printed curl command for a token, as a newcomer would paste it
        command = re.search(r"curl -s --unix-socket .*?\n.*?'http://localhost/msi/token[^']*'", shown)
        assert command is not None, shown
        pasted = await asyncio.create_subprocess_shell(command.group(0).replace("\\\n", " "),
                                                       stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(pasted.communicate(), 30)
        assert "access_token" in json.loads(out)
        record(json.loads(out)["access_token"])
        # and the printed secret command
        command = re.search(r"curl -s --unix-socket .*?\n.*?'http://localhost/v1/secrets/demo/[^']*'", shown)
        assert command is not None, shown
        pasted = await asyncio.create_subprocess_shell(command.group(0).replace("\\\n", " "),
                                                       stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(pasted.communicate(), 30)
        assert record(out.decode()).startswith("Hello")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        LOG_CAPTURE.write(err.decode())
    assert proc.returncode == 0
    assert not sock.exists()


async def test_serve_usage_mistakes_are_named(tmp_path: Path) -> None:
    code, _, err = await cli("serve", "--dev", env={"TOKENBROKER_LOG_LEVEL": "verbose"})
    assert code == 2 and "TOKENBROKER_LOG_LEVEL" in err and "Traceback" not in err
    code, _, err = await cli("serve", "--dev", "--config", str(tmp_path / "x.toml"))
    assert code == 2 and 'identity.source = "dev"' in err


def test_status_table_renders_negative_and_long_times() -> None:
    from broker.cli import render_status

    text = render_status({
        "ready": False, "checks": {"tokens": "pending"},
        "tokens": [{"resource": "r", "identity": "default", "expires_in": -90, "refresh_in": 7260,
                    "last_error": ""}],
    })
    assert "-1m30s" in text and "2h01m" in text and "ready: no" in text
