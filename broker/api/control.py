"""Probes, metrics, status and the stop button."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.api.state import SERVICES, Lifecycle, admin_of, client_of


async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def startupz(request: web.Request) -> web.Response:
    started = request.app[SERVICES].lifecycle.started
    return web.json_response({"status": "started" if started else "starting"}, status=200 if started else 503)


def readiness(lifecycle: Lifecycle, tokens_obtained: int) -> dict[str, str]:
    """Each readiness check and its state; the broker is ready when all are "ok"."""
    since_failure = lifecycle.warm_failed_at is not None and tokens_obtained > lifecycle.warm_failed_at
    warm = "ok" if lifecycle.warmed or since_failure else f"pending: {lifecycle.warm_error or 'warming up'}"
    return {
        "listeners": "ok" if lifecycle.started else "starting",
        "tokens": warm,
        "draining": "draining" if lifecycle.draining else "ok",
    }


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    checks = readiness(services.lifecycle, services.tokens.obtained)
    ready = all(v == "ok" for v in checks.values())
    body: dict[str, object] = {"status": "ready" if ready else "not ready"}
    if "verbose" in request.query or not ready:
        body["checks"] = checks
    headers = {} if ready else {"Retry-After": "1"}
    return web.json_response(body, status=200 if ready else 503, headers=headers)


async def metrics(request: web.Request) -> web.Response:
    payload = request.app[SERVICES].metrics.render()
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    client_of(request)
    services = request.app[SERVICES]
    now = time.time()
    tokens = [
        {
            "resource": s.resource,
            "identity": s.identity,
            "expires_in": None if s.expires_on is None else round(s.expires_on - now),
            "refresh_in": None if s.refresh_at is None else max(0, round(s.refresh_at - now)),
            "refreshing": s.refreshing,
            "failures": s.failures,
            "last_error": s.last_error,
        }
        for s in services.tokens.states()
    ]
    checks = readiness(services.lifecycle, services.tokens.obtained)
    return web.json_response(
        {
            "ready": all(v == "ok" for v in checks.values()),
            "checks": checks,
            "tokens": tokens,
            "secrets": [
                {"vault": s.vault, "name": s.name, "version": s.version, "age": round(s.age),
                 "stale": s.stale, "reads": s.reads}
                for s in services.secrets.states()
            ],
            "databases": [{"name": d.name, "kind": d.kind, "target": d.target} for d in services.databases],
            "proxy_connections": [],
        }
    )


async def quitquitquit(request: web.Request) -> web.Response:
    admin_of(request)
    request.app[SERVICES].lifecycle.stop.set()
    return web.json_response({"status": "stopping"}, status=202)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/startupz", startupz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/quitquitquit", quitquitquit)
