"""What the HTTP handlers share: the broker's services, lifecycle flags, and the caller."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from broker.errors import Forbidden
from broker.metrics import Metrics
from broker.peercred import PeerCache
from broker.policy import Client, Policy
from broker.ratelimit import RateLimiter
from broker.secrets import SecretCache
from broker.tokens import TokenCache

Role = Literal["unix", "tcp", "health"]


@dataclass
class Lifecycle:
    """Flags read by the probes; only the service module sets them."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False  # every listener is up
    warmed: bool = False  # the start-up warm-up succeeded (or had nothing to do)
    draining: bool = False
    warm_error: str = ""
    # Tokens obtained when a warm-up round last failed: any token obtained after that counts.
    warm_failed_at: int | None = None


@dataclass(frozen=True)
class DatabaseInfo:
    name: str
    kind: str
    target: str  # host:port/database, for status


@dataclass(frozen=True)
class Services:
    policy: Policy
    tokens: TokenCache
    secrets: SecretCache
    vaults: frozenset[str]
    databases: tuple[DatabaseInfo, ...]
    metrics: Metrics
    lifecycle: Lifecycle
    limiter: RateLimiter
    health_sockets: frozenset[tuple[int, int]]  # (family, port) of the probe-only listener
    default_client_id: str = ""
    imds_compat: bool = False
    imds_client: Client | None = None
    user_assigned: bool = True  # whether the identity source can act as user-assigned identities
    peers: PeerCache = field(default_factory=PeerCache)


@dataclass(frozen=True)
class Caller:
    client: Client | None  # None: a socket peer that no client entry admits
    uid: int | None = None


def client_of(request: web.Request) -> Client:
    """The caller's client entry, or 403. Handlers call it at their policy check, after their own
    400 checks, as CONTRACT section 3 orders them."""
    caller = request[CALLER]
    if caller.client is None:
        raise Forbidden(f"no client entry admits uid {caller.uid}")
    return caller.client


def admin_of(request: web.Request) -> Client:
    client = client_of(request)
    if not client.admin:
        raise Forbidden(f"client {client.name} is not an admin client")
    return client


SERVICES = web.AppKey("services", Services)
CALLER = web.RequestKey("caller", Caller)
