"""Key Vault secrets data plane: challenge authentication, SecretBundle JSON and the service's error shapes.

Vault URL scheme. Many vaults share one HTTPS port and are told apart by the first path segment:
``https://127.0.0.1:PORT/<vault>`` is vault ``<vault>``, and the bare origin ``https://127.0.0.1:PORT`` is
the vault named ``default``. The SDK keeps a path prefix on ``vault_url`` (it appends
``/secrets/<name>/<version>`` to it), so requests reach the right vault.

The ``id`` in responses is always ``<origin>/secrets/<name>/<version>``, without the vault prefix. That
is deliberate: ``azure-keyvault-secrets`` parses every returned id and rejects ids with more than three
path segments (``ValueError: ... is not a valid ID``), and it takes an id's vault to be its origin. So
for a named vault, ``KeyVaultSecret.id`` and ``properties.vault_url`` point at the default vault; name and
version in them are right.

Vault names follow Azure's rules (3-24 characters, letters, digits and single hyphens, starting with a
letter) and are case-insensitive, as are secret names. ``secrets`` is reserved: ``/secrets/...`` always
means the default vault.

Like the real service (for secrets), ``nbf`` and ``exp`` are informational and not enforced.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .faults import status_phrase
from .tokens import InvalidToken, TokenIssuer

DEFAULT_VAULT = "default"
KEYVAULT_RESOURCE = "https://vault.azure.net"

_VAULT_NAME = re.compile(r"^[a-z](?!.*--)[a-z0-9-]{1,22}[a-z0-9]$")
_SECRET_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_RESERVED_VAULTS = frozenset({"secrets"})
_MAX_VALUE_BYTES = 25 * 1024
_SERVICE_VERSION = "1.9.1.0"

_NOT_FOUND_HELP = (
    "If you recently deleted this secret you may be able to recover it using the correct recovery command. "
    "For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
)

_FAULT_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadParameter", "The request is invalid."),
    401: ("Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."),
    403: ("Forbidden", "The operation is not allowed."),
    404: ("NotFound", "The requested resource was not found."),
    408: ("RequestTimeout", "The request timed out."),
    409: ("Conflict", "The request conflicts with the current state of the vault."),
    429: (
        "Throttled",
        "Request was not processed because too many requests were received. Reason: A single client IP can "
        "send 2000 requests per 10 seconds to a vault. For help resolving this issue, please see "
        "https://go.microsoft.com/fwlink/?linkid=2125180",
    ),
    500: ("InternalServerError", "An unexpected error occurred while processing the request."),
    502: ("BadGateway", "The service received an invalid response from an upstream server."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable. Please try again later."),
    504: ("GatewayTimeout", "The service did not respond in time."),
}


def normalize_vault(vault: str) -> str:
    """Lower-case and validate a vault name; raises ValueError with Azure's naming rule."""
    name = vault.lower()
    if name in _RESERVED_VAULTS or not _VAULT_NAME.match(name):
        raise ValueError(
            f"invalid vault name {vault!r}: use 3-24 letters, digits and single hyphens, starting with a "
            "letter and not ending with a hyphen ('secrets' is reserved)"
        )
    return name


def check_secret_name(name: str) -> str:
    if not _SECRET_NAME.match(name):
        raise ValueError(f"invalid secret name {name!r}: use 1-127 letters, digits and hyphens")
    return name


def epoch(moment: datetime) -> int:
    # A naive datetime is taken as UTC, the way Key Vault reports every timestamp.
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return int(aware.timestamp())


@dataclass(frozen=True)
class SecretVersion:
    name: str
    version: str
    value: str = field(repr=False)
    enabled: bool
    created: int
    updated: int
    content_type: str | None = None
    tags: Mapping[str, str] | None = field(default=None, hash=False)
    not_before: int | None = None
    expires_on: int | None = None

    def attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "enabled": self.enabled,
            "created": self.created,
            "updated": self.updated,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
        }
        if self.not_before is not None:
            attributes["nbf"] = self.not_before
        if self.expires_on is not None:
            attributes["exp"] = self.expires_on
        return attributes

    def item(self, origin: str, *, versioned: bool = True) -> dict[str, Any]:
        """The SecretItem shape used by list operations: everything but the value.

        Listing a vault's secrets names them without a version, as Key Vault does; listing one
        secret's versions, or fetching one, names the version.
        """
        secret_id = f"{origin}/secrets/{self.name}"
        body: dict[str, Any] = {"id": f"{secret_id}/{self.version}" if versioned else secret_id}
        body["attributes"] = self.attributes()
        if self.content_type is not None:
            body["contentType"] = self.content_type
        if self.tags is not None:
            body["tags"] = dict(self.tags)
        return body

    def bundle(self, origin: str) -> dict[str, Any]:
        return {"value": self.value, **self.item(origin)}


class SecretStore:
    """Every vault's secrets, newest version last; names are case-insensitive like Key Vault's."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._vaults: dict[str, dict[str, list[SecretVersion]]] = {}
        self._denied: set[tuple[str, str]] = set()

    def set(
        self,
        vault: str,
        name: str,
        value: str,
        *,
        enabled: bool = True,
        content_type: str | None = None,
        tags: Mapping[str, str] | None = None,
        not_before: int | None = None,
        expires_on: int | None = None,
    ) -> SecretVersion:
        check_secret_name(name)
        now = int(self._clock())
        secret = SecretVersion(
            name=name,
            version=uuid.uuid4().hex,
            value=value,
            enabled=enabled,
            created=now,
            updated=now,
            content_type=content_type,
            tags=dict(tags) if tags is not None else None,
            not_before=not_before,
            expires_on=expires_on,
        )
        self._vaults.setdefault(normalize_vault(vault), {}).setdefault(name.lower(), []).append(secret)
        return secret

    def delete(self, vault: str, name: str) -> None:
        """Delete and purge every version; later GETs answer SecretNotFound."""
        secrets = self._vaults.get(normalize_vault(vault), {})
        if secrets.pop(name.lower(), None) is None:
            raise KeyError(f"no secret {name!r} in vault {vault!r}")

    def set_enabled(self, vault: str, name: str, enabled: bool, version: str | None = None) -> None:
        versions = self._versions(normalize_vault(vault), name)
        if not versions:
            raise KeyError(f"no secret {name!r} in vault {vault!r}")
        index = len(versions) - 1
        if version is not None:
            matches = [i for i, v in enumerate(versions) if v.version == version]
            if not matches:
                raise KeyError(f"no version {version!r} of secret {name!r} in vault {vault!r}")
            index = matches[0]
        versions[index] = replace(versions[index], enabled=enabled, updated=int(self._clock()))

    def deny(self, vault: str, name: str) -> None:
        self._denied.add((normalize_vault(vault), name.lower()))

    def is_denied(self, vault: str, name: str) -> bool:
        return (vault, name.lower()) in self._denied

    def lookup(self, vault: str, name: str, version: str | None = None) -> SecretVersion | None:
        versions = self._versions(vault, name)
        if not versions:
            return None
        if not version:
            return versions[-1]
        return next((v for v in versions if v.version == version), None)

    def latest_versions(self, vault: str) -> list[SecretVersion]:
        return [versions[-1] for versions in self._vaults.get(vault, {}).values() if versions]

    def versions(self, vault: str, name: str) -> list[SecretVersion]:
        return list(self._versions(vault, name))

    def _versions(self, vault: str, name: str) -> list[SecretVersion]:
        return self._vaults.get(vault, {}).get(name.lower(), [])


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    inner_code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner_code is not None:
        error["innererror"] = {"code": inner_code}
    response = _json_response({"error": error}, status=status)
    if headers:
        response.headers.update(headers)
    return response


def fault_response(status: int, tenant_id: str) -> web.Response:
    """The body Key Vault sends for ``status``, for injected faults."""
    code, message = _FAULT_ERRORS.get(status, (status_phrase(status).replace(" ", ""), "Injected fault."))
    headers = {"WWW-Authenticate": _challenge(tenant_id)} if status == 401 else None
    return error_response(status, code, message, headers=headers)


def _challenge(tenant_id: str) -> str:
    authority = f"https://login.microsoftonline.com/{tenant_id}"
    return f'Bearer authorization="{authority}", resource="{KEYVAULT_RESOURCE}"'


def _json_response(body: object, *, status: int = 200) -> web.Response:
    response = web.Response(
        text=json.dumps(body, separators=(",", ":")),
        status=status,
        content_type="application/json",
        charset="utf-8",
    )
    response.headers["Cache-Control"] = "no-cache"
    response.headers["x-ms-keyvault-service-version"] = _SERVICE_VERSION
    response.headers["x-ms-keyvault-region"] = "emulator"
    response.headers["x-ms-request-id"] = str(uuid.uuid4())
    return response


@dataclass(frozen=True)
class _Route:
    vault: str
    rest: tuple[str, ...]  # what follows "/secrets": () lists, (name,), (name, version) or (name, "versions")


def _route(path: str) -> _Route | None:
    segments = path.split("/")[1:]
    if segments and segments[0] == "secrets":
        vault, rest = DEFAULT_VAULT, segments[1:]
    elif len(segments) >= 2 and segments[1] == "secrets":
        try:
            vault = normalize_vault(segments[0])
        except ValueError:
            return None
        rest = segments[2:]
    else:
        return None
    if rest in ([], [""]):
        return _Route(vault, ())
    if len(rest) > 2 or not _SECRET_NAME.match(rest[0]):
        return None
    return _Route(vault, tuple(rest))


class KeyVaultService:
    """aiohttp handlers for one HTTPS port that serves every vault."""

    def __init__(self, store: SecretStore, issuer: TokenIssuer) -> None:
        self._store = store
        self._issuer = issuer

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", "/{path:.*}", self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        claims = self._authenticate(request)
        if isinstance(claims, web.Response):
            return claims
        if not request.query.get("api-version"):
            return error_response(400, "BadParameter", "The api-version query parameter is required.")
        route = _route(request.path)
        if route is None:
            return error_response(404, "NotFound", f"The requested path {request.path} was not found.")
        origin = str(request.url.origin())
        if request.method == "GET":
            if not route.rest:
                items = [s.item(origin, versioned=False) for s in self._store.latest_versions(route.vault)]
                return _json_response({"value": items, "nextLink": None})
            if route.rest[1:] == ("versions",):
                return self._list_versions(route, origin, claims)
            return self._get(route, origin, claims)
        if request.method == "PUT" and len(route.rest) == 1:
            return await self._put(request, route, origin)
        return error_response(
            405, "MethodNotAllowed", f"The method {request.method} is not allowed on {request.path}."
        )

    def _authenticate(self, request: web.Request) -> dict[str, Any] | web.Response:
        challenge = {"WWW-Authenticate": _challenge(self._issuer.tenant_id)}
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return error_response(
                401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.", headers=challenge
            )
        try:
            return self._issuer.verify(token.strip(), KEYVAULT_RESOURCE)
        except InvalidToken as exc:
            return error_response(401, "Unauthorized", str(exc), headers=challenge)

    def _denied(
        self, vault: str, name: str, claims: Mapping[str, Any], permission: str
    ) -> web.Response | None:
        if not self._store.is_denied(vault, name):
            return None
        caller = f"appid={claims.get('appid')};oid={claims.get('oid')};iss={claims.get('iss')}"
        return error_response(
            403,
            "Forbidden",
            f"The user, group or application '{caller}' does not have secrets {permission} permission on "
            f"key vault '{vault};location=emulator'. For help resolving this issue, please see "
            "https://go.microsoft.com/fwlink/?linkid=2125287",
            inner_code="AccessDenied",
        )

    def _get(self, route: _Route, origin: str, claims: Mapping[str, Any]) -> web.Response:
        name = route.rest[0]
        version = route.rest[1] if len(route.rest) > 1 else ""
        denied = self._denied(route.vault, name, claims, "get")
        if denied is not None:
            return denied
        secret = self._store.lookup(route.vault, name, version)
        if secret is None:
            shown = f"{name}/{version}" if version else name
            return error_response(
                404,
                "SecretNotFound",
                f"A secret with (name/id) {shown} was not found in this key vault. {_NOT_FOUND_HELP}",
            )
        if not secret.enabled:
            return error_response(
                403,
                "Forbidden",
                "Operation get is not allowed on a disabled secret.",
                inner_code="SecretDisabled",
            )
        return _json_response(secret.bundle(origin))

    def _list_versions(self, route: _Route, origin: str, claims: Mapping[str, Any]) -> web.Response:
        denied = self._denied(route.vault, route.rest[0], claims, "list")
        if denied is not None:
            return denied
        items = [s.item(origin) for s in self._store.versions(route.vault, route.rest[0])]
        return _json_response({"value": items, "nextLink": None})

    async def _put(self, request: web.Request, route: _Route, origin: str) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "BadParameter", "The request body is not valid JSON.")
        try:
            fields = _parse_set_body(body)
        except ValueError as exc:
            return error_response(400, "BadParameter", str(exc))
        secret = self._store.set(route.vault, route.rest[0], **fields)
        return _json_response(secret.bundle(origin))


def _parse_set_body(body: object) -> dict[str, Any]:
    """The SecretSetParameters body as keyword arguments for SecretStore.set; ValueError if malformed."""
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    value = body.get("value")
    if not isinstance(value, str):
        raise ValueError("The parameter 'value' is required and must be a string.")
    if len(value.encode()) > _MAX_VALUE_BYTES:
        raise ValueError("The secret value exceeds the maximum size of 25 KB.")
    content_type = body.get("contentType")
    if content_type is not None and not isinstance(content_type, str):
        raise ValueError("The parameter 'contentType' must be a string.")
    tags = body.get("tags")
    if tags is not None and not (
        isinstance(tags, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
    ):
        raise ValueError("The parameter 'tags' must map strings to strings.")
    attributes = body.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise ValueError("The parameter 'attributes' must be an object.")
    enabled = attributes.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError("The attribute 'enabled' must be a boolean.")
    moments: dict[str, int | None] = {}
    for key in ("nbf", "exp"):
        moment = attributes.get(key)
        if moment is not None and (isinstance(moment, bool) or not isinstance(moment, int)):
            raise ValueError(f"The attribute '{key}' must be an integer (seconds since the epoch).")
        moments[key] = moment
    return {
        "value": value,
        "enabled": enabled,
        "content_type": content_type,
        "tags": tags,
        "not_before": moments["nbf"],
        "expires_on": moments["exp"],
    }
