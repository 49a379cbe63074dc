"""Entra-shaped access tokens: issued by the managed-identity routes, checked by the Key Vault routes.

Tokens are HS256 JWTs under a random key that lives only as long as the emulator instance, so a token
from one instance (or from real Entra) never verifies against another. Their claims follow the v1
tokens Entra issues to managed identities, because code under test may decode them (without
verifying) to read ``exp``, ``oid`` or ``xms_mirid``.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt

_ALGORITHM = "HS256"

TokenProblem = Literal["malformed", "signature", "audience", "issuer", "expired", "not_yet_valid"]


class InvalidToken(Exception):
    """A token failed verification; ``problem`` says which check, and the message never quotes the token."""

    def __init__(self, problem: TokenProblem, message: str) -> None:
        super().__init__(message)
        self.problem: TokenProblem = problem


@dataclass(frozen=True)
class Identity:
    """The identity a token is issued to: a managed identity, or an app registration (no resource id)."""

    client_id: str
    object_id: str
    resource_id: str  # "" for app registrations, whose tokens carry no xms_mirid


@dataclass(frozen=True)
class IssuedToken:
    access_token: str = field(repr=False)
    resource: str
    identity: Identity
    not_before: int
    expires_on: int

    @property
    def expires_in(self) -> int:
        return self.expires_on - self.not_before


def _stable_guid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "tokenbroker-emulator:" + ":".join(parts)))


def system_identity(tenant_id: str) -> Identity:
    """The system-assigned identity: stable per tenant, so demo output and logs are reproducible."""
    client_id = _stable_guid(tenant_id, "system", "client")
    return Identity(
        client_id=client_id,
        object_id=_stable_guid(tenant_id, "system", "object"),
        resource_id=(
            f"/subscriptions/{_stable_guid(tenant_id, 'subscription')}/resourcegroups/tokenbroker-emulator"
            "/providers/Microsoft.Web/sites/tokenbroker-emulator"
        ),
    )


def user_identity(
    tenant_id: str, *, client_id: str | None, object_id: str | None, resource_id: str | None
) -> Identity:
    """A user-assigned identity named by any one of its ids; the others are derived so they stay stable."""
    seed = client_id or object_id or resource_id or ""
    return Identity(
        client_id=client_id or _stable_guid(tenant_id, "user", seed, "client"),
        object_id=object_id or _stable_guid(tenant_id, "user", seed, "object"),
        resource_id=resource_id
        or (
            f"/subscriptions/{_stable_guid(tenant_id, 'subscription')}/resourcegroups/tokenbroker-emulator"
            f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{seed}"
        ),
    )


def app_identity(tenant_id: str, client_id: str) -> Identity:
    """An app registration's service principal, as Entra ID's client-credentials tokens name it."""
    return Identity(client_id=client_id, object_id=_stable_guid(tenant_id, "app", client_id, "object"), resource_id="")


def _audiences(audience: str) -> list[str]:
    # Entra v1 resources are matched with or without the trailing slash (https://vault.azure.net[/]).
    bare = audience.rstrip("/")
    return [bare, bare + "/"]


class TokenIssuer:
    def __init__(self, tenant_id: str, *, clock: Callable[[], float] = time.time) -> None:
        self.tenant_id = tenant_id
        self.issuer = f"https://sts.windows.net/{tenant_id}/"
        self._key = secrets.token_bytes(32)
        self._key_id = secrets.token_hex(8)
        self._clock = clock

    def issue(self, resource: str, identity: Identity, lifetime: float) -> IssuedToken:
        now = self._clock()
        issued_at = math.floor(now)
        # Rounded up so a token never expires before `lifetime` has passed, even for sub-second lifetimes.
        expires_on = math.ceil(now + lifetime)
        claims: dict[str, Any] = {
            "aud": resource,
            "iss": self.issuer,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": expires_on,
            "aio": secrets.token_urlsafe(24),
            "appid": identity.client_id,
            "appidacr": "2",
            "idp": self.issuer,
            "idtyp": "app",
            "oid": identity.object_id,
            "rh": secrets.token_urlsafe(12),
            "sub": identity.object_id,
            "tid": self.tenant_id,
            "uti": secrets.token_urlsafe(16),
            "ver": "1.0",
        }
        if identity.resource_id:
            claims["xms_mirid"] = identity.resource_id
        token = jwt.encode(
            claims, self._key, algorithm=_ALGORITHM, headers={"typ": "JWT", "kid": self._key_id}
        )
        return IssuedToken(
            access_token=token,
            resource=resource,
            identity=identity,
            not_before=issued_at,
            expires_on=expires_on,
        )

    def verify(self, token: str, audience: str) -> dict[str, Any]:
        """Decode and check signature, audience (trailing slash optional), issuer and lifetime."""
        try:
            return jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                audience=_audiences(audience),
                issuer=self.issuer,
                options={"require": ["aud", "iss", "exp", "nbf", "iat"]},
            )
        except jwt.InvalidAudienceError as exc:
            found = _unverified_claim(token, "aud")
            raise InvalidToken(
                "audience", f"AKV10022: Invalid audience. Expected {audience.rstrip('/')}, found: {found}."
            ) from exc
        except jwt.InvalidIssuerError as exc:
            found = _unverified_claim(token, "iss")
            raise InvalidToken(
                "issuer", f"AKV10032: Invalid issuer. Expected one of {self.issuer}, found: {found}."
            ) from exc
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("expired", "Token is expired.") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken("not_yet_valid", "Token not yet valid.") from exc
        except jwt.InvalidSignatureError as exc:
            raise InvalidToken(
                "signature", "AKV10046: Unable to resolve the key used for signature validation."
            ) from exc
        except jwt.InvalidTokenError as exc:
            raise InvalidToken("malformed", "Token is malformed.") from exc


def _unverified_claim(token: str, claim: str) -> str:
    try:
        value = jwt.decode(token, options={"verify_signature": False}).get(claim)
    except jwt.InvalidTokenError:
        return "(unreadable)"
    return str(value)
