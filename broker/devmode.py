"""``serve --dev``: the broker's real code paths against the embedded emulator."""

from __future__ import annotations

import os
import secrets
import shlex
import stat
from importlib import resources
from pathlib import Path
from string import Template

from broker.client import dev_socket_path
from broker.config import Config, parse_config
from broker.emulator import Emulator
from broker.service import StartupError

DEV_HTTP = "127.0.0.1:8765"
DEV_HEALTH = "127.0.0.1:8766"


def dev_environ() -> dict[str, str]:
    """The broker's environment in dev mode: a fresh client key for TCP callers."""
    return {**os.environ, "TOKENBROKER_DEV_KEY": secrets.token_urlsafe(24)}


def private_dir(path: Path) -> None:
    """Create ``path`` for our socket, or accept it only if it is ours and closed to others.

    The dev socket lives under /tmp when there is no XDG_RUNTIME_DIR, where another user could
    have created the directory first and so watch or replace the socket.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise StartupError(f"{path} must be a directory of yours that only you can use (mode 0700); "
                           "remove it, or set TOKENBROKER_SOCKET to a path of your own")


def dev_config(emulator: Emulator, environ: dict[str, str], *, http: str = DEV_HTTP,
               health: str = DEV_HEALTH, socket: str | None = None) -> Config:
    if socket is None and not environ.get("TOKENBROKER_SOCKET"):
        private_dir(Path(dev_socket_path(environ)).parent)
    template = Template(resources.files("broker").joinpath("dev.toml").read_text())
    text = template.substitute(
        socket=socket if socket is not None else dev_socket_path(environ),
        http=http,
        health=health,
        uid=os.getuid(),
        vault_url=emulator.vault_url("demo"),
        ca_file=str(emulator.ca_file),
    )
    return parse_config(text, environ=environ, source="<dev config>")


def announcement(addresses: dict[str, str], key: str) -> str:
    """What a newcomer sees after ``serve --dev`` starts: where it listens and what to paste."""
    sock = addresses.get("socket", "")
    http = addresses.get("http", "")
    health = addresses.get("health", "")
    q = shlex.quote
    lines = [
        "",
        "tokenbroker is running in dev mode (no Azure: tokens and the 'demo' vault come from the",
        "embedded emulator; every other code path is the production one).",
        "",
    ]
    if sock:
        lines += [f"  Unix socket   {sock}"]
    if http:
        lines += [f"  HTTP          http://{http}   (TCP callers send X-IDENTITY-HEADER: <key>)"]
    if health:
        lines += [f"  probes        http://{health}/readyz  /livez  /startupz  /metrics"]
    lines += ["", "Try, in another terminal:", ""]
    if sock:
        lines += [
            "  # a token over the socket (you are the 'dev' client by your uid)",
            f"  curl -s --unix-socket {q(sock)} -H 'Metadata: true' \\",
            "       'http://localhost/msi/token?resource=https://vault.azure.net'",
            "",
            "  # a Key Vault secret, value only",
            f"  curl -s --unix-socket {q(sock)} -H 'Metadata: true' \\",
            "       'http://localhost/v1/secrets/demo/greeting?format=raw'",
            "",
            "  # the same through the command-line client",
            f"  TOKENBROKER_SOCKET={q(sock)} tokenbroker secret demo greeting",
            f"  TOKENBROKER_SOCKET={q(sock)} tokenbroker status",
            "",
        ]
    if http:
        lines += [
            "  # an unchanged runbook or Azure SDK, via the drop-in identity endpoint",
            f"  export IDENTITY_ENDPOINT=http://{http}/msi/token IDENTITY_HEADER={q(key)}",
            "  curl -s -H \"X-IDENTITY-HEADER: $IDENTITY_HEADER\" \\",
            "       \"$IDENTITY_ENDPOINT?resource=https://vault.azure.net&api-version=2019-08-01\"",
            "",
        ]
    lines += ["Stop with Ctrl-C (or SIGTERM).", ""]
    return "\n".join(lines)
