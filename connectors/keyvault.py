"""Key Vault secrets through azure-keyvault-secrets, one exchange per attempt, retries ours.

Each ``VaultClient`` owns one real ``SecretClient`` (so the SDK's challenge authentication,
request shapes and response parsing are the ones production Azure code runs) with the SDK's
own retries switched off: timeout and retry come from ``connectors.retry`` like every other
upstream, and every failure leaves here as one of the ``connectors.errors`` families. The SDK's
credential is an adapter over a ``TokenSource`` (in the broker: the token cache), so the vault
is called with the very token the cache holds instead of a second, privately cached one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType, TracebackType
from typing import Any

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.keyvault.secrets.aio import SecretClient

from connectors import errors, sdk
from connectors.identity import Token, resource_of
from connectors.retry import RetryPolicy

TokenSource = Callable[[str], Awaitable[Token]]

# A vault's 404 and 403 are answers about the secret, passed on to callers as such.
_VAULT_STATUSES: sdk.StatusFamilies = {404: errors.NotFound, 403: errors.Forbidden}

_NAME = re.compile(r"[0-9a-zA-Z-]{1,127}")
_VERSION = re.compile(r"[0-9a-zA-Z]{1,64}")


def valid_name(name: str) -> bool:
    """Key Vault's rule for secret names: 1-127 letters, digits and hyphens."""
    return _NAME.fullmatch(name) is not None


def valid_version(version: str) -> bool:
    return _VERSION.fullmatch(version) is not None


@dataclass(frozen=True)
class Secret:
    vault: str  # the broker's alias for the vault, not its URL
    name: str
    version: str
    value: str = field(repr=False)
    content_type: str | None
    enabled: bool
    not_before: datetime | None
    expires_on: datetime | None
    updated_on: datetime | None
    # A read-only view: a Secret is shared by every caller the cache serves it to.
    tags: Mapping[str, str] = field(hash=False)


class TokenSourceCredential:
    """An azure-core async credential that asks a ``TokenSource`` for the vault's token.

    The challenge policy of azure-keyvault-secrets 4.12 calls ``get_token_info`` when a
    credential has it (``get_token`` otherwise), passing the scope from the vault's challenge
    (``https://vault.azure.net/.default``); tenant, claims and CAE options are the identity's
    business, not ours, and are ignored.
    """

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        token = await self._fetch(scopes)
        # Left to itself the SDK keeps a token until 5 minutes before expiry; asking again at the
        # source's own refresh point keeps the vault on the token the broker's cache now holds.
        refresh_on = token.refresh_on or token.obtained_at + token.lifetime / 2
        return AccessTokenInfo(token.value, int(token.expires_on), refresh_on=int(refresh_on))

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        token = await self._fetch(scopes)
        return AccessToken(token.value, int(token.expires_on))

    async def _fetch(self, scopes: tuple[str, ...]) -> Token:
        if len(scopes) != 1:
            raise ValueError(f"expected one scope, got {len(scopes)}")
        scope = scopes[0]
        resource = resource_of(scope)
        return await self._tokens(resource)

    async def close(self) -> None:
        """The token source belongs to the caller; nothing of ours to release."""

    async def __aenter__(self) -> TokenSourceCredential:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.close()


class VaultClient:
    """Reads secrets from one vault, one upstream exchange per attempt, with retries."""

    def __init__(
        self,
        alias: str,
        url: str,
        tokens: TokenSource,
        *,
        ca_file: str = "",
        verify_challenge_resource: bool = True,
        retry: RetryPolicy | None = None,
        observe: Callable[[str, float], None] | None = None,
        resource: str = "https://vault.azure.net",
    ) -> None:
        self.alias = alias
        self.upstream = f"vault {alias}"
        self._tokens = tokens
        self._resource = resource
        self._retry = retry or RetryPolicy()
        self._observe = observe
        self._closed = False
        sdk_options: dict[str, Any] = {
            "retry_total": 0,  # retries are ours
            "connection_timeout": self._retry.timeout,
            "read_timeout": self._retry.timeout,
            "verify_challenge_resource": verify_challenge_resource,
        }
        if ca_file:
            sdk_options["transport"] = sdk.tls_transport(ca_file, self._retry.timeout)
        self._client = SecretClient(url, TokenSourceCredential(tokens), **sdk_options)

    async def get(self, name: str, version: str = "") -> Secret:
        """The secret ``name`` at ``version`` ("" = the latest)."""
        if not valid_name(name):
            raise errors.Rejected(
                self.upstream,
                f"invalid secret name {errors.safe_text(name, 140)!r}: use 1-127 letters, digits and hyphens",
                400,
                "BadParameter",
            )
        if version and not valid_version(version):
            raise errors.Rejected(
                self.upstream,
                f"invalid secret version {errors.safe_text(version, 80)!r}: use 1-64 letters and digits",
                400,
                "BadParameter",
            )
        if self._closed:
            raise errors.Unreachable(self.upstream, "the broker is shutting down")
        # The token first, outside the vault's per-attempt timeout: a slow identity endpoint is
        # not a slow vault, and has already been retried by the token source. The SDK's own
        # request for it (after the challenge) is then a cache hit.
        await self._tokens(self._resource)
        found = await sdk.with_retries(
            lambda: self._client.get_secret(name, version or None),
            upstream=self.upstream,
            what=name,
            policy=self._retry,
            classify_failure=lambda exc: sdk.classify(exc, self.upstream, self._retry.timeout, _VAULT_STATUSES),
            observe=self._observe,
        )
        props = found.properties
        return Secret(
            vault=self.alias,
            name=props.name or name,
            version=props.version or version,
            value=found.value or "",
            content_type=props.content_type,
            enabled=bool(props.enabled),
            not_before=props.not_before,
            expires_on=props.expires_on,
            updated_on=props.updated_on,
            tags=MappingProxyType(dict(props.tags or {})),
        )

    async def close(self) -> None:
        self._closed = True
        await asyncio.shield(self._client.close())


