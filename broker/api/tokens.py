"""``/msi/token`` (a drop-in IDENTITY_ENDPOINT) and the IMDS-compatible path."""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiohttp import web

from broker.api.guard import IMDS_PATH
from broker.api.state import SERVICES, client_of
from broker.errors import BadRequest, BrokerError, Forbidden, NotFound
from broker.tokens import TokenKey
from connectors.errors import ConnectorError
from connectors.identity import DEFAULT_IDENTITY, Identity, IdentityKind, resource_of

# Every spelling callers use for a user-assigned identity, by what it names.
_IDENTITY_PARAMS: dict[str, IdentityKind] = {
    "client_id": "client_id",
    "clientid": "client_id",
    "object_id": "object_id",
    "principal_id": "object_id",
    "mi_res_id": "mi_res_id",
    "msi_res_id": "mi_res_id",
}


async def _params(request: web.Request) -> Mapping[str, str]:
    if request.method != "POST":
        return request.query
    if request.content_type != "application/x-www-form-urlencoded":
        raise BadRequest("POST bodies must be application/x-www-form-urlencoded (resource=...)")
    form = await request.post()
    merged: dict[str, str] = dict(request.query)
    for name in form:
        values = form.getall(name)
        if len(values) > 1 or name in merged:
            raise BadRequest(f"duplicate parameter: {name}")
        merged[name] = str(values[0])
    return merged


def requested_identity(params: Mapping[str, str]) -> Identity:
    asked = [(kind, params[name]) for name, kind in _IDENTITY_PARAMS.items() if params.get(name)]
    if len(asked) > 1:
        raise BadRequest("ask for one identity at most (client_id, object_id or mi_res_id)")
    if not asked:
        return DEFAULT_IDENTITY
    kind, value = asked[0]
    return Identity(kind, value)


async def token(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if request.path == IMDS_PATH:
        if not services.imds_compat:
            raise NotFound("the IMDS-compatible path is off ([server] imds_compat = false)")
        if request.headers.get("Metadata", "").lower() != "true":
            raise BadRequest("requests must carry the header 'Metadata: true'")
    params = await _params(request)
    resource = params.get("resource", "")
    if not resource:
        raise BadRequest("missing the 'resource' parameter, e.g. resource=https://vault.azure.net")
    audience = resource_of(resource)
    identity = requested_identity(params)
    if identity.kind != "default" and not services.user_assigned:
        raise BadRequest("this broker's identity source has one identity only; "
                         "client_id, object_id and mi_res_id cannot be honoured")
    client = client_of(request)
    metrics = services.metrics
    if not services.policy.allows_resource(client, audience):
        metrics.token_request(audience, "denied")
        raise Forbidden(f"client {client.name} may not have tokens for {audience}")
    if not services.policy.allows_identity(client, identity):
        metrics.token_request(audience, "denied")
        raise Forbidden(f"client {client.name} may not act as identity {identity}")
    try:
        got, hit = await services.tokens.get(TokenKey(identity, audience))
    except (BrokerError, ConnectorError):
        metrics.token_request(audience, "error")
        raise
    metrics.token_request(audience, "hit" if hit else "miss")
    # For an object_id or mi_res_id the client id is not ours to know: say nothing rather than guess.
    client_id = {"default": services.default_client_id, "client_id": identity.value}.get(identity.kind, "")
    body = {
        "access_token": got.value,
        "expires_on": str(int(got.expires_on)),
        "expires_in": max(0, int(got.expires_on - time.time())),
        "not_before": str(int(got.obtained_at)),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": client_id,
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", "/msi/token", token)
    app.router.add_route("POST", "/msi/token", token)
    app.router.add_route("GET", IMDS_PATH, token)
