"""Key Vault secrets: ``/v1/secrets/...``, the Dapr-compatible path, and the cache flush."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from broker.api.state import SERVICES, Services, admin_of, client_of
from broker.errors import BadRequest, BrokerError, Forbidden, NotFound
from broker.secrets import SecretKey
from connectors.errors import ConnectorError
from connectors.keyvault import Secret, valid_name, valid_version

NO_STORE = {"Cache-Control": "no-store"}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


async def _lookup(request: web.Request, vault: str, name: str, version: str) -> tuple[Secret, str]:
    """Validation (400), then policy (403), then existence (404), then the cache."""
    services: Services = request.app[SERVICES]
    if not valid_name(name):
        raise BadRequest("secret names are 1-127 characters of 0-9, a-z, A-Z and '-'")
    if version and not valid_version(version):
        raise BadRequest("secret versions are 1-64 letters and digits")
    client = client_of(request)
    metrics = services.metrics
    if not services.policy.allows_secret(client, vault, name):
        metrics.secret_request(vault, "denied")
        raise Forbidden(f"client {client.name} may not read {vault}/{name}")
    if vault not in services.vaults:
        metrics.secret_request(vault, "unknown")
        raise NotFound(f"no vault '{vault}' is configured ([vaults.{vault}])")
    try:
        secret, outcome = await services.secrets.get(SecretKey(vault, name, version))
    except (BrokerError, ConnectorError):
        metrics.secret_request(vault, "error")
        raise
    metrics.secret_request(vault, outcome)
    return secret, outcome


def _wants_raw(request: web.Request) -> bool:
    if "format" in request.query:
        fmt = request.query["format"]
        if fmt not in ("raw", "json"):
            raise BadRequest("format must be 'raw' or 'json'")
        return fmt == "raw"
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept and "application/json" not in accept


async def secret(request: web.Request) -> web.Response:
    info = request.match_info
    raw = _wants_raw(request)
    found, outcome = await _lookup(request, info["vault"], info["name"], info.get("version", ""))
    if raw:
        return web.Response(text=found.value, content_type="text/plain", headers=NO_STORE)
    body: dict[str, Any] = {
        "vault": found.vault,
        "name": found.name,
        "version": found.version,
        "value": found.value,
        "content_type": found.content_type,
        "enabled": found.enabled,
        "not_before": _iso(found.not_before),
        "expires_on": _iso(found.expires_on),
        "updated_on": _iso(found.updated_on),
        "tags": dict(found.tags),
        "stale": outcome == "stale",
    }
    return web.json_response(body, headers=NO_STORE)


async def dapr_secret(request: web.Request) -> web.Response:
    """Dapr's secrets API shape, so Dapr clients work unchanged: ``{"name": "value"}``."""
    info = request.match_info
    version = request.query.get("metadata.version_id", "")
    found, _ = await _lookup(request, info["store"], info["name"], version)
    return web.json_response({found.name: found.value}, headers=NO_STORE)


async def flush(request: web.Request) -> web.Response:
    vault = name = None
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("the body must be JSON: {} or {\"vault\": ..., \"name\": ...}") from None
        if not isinstance(body, dict) or not set(body) <= {"vault", "name"}:
            raise BadRequest("the body may name only 'vault' and 'name'")
        vault, name = body.get("vault"), body.get("name")
        if not all(isinstance(v, str | None) for v in (vault, name)):
            raise BadRequest("'vault' and 'name' must be strings")
        if name is not None and vault is None:
            raise BadRequest("'name' needs 'vault'")
    admin_of(request)
    dropped = request.app[SERVICES].secrets.drop(vault, name)
    return web.json_response({"dropped": dropped})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/secrets/{vault}/{name}", secret)
    app.router.add_get("/v1/secrets/{vault}/{name}/{version}", secret)
    app.router.add_get("/v1.0/secrets/{store}/{name}", dapr_secret)
    app.router.add_post("/v1/cache/flush", flush)
