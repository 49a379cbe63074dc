"""A small synchronous client of a running broker, for the command-line client commands."""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

SYSTEM_SOCKET = "/run/tokenbroker/broker.sock"


def dev_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """Where ``serve --dev`` puts its socket: somewhere any user may write."""
    environ = os.environ if environ is None else environ
    runtime = environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(f"/tmp/tokenbroker-{os.getuid()}")  # noqa: S108
    return str(base / "tokenbroker" / "broker.sock") if runtime else str(base / "broker.sock")


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    if environ.get("TOKENBROKER_SOCKET"):
        return environ["TOKENBROKER_SOCKET"]
    if not Path(SYSTEM_SOCKET).exists() and Path(dev_socket_path(environ)).exists():
        return dev_socket_path(environ)
    return SYSTEM_SOCKET


class BrokerUnreachable(Exception):
    pass


class BrokerRefused(Exception):
    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(f"{description} ({status} {code})")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@dataclass(frozen=True)
class BrokerClient:
    socket_path: str
    timeout: float = 60.0

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                body: Any = None) -> Any:
        url = path + ("?" + urlencode(query) if query else "")
        headers = {"Metadata": "true"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, url, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise BrokerUnreachable(
                f"cannot reach the broker at {self.socket_path}: {exc.strerror} "
                "(is `tokenbroker serve` running? pass --socket or set TOKENBROKER_SOCKET)"
            ) from None
        except PermissionError:
            raise BrokerUnreachable(
                f"no permission to open {self.socket_path}: ask for your user or group to be given access"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise BrokerUnreachable(f"talking to the broker at {self.socket_path} failed: {exc}") from None
        finally:
            conn.close()
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            decoded = data.decode(errors="replace")
        if response.status >= 400:
            if isinstance(decoded, dict):
                raise BrokerRefused(response.status, str(decoded.get("error", "")),
                                    str(decoded.get("error_description", "")))
            raise BrokerRefused(response.status, "", str(decoded))
        return decoded

    def token(self, resource: str, client_id: str = "") -> Any:
        query = {"resource": resource, "api-version": "2019-08-01"}
        if client_id:
            query["client_id"] = client_id
        return self.request("GET", "/msi/token", query=query)

    def secret(self, vault: str, name: str, version: str = "") -> Any:
        path = f"/v1/secrets/{quote(vault, safe='')}/{quote(name, safe='')}"
        if version:
            path += f"/{quote(version, safe='')}"
        return self.request("GET", path)

    def status(self) -> Any:
        return self.request("GET", "/v1/status")
