"""Builds the broker from its configuration and runs it: the one module that wires the pieces."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from broker.api import make_app
from broker.api.state import DatabaseInfo, Lifecycle, Services
from broker.config import ClientConfig, Config, IdentityConfig
from broker.emulator import Emulator
from broker.errors import ConfigError
from broker.metrics import Metrics
from broker.policy import Client, Policy
from broker.ratelimit import RateLimiter
from broker.secrets import SecretCache, SecretKey, VaultRules
from broker.tokens import TokenCache, TokenKey
from connectors.identity import DEFAULT_IDENTITY, IMDS_DEFAULT, IdentityClient, Source, Token
from connectors.keyvault import Secret, VaultClient
from connectors.retry import RetryPolicy

log = logging.getLogger(__name__)


# How long a caller's request may wait on upstream retries before it is answered: callers
# (runbook samples, SDKs) commonly give up after 30 s, and one attempt may still take a timeout.
DEADLINE = 20.0


class StartupError(Exception):
    """The broker cannot start for a reason outside its configuration (port taken, ...)."""


def identity_source(cfg: IdentityConfig, environ: Mapping[str, str], emulator: Emulator | None = None) -> Source:
    """Where tokens come from, from ``[identity]`` and the broker's environment."""
    kind = cfg.source
    endpoint = environ.get("IDENTITY_ENDPOINT", "")
    if kind == "dev":
        if emulator is None:
            raise ConfigError(["identity.source: 'dev' needs the embedded emulator (tokenbroker serve --dev)"])
        return Source("app_service", endpoint=emulator.identity_url, header=emulator.identity_header,
                      client_id=cfg.client_id)
    if kind == "auto":
        if endpoint and environ.get("IDENTITY_HEADER"):
            kind = "app_service"
        elif endpoint and environ.get("IMDS_ENDPOINT"):
            kind = "arc"
        elif environ.get("AZURE_FEDERATED_TOKEN_FILE"):
            kind = "workload"
        else:
            kind = "imds"
    if kind == "app_service":
        url, header = cfg.endpoint or endpoint, environ.get("IDENTITY_HEADER", "")
        if not (url and header):
            raise ConfigError(["identity.source: app_service needs IDENTITY_ENDPOINT and IDENTITY_HEADER "
                               "in the broker's environment"])
        return Source("app_service", endpoint=url, header=header, client_id=cfg.client_id, ca_file=cfg.ca_file)
    if kind == "arc":
        if not (cfg.endpoint or endpoint):
            raise ConfigError(["identity.source: arc needs IDENTITY_ENDPOINT in the broker's environment"])
        if cfg.client_id:
            raise ConfigError(["identity.client_id: Azure Arc has only the machine's system-assigned identity"])
        return Source("arc", endpoint=cfg.endpoint or endpoint, ca_file=cfg.ca_file)
    if kind == "imds":
        url = cfg.endpoint or environ.get("AZURE_POD_IDENTITY_AUTHORITY_HOST", "") or IMDS_DEFAULT
        return Source("imds", endpoint=url, client_id=cfg.client_id, ca_file=cfg.ca_file)
    tenant = cfg.tenant_id or environ.get("AZURE_TENANT_ID", "")
    client_id = cfg.client_id or environ.get("AZURE_CLIENT_ID", "")
    authority = cfg.endpoint or environ.get("AZURE_AUTHORITY_HOST", "")
    if authority and not authority.startswith("https://"):
        where = "identity.endpoint" if cfg.endpoint else "AZURE_AUTHORITY_HOST"
        raise ConfigError([f"{where}: the login endpoint for {kind} must be an https:// URL"])
    if kind == "workload":
        token_file = environ.get("AZURE_FEDERATED_TOKEN_FILE", "")
        if not (tenant and client_id and token_file):
            raise ConfigError(["identity.source: workload needs AZURE_FEDERATED_TOKEN_FILE, a client_id "
                               "(or AZURE_CLIENT_ID) and a tenant_id (or AZURE_TENANT_ID)"])
        return Source("workload", client_id=client_id, tenant_id=tenant, token_file=token_file, authority=authority,
                      ca_file=cfg.ca_file)
    secret = environ.get(cfg.client_secret_env, "")
    if not secret:
        raise ConfigError([f"identity.client_secret_env: environment variable {cfg.client_secret_env} is not set"])
    return Source("client_secret", client_id=client_id, tenant_id=tenant, client_secret=secret, authority=authority,
                  ca_file=cfg.ca_file)


def policy_client(c: ClientConfig) -> Client:
    return Client(
        name=c.name,
        uids=frozenset(c.uids),
        gids=frozenset(c.gids),
        key=c.resolved_key.get_secret_value() if c.resolved_key else "",
        resources=tuple(c.resources),
        secrets=tuple(c.secrets),
        databases=tuple(c.databases),
        identities=tuple(c.identities),
        admin=c.admin,
        rate_limit=c.rate_limit,
    )


@dataclass(frozen=True)
class Listener:
    role: str  # "socket", "http" or "health"
    sock: socket.socket
    address: str  # as people write it: a path, or host:port
    inode: int = 0  # of the socket file we bound, so we never remove a successor's

    @property
    def url(self) -> str:
        return f"unix://{self.address}" if self.role == "socket" else f"http://{self.address}"


def bind_tcp(role: str, value: str, address: tuple[str, int]) -> Listener:
    host, port = address
    if host == "localhost":
        host = "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=512)
    except OSError as exc:
        raise StartupError(f"server.{role}: cannot listen on {value}: {exc.strerror}") from None
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    return Listener(role, sock, f"{shown}:{bound_port}")


def bind_unix(path: str, mode: int) -> Listener:
    """Bind the socket file ourselves: aiohttp's UnixSite never sets its mode."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if target.exists() or target.is_symlink():
        if not stat.S_ISSOCK(target.lstat().st_mode):
            raise StartupError(f"server.socket: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            target.unlink()  # left behind by a broker that crashed
        else:
            raise StartupError(f"server.socket: another broker is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which the file is more open than configured
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"server.socket: cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(512)
    return Listener("socket", sock, path, inode=os.stat(path).st_ino)


def remove_socket_file(listener: Listener) -> None:
    """Unlink our socket file, unless another broker has bound a new one at the path since."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(listener.address).st_ino == listener.inode:
            os.unlink(listener.address)


class Broker:
    """A running broker. ``start`` binds every listener; ``stop`` drains and releases them."""

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        emulator: Emulator | None = None,
    ) -> None:
        self.config = config
        self.environ = os.environ if environ is None else environ
        self.emulator = emulator  # the caller's, for identity.source = "dev"; not closed here
        self.lifecycle = Lifecycle()
        self.metrics = Metrics(resources=config.warm_resources(), vaults=config.vaults)
        self.listeners: list[Listener] = []
        self._runner: web.AppRunner | None = None
        self._state = "new"  # new -> started -> stopped; the one guard for start/stop

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def listener(self, role: str) -> Listener | None:
        return next((item for item in self.listeners if item.role == role), None)

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"broker already {self._state}")
        self._state = "started"
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        source = identity_source(cfg.identity, self.environ, self.emulator)
        retry = RetryPolicy(attempts=cfg.identity.attempts, timeout=cfg.identity.timeout,
                            deadline=max(DEADLINE, cfg.identity.timeout))
        identity = IdentityClient(source, retry, observe=self.metrics.upstream("identity"))

        tokens = TokenCache(fetch=lambda key: identity.fetch(key.resource, key.identity))
        self.metrics.watch_tokens(tokens.states)

        async def broker_token(resource: str) -> Token:
            token, _ = await tokens.get(TokenKey(DEFAULT_IDENTITY, resource))
            return token

        vaults = {
            alias: VaultClient(
                alias, vault.url, broker_token, ca_file=vault.ca_file,
                verify_challenge_resource=vault.verify_challenge_resource,
                retry=retry, observe=self.metrics.vault(alias), resource=vault.resource,
            )
            for alias, vault in cfg.vaults.items()
        }

        def read_secret(key: SecretKey) -> Coroutine[object, object, Secret]:
            return vaults[key.vault].get(key.name, key.version)

        secrets = SecretCache(
            {alias: VaultRules(v.cache_ttl, v.stale_if_error) for alias, v in cfg.vaults.items()}, read_secret
        )
        self.metrics.watch_secrets(lambda: len(secrets))
        policy = Policy.build([policy_client(c) for c in cfg.clients], owner_uid=os.getuid())
        imds_client = policy.by_name(cfg.server.imds_client) if cfg.server.imds_client else None

        for role, value, address in (("http", cfg.server.http, cfg.server.http_address()),
                                     ("health", cfg.server.health, cfg.server.health_address())):
            if address is not None:
                self.listeners.append(bind_tcp(role, value, address))
        if cfg.server.socket:
            self.listeners.append(bind_unix(cfg.server.socket, cfg.server.socket_mode))
        health = self.listener("health")
        services = Services(
            policy=policy,
            tokens=tokens,
            secrets=secrets,
            vaults=frozenset(vaults),
            databases=tuple(
                DatabaseInfo(name, db.kind, f"{db.host}:{db.port}/{db.database}") for name, db in cfg.databases.items()
            ),
            metrics=self.metrics,
            lifecycle=self.lifecycle,
            limiter=RateLimiter.empty(),
            health_sockets=frozenset({(health.sock.family, health.sock.getsockname()[1])} if health else set()),
            default_client_id=source.client_id,
            imds_compat=cfg.server.imds_compat,
            imds_client=imds_client,
            user_assigned=source.kind in ("app_service", "imds"),
        )
        app = make_app(services)

        async def owned(app: web.Application) -> AsyncIterator[None]:
            warm = asyncio.create_task(self._warm(tokens), name="warm-up")
            yield
            warm.cancel()
            await asyncio.shield(asyncio.wait({warm}))
            await asyncio.shield(secrets.close())
            for vault_client in vaults.values():
                await asyncio.shield(vault_client.close())
            await asyncio.shield(tokens.close())
            await asyncio.shield(identity.close())

        app.cleanup_ctx.append(owned)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=cfg.server.shutdown_grace
        )
        await self._runner.setup()
        for item in self.listeners:
            await web.SockSite(self._runner, item.sock).start()
        self.lifecycle.started = True
        log.info("listening on %s", ", ".join(f"{item.role} {item.url}" for item in self.listeners))

    async def _warm(self, tokens: TokenCache) -> None:
        resources = self.config.warm_resources()
        delay = 1.0
        while resources:
            results = await asyncio.gather(
                *(tokens.get(TokenKey(DEFAULT_IDENTITY, r)) for r in resources), return_exceptions=True
            )
            failed = [(r, e) for r, e in zip(resources, results, strict=True) if isinstance(e, BaseException)]
            if not failed:
                break
            self.lifecycle.warm_error = f"{failed[0][0]}: {failed[0][1]}"
            self.lifecycle.warm_failed_at = tokens.obtained
            log.warning("warm-up: %d of %d tokens failed (%s); again in %.0fs",
                        len(failed), len(resources), self.lifecycle.warm_error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        self.lifecycle.warmed = True
        self.lifecycle.warm_error = ""
        if resources:
            log.info("warm-up done: %d tokens cached", len(resources))

    async def stop(self) -> None:
        if self._state == "stopped":
            return
        self._state = "stopped"
        self.lifecycle.draining = True
        # Gone before the drain, not after: new callers fail at once instead of queueing on a
        # listener about to close, and a broker started meanwhile binds a fresh file we leave be.
        for item in self.listeners:
            if item.role == "socket":
                remove_socket_file(item)
        try:
            if self._runner is not None:
                await asyncio.shield(self._runner.cleanup())
        finally:
            for item in self.listeners:
                item.sock.close()


async def serve(broker: Broker, announce: Callable[[Broker], None] | None = None) -> int:
    """Run until SIGTERM, SIGINT or /quitquitquit, then drain; the exit code of ``serve``."""
    loop = asyncio.get_running_loop()
    stop = broker.lifecycle.stop

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            return
        # A second signal means "now": the operator will not wait out shutdown_grace.
        log.warning("second signal: exiting without waiting for in-flight requests")
        for item in broker.listeners:
            if item.role == "socket":
                remove_socket_file(item)
        logging.shutdown()
        os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        await broker.start()
        if announce is not None:
            announce(broker)
        await stop.wait()
        log.info("stopping: draining in-flight requests (up to %gs)", broker.config.server.shutdown_grace)
    finally:
        await broker.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("stopped")
    return 0

