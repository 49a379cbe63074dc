"""The ``tokenbroker`` command: the service, its client commands, and the emulator."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import __version__, logs
from broker.client import BrokerClient, BrokerRefused, BrokerUnreachable, default_socket_path
from broker.errors import ConfigError

if TYPE_CHECKING:  # the service's modules load only for the commands that need them
    from broker.config import Config
    from broker.emulator import Emulator
    from broker.service import Broker

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("tokenbroker")

DESCRIPTION = """\
tokenbroker gets Azure managed-identity tokens once per host, keeps them fresh, and hands
local programs what they need (tokens, Key Vault secrets) over a Unix socket or loopback HTTP.

Start here:
  tokenbroker serve --dev          run against a built-in emulator, no Azure needed
  tokenbroker check-config FILE    validate a configuration before deploying it
  tokenbroker serve --config FILE  run for real

Client commands talk to a running broker over its Unix socket (--socket, $TOKENBROKER_SOCKET,
else /run/tokenbroker/broker.sock, else the --dev socket):
  tokenbroker token https://vault.azure.net
  tokenbroker secret main app-db
  tokenbroker status
"""

SERVE_EPILOG = """\
Without --config the broker reads $TOKENBROKER_CONFIG, else /etc/tokenbroker/config.toml.
--dev needs no file: it runs the embedded emulator (managed identity + an HTTPS Key Vault with
demo secrets), points the real identity and vault code at it, and prints commands to paste.

Stops gracefully on SIGTERM, SIGINT or POST /quitquitquit: readiness turns 503 at once,
in-flight requests get [server] shutdown_grace seconds, then exit 0.

Examples:
  tokenbroker serve --dev
  tokenbroker serve --config /etc/tokenbroker/config.toml
  TOKENBROKER_HTTP=127.0.0.1:9000 tokenbroker serve     # override a listener (containers)
"""


def _add_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH",
                        help="the broker's Unix socket (default: $TOKENBROKER_SOCKET or the standard path)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="tokenbroker", description=DESCRIPTION, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"tokenbroker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the broker", description="Run the broker.",
                           epilog=SERVE_EPILOG, formatter_class=fmt)
    serve.add_argument("--config", metavar="FILE", help="configuration file (TOML)")
    serve.add_argument("--dev", action="store_true", help="run against the embedded emulator; no Azure needed")
    serve.add_argument("--log-level", default=os.environ.get("TOKENBROKER_LOG_LEVEL", "info").lower(),
                       choices=LOG_LEVELS, help="default: $TOKENBROKER_LOG_LEVEL, else info")
    serve.add_argument("--log-format", choices=["json", "text"],
                       help="default: text on a terminal, JSON lines otherwise")

    check = sub.add_parser(
        "check-config", help="validate a configuration file", formatter_class=fmt,
        description="Validate a configuration file. Prints one line per problem, naming the key,\n"
                    "and exits 2; exits 0 when the file is good.",
        epilog="Example:\n  tokenbroker check-config /etc/tokenbroker/config.toml")
    check.add_argument("file", metavar="FILE")

    token = sub.add_parser(
        "token", help="print an access token from the running broker", formatter_class=fmt,
        description="Print an access token for RESOURCE (the bare token; --json for the whole answer).",
        epilog="Examples:\n"
               "  tokenbroker token https://database.windows.net/\n"
               "  psql \"host=... password=$(tokenbroker token https://ossrdbms-aad.database.windows.net)\"\n"
               "  tokenbroker token https://vault.azure.net --json")
    token.add_argument("resource", metavar="RESOURCE")
    token.add_argument("--client-id", default="", help="a user-assigned identity your client entry may use")
    token.add_argument("--json", action="store_true", help="print the broker's JSON answer")
    _add_socket(token)

    secret = sub.add_parser(
        "secret", help="print a Key Vault secret from the running broker", formatter_class=fmt,
        description="Print the value of secret NAME in the vault configured as [vaults.VAULT].",
        epilog="Examples:\n  tokenbroker secret main app-db\n  tokenbroker secret main app-db --version 4f1c... --json")
    secret.add_argument("vault", metavar="VAULT")
    secret.add_argument("name", metavar="NAME")
    secret.add_argument("--version", dest="secret_version", default="", metavar="V", help="a specific version")
    secret.add_argument("--json", action="store_true", help="print the broker's JSON answer (metadata too)")
    _add_socket(secret)

    status = sub.add_parser("status", help="show what the running broker holds", formatter_class=fmt,
                            description="Readiness, tokens (expires in, refresh in, last error), cached secrets\n"
                                        "(age, never values), databases and proxy connections.",
                            epilog="Examples:\n  tokenbroker status\n"
                                   "  tokenbroker status --json | jq '.tokens[] | {resource, expires_in}'")
    status.add_argument("--json", action="store_true")
    _add_socket(status)

    env = sub.add_parser(
        "env", help="print IDENTITY_ENDPOINT/IDENTITY_HEADER for runbooks and SDKs", formatter_class=fmt,
        description="Print the environment that makes unchanged runbooks and Azure SDKs use the broker's\n"
                    "HTTP listener as their managed-identity endpoint.",
        epilog="Example:\n  eval \"$(tokenbroker env --client runbooks --export)\"\n  python my_runbook.py")
    env.add_argument("--config", metavar="FILE", help="configuration file (default: as for serve)")
    env.add_argument("--client", metavar="NAME", help="the client whose key to use (default: the first with a key)")
    env.add_argument("--export", action="store_true", help="prefix each line with 'export '")

    emulator = sub.add_parser(
        "emulator", help="run the managed-identity and Key Vault emulator alone", formatter_class=fmt,
        description="Run the emulator alone, for developing runbooks without Azure. It prints the\n"
                    "IDENTITY_ENDPOINT/IDENTITY_HEADER to export, the Key Vault URL and its CA file.",
        epilog="Example:\n  tokenbroker emulator --identity-port 8780 --keyvault-port 8781")
    emulator.add_argument("--identity-port", type=int, default=0)
    emulator.add_argument("--keyvault-port", type=int, default=0)
    emulator.add_argument("--token-lifetime", type=float, default=3600, metavar="SECONDS")
    emulator.add_argument("--header", default=None, help="the X-IDENTITY-HEADER value to expect (default: random)")
    emulator.add_argument("--arc", action="store_true",
                          help="also emulate Azure Arc (writes its challenge key file under "
                               "/var/opt/azcmagent/tokens, so needs root)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handler = _COMMANDS[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _config_path(args: argparse.Namespace) -> Path:
    from broker.config import default_config_path

    return Path(args.config) if args.config else default_config_path()


def _print_problems(error: ConfigError) -> None:
    for problem in error.problems:
        print(problem, file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.log_level not in LOG_LEVELS:  # a default from TOKENBROKER_LOG_LEVEL escapes argparse's check
        print(f"tokenbroker: log level {args.log_level!r} (TOKENBROKER_LOG_LEVEL?) must be one of "
              f"{', '.join(LOG_LEVELS)}", file=sys.stderr)
        return EXIT_USAGE
    if args.dev and args.config:
        print("tokenbroker: --dev runs its own configuration; to run your file against the emulator, "
              'set identity.source = "dev" in it and drop --dev', file=sys.stderr)
        return EXIT_USAGE
    logs.setup(args.log_level, None if args.log_format is None else args.log_format == "json")
    if args.dev:
        return asyncio.run(_serve_dev(args))
    from broker.config import load_config

    path = _config_path(args)
    if not path.exists():
        print(f"tokenbroker: no configuration at {path}.\n"
              "  Pass --config FILE (or set TOKENBROKER_CONFIG), or try it with no Azure at all:\n"
              "  tokenbroker serve --dev", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(path)
    except ConfigError as error:
        _print_problems(error)
        return EXIT_USAGE
    if config.identity.source == "dev":
        return asyncio.run(_serve_dev(args, config))
    return asyncio.run(_serve(config))


def _cannot_start(error: Exception) -> int:
    """The exit code, and the lines, for a broker that cannot start: no traceback."""
    if isinstance(error, ConfigError):
        _print_problems(error)
        return EXIT_USAGE
    print(f"tokenbroker: {error}", file=sys.stderr)
    return EXIT_FAILURE


async def _serve(
    config: Config,
    emulator: Emulator | None = None,
    environ: Mapping[str, str] | None = None,
    announce: Callable[[Broker], None] | None = None,
) -> int:
    from broker.service import Broker, StartupError, serve

    try:
        return await serve(Broker(config, environ=environ, emulator=emulator), announce)
    except (ConfigError, StartupError) as error:
        return _cannot_start(error)


async def _serve_dev(args: argparse.Namespace, config: Config | None = None) -> int:
    from broker.devmode import announcement, dev_config, dev_environ
    from broker.emulator import Emulator, seed_demo
    from broker.service import StartupError

    environ = dev_environ()
    async with Emulator() as emulator:
        seed_demo(emulator)
        try:
            config = config or dev_config(emulator, environ)
        except (ConfigError, StartupError) as error:
            return _cannot_start(error)

        def announce(broker: Broker) -> None:
            addresses = {item.role: item.address for item in broker.listeners}
            print(announcement(addresses, environ["TOKENBROKER_DEV_KEY"]), flush=True)

        return await _serve(config, emulator, environ, announce)


def cmd_check_config(args: argparse.Namespace) -> int:
    from broker.config import load_config

    try:
        config = load_config(args.file)
    except ConfigError as error:
        _print_problems(error)
        return EXIT_USAGE
    print(f"{args.file}: ok ({len(config.clients)} clients, {len(config.vaults)} vaults, "
          f"{len(config.databases)} databases)")
    return EXIT_OK


def _client(args: argparse.Namespace) -> BrokerClient:
    return BrokerClient(args.socket or default_socket_path())


def _run_client(args: argparse.Namespace, call: Any) -> int:
    try:
        call(_client(args))
    except BrokerUnreachable as exc:
        print(f"tokenbroker: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokerRefused as exc:
        print(f"tokenbroker: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    def call(client: BrokerClient) -> None:
        answer = client.token(args.resource, args.client_id)
        print(json.dumps(answer, indent=2) if args.json else answer["access_token"])

    return _run_client(args, call)


def cmd_secret(args: argparse.Namespace) -> int:
    def call(client: BrokerClient) -> None:
        answer = client.secret(args.vault, args.name, args.secret_version)
        print(json.dumps(answer, indent=2) if args.json else answer["value"])

    return _run_client(args, call)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign, left = ("-" if seconds < 0 else ""), int(abs(seconds))
    if left >= 3600:
        return f"{sign}{left // 3600}h{(left % 3600) // 60:02d}m"
    if left >= 60:
        return f"{sign}{left // 60}m{left % 60:02d}s"
    return f"{sign}{left}s"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def render_status(status: dict[str, Any]) -> str:
    checks = ", ".join(f"{k} {v}" for k, v in status.get("checks", {}).items())
    out = [f"ready: {'yes' if status.get('ready') else 'no'} ({checks})", "", "tokens:"]
    rows = [[t["resource"], t["identity"], _ago(t["expires_in"]), _ago(t["refresh_in"]),
             (t["last_error"] or "")[:60]] for t in status.get("tokens", [])]
    out.append(_table(["RESOURCE", "IDENTITY", "EXPIRES IN", "REFRESH IN", "LAST ERROR"], rows) if rows
               else "  (none cached)")
    secrets = status.get("secrets", [])
    out += ["", "secrets:"]
    srows = [[s["vault"], s["name"], s.get("version") or "latest", _ago(s["age"]),
              "stale" if s.get("stale") else ""] for s in secrets]
    out.append(_table(["VAULT", "NAME", "VERSION", "AGE", ""], srows) if srows else "  (none cached)")
    dbs = status.get("databases", [])
    out += ["", "databases:"]
    out.append(_table(["NAME", "KIND", "TARGET"], [[d["name"], d["kind"], d["target"]] for d in dbs])
               if dbs else "  (none configured)")
    conns = status.get("proxy_connections", [])
    out += ["", f"proxy connections: {len(conns)}"]
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> int:
    def call(client: BrokerClient) -> None:
        answer = client.status()
        print(json.dumps(answer, indent=2) if args.json else render_status(answer))

    return _run_client(args, call)


def cmd_env(args: argparse.Namespace) -> int:
    from broker.config import load_config

    try:
        config = load_config(_config_path(args))
    except ConfigError as error:
        _print_problems(error)
        return EXIT_USAGE
    if not config.server.http:
        print("tokenbroker: [server] http is disabled; runbooks need the HTTP listener", file=sys.stderr)
        return EXIT_USAGE
    candidates = [c for c in config.clients if c.resolved_key is not None]
    if args.client:
        candidates = [c for c in candidates if c.name == args.client]
    if not candidates:
        what = f"client {args.client!r} has no key" if args.client else "no client has a key"
        print(f"tokenbroker: {what} (key, key_file or key_env); TCP callers need one", file=sys.stderr)
        return EXIT_USAGE
    key = candidates[0].resolved_key
    assert key is not None
    prefix = "export " if args.export else ""
    print(f"{prefix}IDENTITY_ENDPOINT=http://{config.server.http}/msi/token")
    print(f"{prefix}IDENTITY_HEADER={key.get_secret_value()}")
    return EXIT_OK


def cmd_emulator(args: argparse.Namespace) -> int:
    logs.setup("info")
    from broker.emulator import ARC_KEY_DIR, Emulator, seed_demo

    async def run() -> int:
        emulator = Emulator(identity_port=args.identity_port, keyvault_port=args.keyvault_port,
                            token_lifetime=args.token_lifetime, identity_header=args.header,
                            arc_key_dir=ARC_KEY_DIR if args.arc else None)
        async with emulator:
            seed_demo(emulator)
            print("\n".join(["tokenbroker emulator (no Azure):", *emulator.describe(),
                             "Stop with Ctrl-C."]), flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            await stop.wait()
        return EXIT_OK

    return asyncio.run(run())


_COMMANDS = {
    "serve": cmd_serve,
    "check-config": cmd_check_config,
    "token": cmd_token,
    "secret": cmd_secret,
    "status": cmd_status,
    "env": cmd_env,
    "emulator": cmd_emulator,
}


if __name__ == "__main__":
    sys.exit(main())

