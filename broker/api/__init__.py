"""The local HTTP API (CONTRACT section 3), served on the Unix socket, loopback TCP and probes."""

from __future__ import annotations

from aiohttp import web

from broker.api import control, secrets, tokens
from broker.api.guard import MAX_BODY, errors_middleware, guard_middleware
from broker.api.state import SERVICES, Services


def make_app(services: Services) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, guard_middleware], client_max_size=MAX_BODY)
    app[SERVICES] = services
    tokens.add_routes(app)
    secrets.add_routes(app)
    control.add_routes(app)
    return app
