"""The Emulator: owns both listeners, the shared state, fault queues and counters.

Each listener (``identity``: plain HTTP, ``keyvault``: HTTPS) gets its own socket, bound here rather than
by aiohttp, so ``refuse()`` can close it (clients then get ECONNREFUSED) and later bind the very same port
again. The identity port also serves a small control API under ``/_emulator/`` for people running the
emulator standalone; control requests are neither counted nor subject to faults.

Targets are what requests are counted, recorded and faulted under. ``identity`` means "where tokens come
from", whichever source the broker uses: the managed-identity routes (App Service, IMDS, Arc) on the HTTP
port and Entra ID's routes (module ``aad``) on the HTTPS port, because Entra must be HTTPS. So a test switching
identity sources keeps the same ``requests("identity")`` and fault target, as the broker keeps its one
"identity" upstream. ``keyvault`` is every other request on the HTTPS port. ``refuse`` works per port:
refuse ``keyvault`` to make Entra ID unreachable too.
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
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import aad, identity, keyvault
from .aad import AadService
from .arc import ArcKey
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

# Form fields whose values a request record must never hold.
_SECRET_FIELDS = frozenset({"client_secret", "client_assertion"})
_RECORD_LIMIT = 1000


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


@dataclass(frozen=True)
class ReceivedRequest:
    """What a counted request carried, minus anything secret: header names only, secret form values masked."""

    target: Target
    method: str
    path: str
    query: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str] = field(default_factory=dict)
    headers: frozenset[str] = frozenset()  # lower-case names

    def has_header(self, name: str) -> bool:
        return name.lower() in self.headers


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
    """Azure managed identity (App Service, IMDS, Arc), Entra ID for apps, and Key Vault secrets, on loopback.

    ``arc_key_dir``: where the Arc challenge's key file goes (None, the default: Arc off, so nothing is
    written outside the emulator's own state unless asked). azure-identity only accepts the
    path ``/var/opt/azcmagent/tokens`` (ARC_KEY_DIR), which usually needs root; when the file cannot be written, Arc is
    off and ``arc_unavailable_reason`` says why. The file and any directory created for it go at ``close``.
    """

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
        arc_key_dir: Path | None = None,
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
        # Connections seen per target, weakly: clients that reuse connections show up as few.
        self._connections: dict[Target, weakref.WeakSet[Any]] = {t: weakref.WeakSet() for t in TARGETS}
        self._connection_counts: dict[Target, int] = dict.fromkeys(TARGETS, 0)
        self._identity = IdentityService(
            self._issuer,
            identity_header if identity_header is not None else secrets.token_urlsafe(32),
            token_lifetime=token_lifetime,
            refresh_in=refresh_in,
        )
        self._aad = AadService(
            self._issuer,
            token_lifetime=lambda: self._identity.token_lifetime,
            refresh_in=lambda: self._identity.refresh_in,
        )
        self._arc_key_dir = arc_key_dir
        self._received: deque[ReceivedRequest] = deque(maxlen=_RECORD_LIMIT)
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
            await self._prepare_arc()
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
        arc, self._identity.arc = self._identity.arc, None
        if arc is not None:
            arc.remove()
        self._identity.arc_problem = "the emulator is closed"
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
    def arc_endpoint(self) -> str:
        """Value for IDENTITY_ENDPOINT on an Arc machine (with IMDS_ENDPOINT=``imds_host``)."""
        return self.imds_host + identity.IMDS_PATH

    @property
    def arc_enabled(self) -> bool:
        return self._identity.arc is not None

    @property
    def arc_unavailable_reason(self) -> str:
        """Why Arc is off ("" when it is on)."""
        return "" if self._identity.arc is not None else self._identity.arc_problem

    @property
    def arc_key_file(self) -> Path:
        if self._identity.arc is None:
            raise RuntimeError(f"Azure Arc is off: {self._identity.arc_problem}")
        return self._identity.arc.path

    @property
    def authority_host(self) -> str:
        """Value for AZURE_AUTHORITY_HOST (Entra ID for apps); clients must trust ``ca_file``."""
        return self.keyvault_base

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

    # app registrations (Entra ID)

    def register_app(self, client_id: str, secret: str | None = None) -> str:
        """Register an app in the tenant (or replace its secret); returns its client secret, random unless given."""
        return self._aad.register(client_id, secret)

    def federated_token(
        self, client_id: str, subject: str = aad.DEFAULT_SUBJECT, *, lifetime: float = 3600
    ) -> str:
        """A service-account token that Entra here accepts as ``client_id``'s client assertion.

        It is what AKS projects into AZURE_FEDERATED_TOKEN_FILE: the call also adds the federated identity
        credential (this emulator's issuer, ``subject``) to the app, which must be registered.
        """
        return self._aad.federated_token(client_id, subject, lifetime)

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

    def connections(self, target: Target) -> int:
        """Distinct connections that carried counted requests to ``target``."""
        return self._connection_counts[check_target(target)]

    def received(self, target: Target | None = None) -> list[ReceivedRequest]:
        """The latest counted requests (up to 1000), oldest first; all targets unless one is given."""
        wanted = None if target is None else check_target(target)
        return [item for item in self._received if wanted is None or item.target == wanted]

    @property
    def tokens_issued(self) -> int:
        return self._identity.tokens_issued + self._aad.tokens_issued

    @property
    def stats(self) -> Stats:
        return Stats(
            identity_requests=self._requests["identity"],
            keyvault_requests=self._requests["keyvault"],
            tokens_issued=self.tokens_issued,
        )

    def reset_stats(self) -> None:
        self._requests = dict.fromkeys(TARGETS, 0)
        self._connection_counts = dict.fromkeys(TARGETS, 0)
        self._connections = {t: weakref.WeakSet() for t in TARGETS}
        self._identity.tokens_issued = 0
        self._aad.tokens_issued = 0
        self._received.clear()

    def describe(self) -> list[str]:
        """Human-readable lines: how to point clients at this emulator."""
        return [
            f"managed identity (App Service): IDENTITY_ENDPOINT={self.identity_url}",
            f"                                IDENTITY_HEADER={self.identity_header}",
            f"managed identity (IMDS):        AZURE_POD_IDENTITY_AUTHORITY_HOST={self.imds_host}",
            (
                f"managed identity (Azure Arc):   IDENTITY_ENDPOINT={self.arc_endpoint} IMDS_ENDPOINT={self.imds_host}"
                if self.arc_enabled
                else f"managed identity (Azure Arc):   off ({self.arc_unavailable_reason})"
            ),
            f"Entra ID (app registrations):   AZURE_AUTHORITY_HOST={self.authority_host} "
            f"(register apps with POST {self.imds_host}{CONTROL_PREFIX}apps)",
            f"key vault (vault 'default'):    {self.vault_url(DEFAULT_VAULT)}",
            f"key vault (vault '<name>'):     {self.keyvault_base}/<name>",
            f"CA certificate (trust it):      {self.ca_file}",
            f"tenant:                         {self.tenant_id}",
            f"control API:                    {self.imds_host}{CONTROL_PREFIX}faults, "
            f"{self.imds_host}{CONTROL_PREFIX}stats, {self.imds_host}{CONTROL_PREFIX}apps",
        ]

    # internals

    async def _prepare_arc(self) -> None:
        if self._arc_key_dir is None:
            self._identity.arc_problem = "disabled (arc_key_dir=None)"
            return
        try:
            self._identity.arc = await asyncio.to_thread(ArcKey.create, self._arc_key_dir)
        except OSError as exc:
            # Not an error: most people run the emulator without root, and only Arc needs the directory.
            self._identity.arc_problem = f"cannot write a key file in {self._arc_key_dir}: {exc.strerror or exc}"
            log.info("Azure Arc is off: %s", self._identity.arc_problem)

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
                web.post(CONTROL_PREFIX + "apps", self._post_app),
            ]
        )
        return app

    def _keyvault_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware("keyvault")])
        # Entra's routes first: Key Vault's catch-all would otherwise take them.
        app.add_routes(self._aad.routes())
        app.add_routes(self._keyvault.routes())
        return app

    def _middleware(self, listener: Target) -> Middleware:
        @web.middleware
        async def observe(request: web.Request, handler: _Handler) -> web.StreamResponse:
            if listener == "identity" and request.path.startswith(CONTROL_PREFIX):
                return await handler(request)
            target: Target = "identity" if aad.is_aad_path(request.path) else listener
            self._requests[target] += 1
            if request.transport is not None and request.transport not in self._connections[target]:
                self._connections[target].add(request.transport)
                self._connection_counts[target] += 1
            await self._record(target, request)
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
        if aad.is_aad_path(request.path):
            response = aad.fault_response(fault.status)
        elif target == "identity":
            response = identity.fault_response(fault.status)
        else:
            response = keyvault.fault_response(fault.status, self.tenant_id)
        if fault.retry_after_header is not None:
            response.headers["Retry-After"] = fault.retry_after_header
        return response

    async def _record(self, target: Target, request: web.Request) -> None:
        form: dict[str, str] = {}
        if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
            # aiohttp keeps the parsed form, so the handler reads the same one again.
            posted = await request.post()
            form = {k: "[redacted]" if k in _SECRET_FIELDS else str(v) for k, v in posted.items()}
        self._received.append(
            ReceivedRequest(
                target=target,
                method=request.method,
                path=request.path,
                query=dict(request.query),
                form=form,
                headers=frozenset(name.lower() for name in request.headers),
            )
        )

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

    async def _post_app(self, request: web.Request) -> web.Response:
        """Register an app: ``{"client_id", "secret"?, "subject"?}`` -> its secret and a federated token."""
        try:
            body = json.loads(await request.text())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            unknown = sorted(set(body) - {"client_id", "secret", "subject"})
            if unknown:
                raise ValueError(f"unknown field(s): {', '.join(unknown)}")
            client_id, secret, subject = body.get("client_id"), body.get("secret"), body.get("subject")
            if not isinstance(client_id, str) or not client_id:
                raise ValueError("client_id must be a non-empty string")
            if secret is not None and not isinstance(secret, str):
                raise ValueError("secret must be a string")
            if subject is not None and (not isinstance(subject, str) or not subject):
                raise ValueError("subject must be a non-empty string")
            secret = self.register_app(client_id, secret)
            token = self.federated_token(client_id, subject or aad.DEFAULT_SUBJECT)
        except ValueError as exc:
            return identity.error_response(400, "invalid_request", str(exc))
        return web.json_response(
            {
                "client_id": client_id,
                "tenant_id": self.tenant_id,
                "authority_host": self.authority_host,
                "secret": secret,
                "federated_token": token,
            },
            status=201,
        )

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
