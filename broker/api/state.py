"""What the HTTP handlers share: the broker's services, lifecycle flags, and the caller."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

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
    peers: PeerCache = field(default_factory=PeerCache)


@dataclass(frozen=True)
class Caller:
    client: Client
    role: Role
    uid: int | None = None


SERVICES = web.AppKey("services", Services)
CALLER = web.RequestKey("caller", Caller)
