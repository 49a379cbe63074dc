"""Tokens from the platform's identity endpoint, through azure-identity's protocol code.

azure-identity's credentials keep a token cache of their own and, when asked again, hand back
the cached token for 30 s after any attempt and swallow refresh errors. The broker's cache must
see every upstream answer and every failure, so this module drives the SDK one layer down:
``AsyncManagedIdentityClient`` (request shapes per platform, response parsing, Arc's challenge)
with the SDK's own retries switched off; timeout and retry are ours (``connectors.retry``).
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from azure.core.rest import HttpRequest

from connectors import errors, sdk
from connectors.retry import RetryPolicy

SourceKind = Literal["app_service", "imds", "arc", "workload", "client_secret"]
IdentityKind = Literal["default", "client_id", "object_id", "mi_res_id"]

UPSTREAM = "identity endpoint"
MAX_IDENTITIES = 32
IMDS_DEFAULT = "http://169.254.169.254"


DEFAULT_SCOPE = "/.default"


def resource_of(scope: str) -> str:
    """The resource an OAuth scope or a resource string names: ``R/.default`` means ``R``."""
    return scope.removesuffix(DEFAULT_SCOPE)


@dataclass(frozen=True)
class Identity:
    """Which identity a token is for: the broker's default, or a user-assigned one by one id."""

    kind: IdentityKind = "default"
    value: str = ""

    def __str__(self) -> str:
        return "default" if self.kind == "default" else f"{self.kind}={self.value}"


DEFAULT_IDENTITY = Identity()


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_on: float  # epoch seconds, as the upstream said
    obtained_at: float  # epoch seconds when the request was sent
    refresh_on: float | None = None  # the upstream's refresh_in, made absolute

    @property
    def lifetime(self) -> float:
        return self.expires_on - self.obtained_at


@dataclass(frozen=True)
class Source:
    """Where tokens come from; built by the broker from its configuration and environment."""

    kind: SourceKind
    endpoint: str = ""  # app_service / arc: IDENTITY_ENDPOINT; imds: base URL
    header: str = field(default="", repr=False)  # app_service: IDENTITY_HEADER
    client_id: str = ""  # default user-assigned identity (managed identity) or app id
    tenant_id: str = ""
    client_secret: str = field(default="", repr=False)
    token_file: str = ""  # workload identity: the federated token file
    authority: str = ""  # client_secret / workload: login endpoint override
    ca_file: str = ""  # extra CA for the endpoint (tests, private clouds)


# Each platform names a user-assigned identity's ids differently.
_ID_PARAMS: dict[SourceKind, dict[IdentityKind, str]] = {
    "app_service": {"client_id": "client_id", "object_id": "principal_id", "mi_res_id": "mi_res_id"},
    "imds": {"client_id": "client_id", "object_id": "object_id", "mi_res_id": "msi_res_id"},
    "arc": {},
}


def _app_service_request(url: str, resource: str, identity_config: dict[str, str]) -> HttpRequest:
    params = {"api-version": "2019-08-01", "resource": resource, **identity_config}
    return HttpRequest("GET", url, params=params)


def _imds_request(base: str, resource: str, identity_config: dict[str, str]) -> HttpRequest:
    params = {"api-version": "2018-02-01", "resource": resource, **identity_config}
    return HttpRequest("GET", base.rstrip("/") + "/metadata/identity/oauth2/token", params=params)


@dataclass
class _Protocol:
    """An SDK protocol client for one identity, and how many requests are using it."""

    client: Any
    users: int = 0
    evicted: bool = False

    async def request(self, resource: str, app_registration: bool) -> Any:
        if app_registration:
            # Credentials for app registrations take scopes; _request_token skips their cache.
            return await self.client._request_token(resource + DEFAULT_SCOPE)
        return await self.client.request_token(resource)


class IdentityClient:
    """Fetches tokens for (resource, identity), one upstream exchange per call, with retries."""

    def __init__(
        self,
        source: Source,
        retry: RetryPolicy | None = None,
        *,
        observe: Callable[[str, float], None] | None = None,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.source = source
        self._retry = retry or RetryPolicy()
        self._observe = observe
        self._rand = rand
        self._sleep = sleep
        # One protocol client per identity (its parameters are fixed at construction), kept in
        # an LRU: callers allowed "*" identities must not grow it without end.
        self._clients: OrderedDict[Identity, _Protocol] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def fetch(self, resource: str, identity: Identity = DEFAULT_IDENTITY) -> Token:
        if self._closed:
            raise errors.Unreachable(UPSTREAM, "the broker is shutting down")
        app_registration = self.source.kind in ("workload", "client_secret")
        obtained_at = 0.0

        async def attempt() -> Any:
            nonlocal obtained_at
            obtained_at = time.time()
            # Looked up per attempt: a retry must not run on a client evicted meanwhile.
            protocol = self._protocol(identity)
            protocol.users += 1
            try:
                return await protocol.request(resource, app_registration)
            finally:
                protocol.users -= 1
                if protocol.evicted and protocol.users == 0:
                    self._close_later(protocol)

        info = await sdk.with_retries(
            attempt,
            upstream=UPSTREAM,
            what=resource,
            policy=self._retry,
            classify_failure=lambda exc: sdk.classify(exc, UPSTREAM, self._retry.timeout),
            observe=self._observe,
            rand=self._rand,
            sleep=self._sleep,
        )
        refresh_on = getattr(info, "refresh_on", None)
        return Token(
            value=str(info.token),
            expires_on=float(info.expires_on),
            obtained_at=obtained_at,
            refresh_on=float(refresh_on) if refresh_on else None,
        )

    async def close(self) -> None:
        self._closed = True
        protocols, self._clients = list(self._clients.values()), OrderedDict()
        for protocol in protocols:
            await asyncio.shield(protocol.client.close())
        if self._closing:
            await asyncio.shield(asyncio.gather(*self._closing, return_exceptions=True))

    def _protocol(self, identity: Identity) -> _Protocol:
        protocol = self._clients.get(identity)
        if protocol is not None:
            self._clients.move_to_end(identity)
            return protocol
        protocol = self._clients[identity] = _Protocol(self._build(identity))
        if len(self._clients) > MAX_IDENTITIES:
            _, evicted = self._clients.popitem(last=False)
            evicted.evicted = True
            if evicted.users == 0:  # else the last request using it closes it
                self._close_later(evicted)
        return protocol

    def _close_later(self, protocol: _Protocol) -> None:
        task = asyncio.create_task(protocol.client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _build(self, identity: Identity) -> Any:
        src = self.source
        sdk_options: dict[str, Any] = {
            "retry_total": 0,  # retries are ours
            "connection_timeout": self._retry.timeout,
            "read_timeout": self._retry.timeout,
        }
        if src.ca_file:
            sdk_options["transport"] = sdk.tls_transport(src.ca_file, self._retry.timeout)
        if src.kind in ("workload", "client_secret"):
            if identity.kind != "default":
                raise errors.Rejected(UPSTREAM, f"source {src.kind} has one identity; cannot act as {identity}", 400)
            if src.authority:
                sdk_options["authority"] = src.authority
            if src.kind == "client_secret":
                from azure.identity.aio import ClientSecretCredential

                return ClientSecretCredential(src.tenant_id, src.client_id, src.client_secret, **sdk_options)
            from azure.identity.aio import WorkloadIdentityCredential

            return WorkloadIdentityCredential(
                tenant_id=src.tenant_id, client_id=src.client_id, token_file_path=src.token_file, **sdk_options
            )

        # Private API, pinned in pyproject: the cache-free protocol client under every MI credential.
        from azure.identity.aio._internal.managed_identity_client import AsyncManagedIdentityClient

        identity_config: dict[str, str] = {}
        if identity.kind != "default":
            name = _ID_PARAMS[src.kind].get(identity.kind)
            if name is None:
                raise errors.Rejected(UPSTREAM, f"source {src.kind} does not support user-assigned identities", 400)
            identity_config[name] = identity.value
        elif src.client_id:
            if src.kind == "arc":
                # Arc answers for the machine's identity whatever is asked: refuse, never mislabel.
                raise errors.Rejected(UPSTREAM, "source arc has only the machine's system-assigned identity", 400)
            identity_config["client_id"] = src.client_id

        if src.kind == "app_service":
            return AsyncManagedIdentityClient(
                request_factory=functools.partial(_app_service_request, src.endpoint),
                identity_config=identity_config,
                base_headers={"X-IDENTITY-HEADER": src.header},
                **sdk_options,
            )
        if src.kind == "imds":
            return AsyncManagedIdentityClient(
                request_factory=functools.partial(_imds_request, src.endpoint or IMDS_DEFAULT),
                identity_config=identity_config,
                base_headers={"Metadata": "true"},
                **sdk_options,
            )
        from azure.identity._credentials.azure_arc import _get_request as arc_request
        from azure.identity.aio._credentials.azure_arc import ArcChallengeAuthPolicy

        return AsyncManagedIdentityClient(
            _per_retry_policies=[ArcChallengeAuthPolicy()],
            request_factory=functools.partial(arc_request, src.endpoint),
            identity_config=identity_config,
            **sdk_options,
        )

