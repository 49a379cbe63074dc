"""The cost floor for bench/latency.py: bare aiohttp answering GET /msi/token with a fixed JSON body.

It serves the same body (read from a file: a real answer of the broker, so size and shape match)
with the same ``Cache-Control: no-store`` header, on a loopback TCP port and on a Unix socket, with
no middleware, no authentication, no cache and no access log. Whatever the broker costs above this
is the broker's own work.

    python bench/baseline_server.py --port 8800 --socket /tmp/x/baseline.sock --body body.json

Stops cleanly on SIGTERM or SIGINT. Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
from pathlib import Path
from typing import Any

from aiohttp import web

NO_STORE = {"Cache-Control": "no-store"}
BODY: web.AppKey[dict[str, Any]] = web.AppKey("body", dict)


async def token(request: web.Request) -> web.Response:
    # Serialised on every request, as the broker does; json.dumps of a small dict is part of the floor.
    return web.json_response(request.app[BODY], headers=NO_STORE)


def make_app(body: dict[str, Any]) -> web.Application:
    app = web.Application()
    app[BODY] = body
    app.router.add_get("/msi/token", token)
    return app


async def serve(host: str, port: int, socket_path: str, body: dict[str, Any]) -> None:
    runner = web.AppRunner(make_app(body), handle_signals=False, access_log=None, shutdown_timeout=1)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        await web.UnixSite(runner, socket_path).start()
        print(f"baseline listening on http://{host}:{port} and unix:{socket_path}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        Path(socket_path).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address for the TCP listener")
    parser.add_argument("--port", type=int, required=True, help="TCP port")
    parser.add_argument("--socket", required=True, help="Unix socket path")
    parser.add_argument("--body", type=Path, required=True, help="JSON file: the object to answer with")
    args = parser.parse_args()
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error(f"--host must be a loopback address, got {args.host}")
    body = json.loads(args.body.read_text())
    if not isinstance(body, dict):
        parser.error("--body must hold a JSON object")
    asyncio.run(serve(args.host, args.port, args.socket, body))


if __name__ == "__main__":
    main()
