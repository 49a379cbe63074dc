"""The Emulator: owns both listeners, the shared state, fault queues and counters.

Each target (``identity``, ``keyvault``) gets its own socket, bound here rather than by aiohttp, so
``refuse()`` can close it (clients then get ECONNREFUSED) and later bind the very same port again.
The identity port also serves a small control API under ``/_emulator/`` for people running the
emulator standalone; control requests are neither counted nor subject to faults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import shutil
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import identity, keyvault
from .faults import TARGETS, Fault, FaultQueue, Target, check_target, fault_from_json
from .identity import IdentityService
from .keyvault import DEFAULT_VAULT, KeyVaultService, SecretStore, epoch, normalize_vault
from .tls import TlsFiles, create_tls_files
from .tokens import TokenIssuer

log = logging.getLogger("broker.emulator")

DEFAULT_TENANT_ID = "e1e1e1e1-0000-4000-8000-00000000e001"
CONTROL_PREFIX = "/_emulator/"

# In-flight requests (a delayed fault, say) get this long when a listener stops; the emulator must never
# hold up a test's teardown for aiohttp's default of a minute.
_SHUTDOWN_TIMEOUT = 0.5

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Stats:
    identity_requests: int
    keyvault_requests: int
    tokens_issued: int

    def as_json(self) -> dict[str, object]:
        return {
            "requests": {"identity": self.identity_requests, "keyvault": self.keyvault_requests},
            "tokens_issued": self.tokens_issued,
        }


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Lets refuse(False) re-bind the port while connections from before are still in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Listener:
    """One port. Its app is rebuilt on every start because an aiohttp app cannot be set up twice."""

    def __init__(
        self,
        host: str,
        port: int,
        make_app: Callable[[], web.Application],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._make_app = make_app
        self.ssl_context = ssl_context
        self._runner: web.AppRunner | None = None

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        if self._runner is not None:
            return
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        runner = web.AppRunner(self._make_app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        try:
            await runner.setup()
            await web.SockSite(runner, sock, ssl_context=self.ssl_context).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            # cleanup() closes the listening socket and any kept-alive connections, like a stopped server.
            await runner.cleanup()


class Emulator:
    """Azure managed identity (App Service and IMDS shapes) and Key Vault secrets, on loopback ports."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        identity_port: int = 0,
        keyvault_port: int = 0,
        token_lifetime: float = 3600,
        refresh_in: float | None = None,
        identity_header: str | None = None,
        tenant_id: str = DEFAULT_TENANT_ID,
        state_dir: Path | None = None,
    ) -> None:
        _check_lifetime(token_lifetime)
        _check_refresh_in(refresh_in)
        self.host = host
        self.tenant_id = tenant_id
        self._state_dir = state_dir
        self._owned_dir: Path | None = None
        self._issuer = TokenIssuer(tenant_id)
        self._store = SecretStore()
        self._faults = FaultQueue()
        self._requests: dict[Target, int] = dict.fromkeys(TARGETS, 0)
        self._identity = IdentityService(
            self._issuer,
            identity_header if identity_header is not None else secrets.token_urlsafe(32),
            token_lifetime=token_lifetime,
            refresh_in=refresh_in,
        )
        self._keyvault = KeyVaultService(self._store, self._issuer)
        self._tls: TlsFiles | None = None
        self._listeners: dict[Target, _Listener] = {
            "identity": _Listener(host, identity_port, self._identity_app),
            "keyvault": _Listener(host, keyvault_port, self._keyvault_app),
        }
        self._state = "new"

    # lifecycle

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("an Emulator can be started once")
        self._state = "started"
        try:
            directory = self._state_dir
            if directory is None:
                directory = self._owned_dir = Path(tempfile.mkdtemp(prefix="tokenbroker-emulator-"))
            self._tls = await asyncio.to_thread(create_tls_files, directory, extra_names=(self.host,))
            self._listeners["keyvault"].ssl_context = self._tls.server_context()
            for listener in self._listeners.values():
                await listener.start()
        except BaseException:
            await self.close()
            raise
        log.info("emulator listening: identity on %s, key vault on %s", self.imds_host, self.keyvault_base)

    async def close(self) -> None:
        self._state = "closed"
        for listener in self._listeners.values():
            await listener.stop()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # addresses

    @property
    def identity_port(self) -> int:
        return self._port("identity")

    @property
    def keyvault_port(self) -> int:
        return self._port("keyvault")

    @property
    def imds_host(self) -> str:
        """Value for AZURE_POD_IDENTITY_AUTHORITY_HOST; the IMDS path is /metadata/identity/oauth2/token."""
        return f"http://{_format_host(self.host)}:{self.identity_port}"

    @property
    def identity_url(self) -> str:
        """Value for IDENTITY_ENDPOINT (App Service / Azure Automation shape)."""
        return self.imds_host + identity.APP_SERVICE_PATH

    @property
    def identity_header(self) -> str:
        """Value for IDENTITY_HEADER: requests must send it as X-IDENTITY-HEADER."""
        return self._identity.identity_header

    @property
    def keyvault_base(self) -> str:
        return f"https://{_format_host(self.host)}:{self.keyvault_port}"

    def vault_url(self, vault: str) -> str:
        """The vault_url for SecretClient; vault "default" is the bare origin, others a path under it."""
        name = normalize_vault(vault)
        return self.keyvault_base if name == DEFAULT_VAULT else f"{self.keyvault_base}/{name}"

    @property
    def ca_file(self) -> Path:
        if self._tls is None:
            raise RuntimeError("the CA exists once the emulator has started")
        return self._tls.ca_file

    # token settings

    @property
    def token_lifetime(self) -> float:
        return self._identity.token_lifetime

    @token_lifetime.setter
    def token_lifetime(self, seconds: float) -> None:
        _check_lifetime(seconds)
        self._identity.token_lifetime = seconds

    @property
    def refresh_in(self) -> float | None:
        return self._identity.refresh_in

    @refresh_in.setter
    def refresh_in(self, seconds: float | None) -> None:
        _check_refresh_in(seconds)
        self._identity.refresh_in = seconds

    def verify_token(self, token: str, audience: str) -> dict[str, Any]:
        """Claims of a token this emulator issued for ``audience``; raises InvalidToken otherwise."""
        return self._issuer.verify(token, audience)

    # secrets

    def set_secret(
        self,
        vault: str,
        name: str,
        value: str,
        *,
        enabled: bool = True,
        content_type: str | None = None,
        tags: dict[str, str] | None = None,
        not_before: datetime | None = None,
        expires_on: datetime | None = None,
    ) -> str:
        """Add a new version, which becomes the latest; returns its version id."""
        secret = self._store.set(
            vault,
            name,
            value,
            enabled=enabled,
            content_type=content_type,
            tags=tags,
            not_before=None if not_before is None else epoch(not_before),
            expires_on=None if expires_on is None else epoch(expires_on),
        )
        return secret.version

    def delete_secret(self, vault: str, name: str) -> None:
        self._store.delete(vault, name)

    def set_enabled(self, vault: str, name: str, enabled: bool, version: str | None = None) -> None:
        self._store.set_enabled(vault, name, enabled, version)

    def deny(self, vault: str, name: str) -> None:
        """Remove 'get' permission on one secret: reads answer 403 Forbidden / AccessDenied."""
        self._store.deny(vault, name)

    # faults and observation

    def add_fault(self, target: Target, fault: Fault) -> None:
        self._faults.add(check_target(target), fault)

    def clear_faults(self) -> None:
        self._faults.clear()

    async def refuse(self, target: Target, refuse: bool) -> None:
        """Stop listening on ``target``'s port (connections are refused), or listen on it again."""
        listener = self._listeners[check_target(target)]
        if refuse:
            await listener.stop()
        elif self._state == "started":
            await listener.start()
        log.info("%s: %s", target, "refusing connections" if refuse else "listening again")

    def requests(self, target: Target) -> int:
        """Requests received by ``target`` (faulted ones included, control API excluded)."""
        return self._requests[check_target(target)]

    @property
    def tokens_issued(self) -> int:
        return self._identity.tokens_issued

    @property
    def stats(self) -> Stats:
        return Stats(
            identity_requests=self._requests["identity"],
            keyvault_requests=self._requests["keyvault"],
            tokens_issued=self._identity.tokens_issued,
        )

    def reset_stats(self) -> None:
        self._requests = dict.fromkeys(TARGETS, 0)
        self._identity.tokens_issued = 0

    def describe(self) -> list[str]:
        """Human-readable lines: how to point clients at this emulator."""
        return [
            f"managed identity (App Service): IDENTITY_ENDPOINT={self.identity_url}",
            f"                                IDENTITY_HEADER={self.identity_header}",
            f"managed identity (IMDS):        AZURE_POD_IDENTITY_AUTHORITY_HOST={self.imds_host}",
            f"key vault (vault 'default'):    {self.vault_url(DEFAULT_VAULT)}",
            f"key vault (vault '<name>'):     {self.keyvault_base}/<name>",
            f"CA certificate (trust it):      {self.ca_file}",
            f"tenant:                         {self.tenant_id}",
            f"control API:                    {self.imds_host}{CONTROL_PREFIX}faults, "
            f"{self.imds_host}{CONTROL_PREFIX}stats",
        ]

    # internals

    def _port(self, target: Target) -> int:
        if self._state == "new":
            raise RuntimeError("ports are known once the emulator has started")
        return self._listeners[target].port

    def _identity_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware("identity")])
        app.add_routes(self._identity.routes())
        app.add_routes(
            [
                web.post(CONTROL_PREFIX + "faults", self._post_fault),
                web.delete(CONTROL_PREFIX + "faults", self._delete_faults),
                web.get(CONTROL_PREFIX + "stats", self._get_stats),
                web.delete(CONTROL_PREFIX + "stats", self._delete_stats),
            ]
        )
        return app

    def _keyvault_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware("keyvault")])
        app.add_routes(self._keyvault.routes())
        return app

    def _middleware(self, target: Target) -> Middleware:
        @web.middleware
        async def observe(request: web.Request, handler: _Handler) -> web.StreamResponse:
            if target == "identity" and request.path.startswith(CONTROL_PREFIX):
                return await handler(request)
            self._requests[target] += 1
            fault = self._faults.take(target, request.path)
            if fault is None:
                response = await handler(request)
            else:
                response = await self._inject(target, fault, request, handler)
            log.debug("%s: %s %s -> %s", target, request.method, request.path, response.status)
            return response

        return observe

    async def _inject(
        self, target: Target, fault: Fault, request: web.Request, handler: _Handler
    ) -> web.StreamResponse:
        log.info("%s: injecting %s fault into %s %s", target, fault.mode, request.method, request.path)
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.mode == "delay":
            return await handler(request)
        if fault.mode == "drop":
            if request.transport is not None:
                request.transport.close()
            # aiohttp's attempt to send this finds the transport closing and treats it as a client that
            # went away: nothing reaches the wire and nothing is logged as an error.
            return web.Response(status=499)
        response = (
            identity.fault_response(fault.status)
            if target == "identity"
            else keyvault.fault_response(fault.status, self.tenant_id)
        )
        if fault.retry_after_header is not None:
            response.headers["Retry-After"] = fault.retry_after_header
        return response

    async def _post_fault(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            target, fault = fault_from_json(body)
        except ValueError as exc:  # JSONDecodeError is a ValueError
            return identity.error_response(400, "invalid_request", str(exc))
        self.add_fault(target, fault)
        return web.json_response({"target": target, "fault": fault.as_json()}, status=201)

    async def _delete_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return web.Response(status=204)

    async def _get_stats(self, request: web.Request) -> web.Response:
        body = self.stats.as_json()
        body["pending_faults"] = {
            target: [{**fault.as_json(), "remaining": left} for fault, left in self._faults.pending(target)]
            for target in TARGETS
        }
        return web.json_response(body)

    async def _delete_stats(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.Response(status=204)


def _check_lifetime(seconds: float) -> None:
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"token_lifetime must be a positive number of seconds, not {seconds}")


def _check_refresh_in(seconds: float | None) -> None:
    if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"refresh_in must be None or a positive number of seconds, not {seconds}")
