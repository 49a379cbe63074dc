"""Checks every request passes before a handler runs, and the JSON shape of every error.

Order (CONTRACT section 3): a TCP caller without a valid key gets 401 whatever else it sent;
then the 400 checks (proxy headers, Host, duplicate parameters, the Metadata header); then the
client's rate limit (429). Handlers do policy (403) before lookups (404).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.api.state import CALLER, SERVICES, Caller, Role, Services
from broker.errors import (
    BadRequest,
    BrokerError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    reply_for,
)
from connectors.errors import ConnectorError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
PROBES = frozenset({"/livez", "/readyz", "/startupz", "/metrics"})
IMDS_PATH = "/metadata/identity/oauth2/token"
# dapr-api-token: Dapr clients send DAPR_API_TOKEN there, so they work unchanged with a client key.
KEY_HEADERS = ("X-IDENTITY-HEADER", "secret", "dapr-api-token")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: BaseException) -> web.Response:
    reply = reply_for(exc)
    headers = {"Cache-Control": "no-store"}
    if reply.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(reply.retry_after)))
    return web.json_response(
        {"error": reply.code, "error_description": reply.description}, status=reply.status, headers=headers
    )


_AIOHTTP_ERRORS: dict[int, type[BrokerError]] = {404: NotFound, 405: BadRequest, 413: PayloadTooLarge}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    services = request.app[SERVICES]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        cls = _AIOHTTP_ERRORS.get(exc.status, BadRequest)
        response = error_response(cls(exc.reason if exc.status != 404 else f"no endpoint {request.path}"))
    except (BrokerError, ConnectorError) as exc:
        response = error_response(exc)
    except Exception as exc:
        # Type only: the text of an unexpected exception is not ours to vouch for.
        log.error("unexpected %s while serving %s %s", type(exc).__name__, request.method, request.path)
        response = error_response(exc)
    route = request.match_info.route.resource
    label = route.canonical if route is not None else "unmatched"
    services.metrics.http_requests.labels(label, str(response.status)).inc()
    return response


def _role(request: web.Request, services: Services) -> Role:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        # Never default to the socket's rules: they skip the TCP key check.
        raise BadRequest("cannot tell which listener the request came in on")
    if sock.family == socket.AF_UNIX:
        return "unix"
    # By family and port, not address: on a wildcard bind (0.0.0.0 for kubelet probes) the
    # accepted socket's local address is whatever interface the probe came in on.
    return "health" if (sock.family, sock.getsockname()[1]) in services.health_sockets else "tcp"


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _presented_key(request: web.Request) -> str | None:
    for name in KEY_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            return value
    return None


def _check_shape(request: web.Request) -> None:
    if "X-Forwarded-For" in request.headers or "Forwarded" in request.headers:
        raise BadRequest("requests relayed by a proxy (X-Forwarded-For, Forwarded) are refused")
    if not is_loopback_host(request.headers.get("Host")):
        raise BadRequest("the Host header must name a loopback address (localhost, 127.0.0.1, [::1])")
    # As IMDS does: a repeated parameter could make two parsers disagree on what was asked.
    if len(request.query) != len(set(request.query)):
        duplicated = sorted(k for k in set(request.query) if len(request.query.getall(k)) > 1)
        raise BadRequest(f"duplicate query parameter: {', '.join(duplicated)}")
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise PayloadTooLarge(f"request body over {MAX_BODY // 1024} KiB")


def _has_metadata(request: web.Request) -> bool:
    return request.headers.get("Metadata", "").lower() == "true"


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    services = request.app[SERVICES]
    role = _role(request, services)
    if role == "health":
        if request.path not in PROBES:
            raise NotFound("the health listener serves only /livez, /readyz, /startupz and /metrics")
        return await handler(request)

    caller: Caller | None = None
    if role == "tcp" and request.path not in PROBES:
        key = _presented_key(request)
        if key is not None:
            client = services.policy.by_key(key)
            if client is None:
                raise Unauthorized("the identity header does not match any client key")
            caller = Caller(client)
        elif request.path == IMDS_PATH and services.imds_compat and services.imds_client is not None:
            # As with the real IMDS, any local process gets the configured client's rights.
            caller = Caller(services.imds_client)
        else:
            raise Unauthorized("missing X-IDENTITY-HEADER: TCP callers must present a client key")

    _check_shape(request)
    if request.path in PROBES:
        return await handler(request)

    if role == "unix":
        if not (_has_metadata(request) or _presented_key(request) is not None):
            raise BadRequest("requests must carry the header 'Metadata: true'")
        peer = services.peers.of(request.transport)
        caller = Caller(services.policy.by_peer(peer.uid, peer.gids), peer.uid)
    assert caller is not None

    if caller.client is not None:
        wait = services.limiter.check(caller.client.name, caller.client.rate_limit, time.monotonic())
        if wait > 0:
            raise RateLimited(f"client {caller.client.name} is over its rate limit", retry_after=wait)
    request[CALLER] = caller
    return await handler(request)
