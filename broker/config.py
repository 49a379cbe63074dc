"""The broker's configuration: a TOML file validated into frozen models.

Every problem in a file is reported at once (``ConfigError``), one line each, naming the key the
way the user wrote it (``clients[0].key_file: ...``), so one ``check-config`` run shows them all.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from broker.errors import ConfigError
from connectors.identity import resource_of

DEFAULT_CONFIG_PATH = Path("/etc/tokenbroker/config.toml")
MIN_KEY_LENGTH = 16
ENV_OVERRIDES: Mapping[str, str] = {
    "TOKENBROKER_SOCKET": "socket",
    "TOKENBROKER_HTTP": "http",
    "TOKENBROKER_HEALTH": "health",
}
_DATABASE_KINDS = ("sqlserver", "postgres")
_LOOPBACK_HELP = "must be a loopback address (127.0.0.0/8, ::1 or localhost)"


# --- validation scope ---------------------------------------------------------------------------


@dataclass
class _Scope:
    """What validators need beyond the value: passed as pydantic's validation context.

    The name sets come from the raw document so that cross-references are checked (and
    reported) even when other parts of the file are invalid.
    """

    environ: Mapping[str, str]
    base_dir: Path | None = None
    client_names: frozenset[str] | None = None
    database_names: frozenset[str] | None = None
    seen_clients: set[str] = field(default_factory=set)


def _scope(info: ValidationInfo) -> _Scope:
    # Models built directly in code (tests, other modules) get no context: use the process env.
    return info.context if isinstance(info.context, _Scope) else _Scope(os.environ)


def _problem(message: str, at: str = "") -> PydanticCustomError:
    """An error a model validator files under one of its own keys (``at``) rather than itself."""
    # The message travels in ctx, not the template, so braces in it are never interpreted.
    return PydanticCustomError("tokenbroker", "{message}", {"message": message, "at": at})


# --- value types --------------------------------------------------------------------------------


def _split_address(value: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", value)
    if m is None:
        raise ValueError(f"must be HOST:PORT (IPv6 as [::1]:PORT), got {value!r}")
    host, port = (m[1], int(m[2])) if m[1] else (m[3], int(m[4]))
    if m[1]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"brackets are for IPv6 addresses only, got {value!r}") from None
    if port > 65535:
        raise ValueError(f"port must be 0..65535, got {value}")
    return host, port


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _any_address(value: str) -> str:
    if value:
        _split_address(value)
    return value


def _loopback_address(value: str) -> str:
    # Anything off-host could reach tokens with nothing but a key: refuse it outright.
    if value and not _is_loopback(_split_address(value)[0]):
        raise ValueError(f"{_LOOPBACK_HELP}, got {value}")
    return value


def _listen_address(value: str) -> str:
    if value.startswith("unix:"):
        if not value.removeprefix("unix:").startswith("/"):
            raise ValueError(f"must be unix:/ABSOLUTE/DIR or a loopback HOST:PORT, got {value!r}")
        return value
    return _loopback_address(value)


def _socket_mode(value: object) -> object:
    # TOML has no leading-zero integers, so the natural spelling "0660" arrives as a string.
    if isinstance(value, str):
        if not re.fullmatch(r"(0o?)?[0-7]{1,4}", value):
            raise ValueError(f'must be an octal mode such as "0660", got {value!r}')
        value = int(value.removeprefix("0o") or "0", 8)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError('must be an octal mode such as "0660"')
    if not 0 <= value <= 0o777:
        raise ValueError(f"must be an octal mode between 0000 and 0777, got {value:04o}")
    return value


def _https_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        ok = parts.scheme == "https" and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("must be an https:// URL")
    return value.rstrip("/") + "/"


def _http_url(value: str) -> str:
    if value:
        try:
            ok = urlsplit(value).scheme in ("http", "https") and bool(urlsplit(value).hostname)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("must be an http:// or https:// URL")
    return value


def _config_relative(value: str, info: ValidationInfo) -> str:
    # Relative to the config file, not the daemon's working directory (usually "/").
    base = _scope(info).base_dir
    return str(base / value) if value and base is not None else value


def _readable(value: str) -> str:
    if value:
        try:
            with open(value, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror}") from None
    return value


def _name(pattern: str, message: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(message)
        return value

    return check


def _secret_pattern(value: str) -> str:
    vault, _, name = value.partition("/")
    if not vault or not name:
        raise ValueError("must be VAULT/NAME (globs allowed)")
    return value


def _known_database(value: str, info: ValidationInfo) -> str:
    names = _scope(info).database_names
    if value != "*" and names is not None and value not in names:
        raise ValueError(f"unknown database {value!r}")
    return value


NonEmpty = Annotated[str, Field(min_length=1)]
Seconds = Annotated[float, Field(ge=0)]
Timeout = Annotated[float, Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]
Id = Annotated[int, Field(ge=0)]
FilePath = Annotated[str, AfterValidator(_config_relative)]
ReadableFile = Annotated[str, AfterValidator(_config_relative), AfterValidator(_readable)]
ClientName = Annotated[
    str, AfterValidator(_name(r"[A-Za-z0-9_.-]{1,64}", "must be 1-64 of the characters A-Z a-z 0-9 _ . -"))
]
TableName = Annotated[str, AfterValidator(_name(r"[A-Za-z0-9_-]{1,64}", "invalid name"))]


# --- models -------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ServerConfig(_Model):
    socket: str = "/run/tokenbroker/broker.sock"
    socket_mode: Annotated[int, BeforeValidator(_socket_mode)] = 0o660
    http: Annotated[str, AfterValidator(_loopback_address)] = "127.0.0.1:8765"
    health: Annotated[str, AfterValidator(_any_address)] = "127.0.0.1:8766"
    shutdown_grace: Seconds = 30
    imds_compat: bool = False
    imds_client: str = ""

    @field_validator("imds_client")
    @classmethod
    def _names_a_client(cls, value: str, info: ValidationInfo) -> str:
        names = _scope(info).client_names
        if value and names is not None and value not in names:
            raise ValueError(f"no [[clients]] entry is named {value!r}")
        return value

    def http_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the TCP API listener, host without brackets; None when disabled."""
        return _split_address(self.http) if self.http else None

    def health_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the probe listener, host without brackets; None when disabled."""
        return _split_address(self.health) if self.health else None


class IdentityConfig(_Model):
    source: Literal["auto", "app_service", "imds", "arc", "workload", "client_secret", "dev"] = "auto"
    client_id: str = Field(default="", validate_default=True)
    warm: tuple[NonEmpty, ...] = ()
    timeout: Timeout = 10.0
    attempts: Annotated[int, Field(ge=1, le=10)] = 4
    tenant_id: str = Field(default="", validate_default=True)
    client_secret_env: str = Field(default="", validate_default=True)
    endpoint: Annotated[str, AfterValidator(_http_url)] = ""
    ca_file: ReadableFile = ""  # extra CA bundle for the identity endpoint (private clouds, tests)

    @field_validator("client_id", "tenant_id", "client_secret_env")
    @classmethod
    def _client_secret_needs(cls, value: str, info: ValidationInfo) -> str:
        # Checked per key (source is validated first) so each missing one gets its own line.
        if info.data.get("source") != "client_secret":
            return value
        if not value:
            raise ValueError('required when source = "client_secret"')
        if info.field_name == "client_secret_env" and not _scope(info).environ.get(value):
            raise ValueError(f"environment variable {value} is not set")
        return value


class ClientConfig(_Model):
    name: ClientName
    uids: tuple[Id, ...] = ()
    gids: tuple[Id, ...] = ()
    key_file: FilePath = ""
    key: SecretStr | None = None
    key_env: str = ""
    resources: tuple[NonEmpty, ...] = ()
    secrets: tuple[Annotated[str, AfterValidator(_secret_pattern)], ...] = ()
    databases: tuple[Annotated[str, AfterValidator(_known_database)], ...] = ()
    admin: bool = False
    rate_limit: Seconds = 0
    identities: tuple[NonEmpty, ...] = ()

    _resolved_key: SecretStr | None = PrivateAttr(default=None)

    @property
    def resolved_key(self) -> SecretStr | None:
        """The caller key from key_file, key_env or key, read at load; None without one."""
        return self._resolved_key

    @field_validator("name")
    @classmethod
    def _unique(cls, value: str, info: ValidationInfo) -> str:
        # Items are validated in order, so the second and later uses are the ones flagged.
        seen = _scope(info).seen_clients
        if value in seen:
            raise ValueError(f"duplicate client name {value!r}")
        seen.add(value)
        return value

    @model_validator(mode="after")
    def _resolve_key(self, info: ValidationInfo) -> Self:
        sources = (
            ("key_file", bool(self.key_file)),
            ("key", self.key is not None),
            ("key_env", bool(self.key_env)),
        )
        given = [name for name, present in sources if present]
        if len(given) > 1:
            raise _problem(f"set at most one of key_file, key and key_env (got {', '.join(given)})")
        key: str | None = None
        if self.key_file:
            try:
                key = Path(self.key_file).read_text(encoding="utf-8").rstrip()
            except OSError as exc:
                raise _problem(f"cannot read {self.key_file}: {exc.strerror}", "key_file") from None
            except UnicodeDecodeError:
                raise _problem(f"cannot read {self.key_file}: not UTF-8 text", "key_file") from None
            if not key:
                raise _problem("is empty", "key_file")
        elif self.key_env:
            key = _scope(info).environ.get(self.key_env)
            if not key:
                raise _problem(f"environment variable {self.key_env} is not set", "key_env")
        elif self.key is not None:
            key = self.key.get_secret_value()
        # Reported under "key" whatever the source, and never with the value itself.
        if key is not None and len(key) < MIN_KEY_LENGTH:
            raise _problem(f"must be at least {MIN_KEY_LENGTH} characters", "key")
        if key is None and not self.uids and not self.gids:
            raise _problem("names no uids, gids or key, so no caller could match it")
        self._resolved_key = None if key is None else SecretStr(key)
        return self


class VaultConfig(_Model):
    url: Annotated[str, AfterValidator(_https_url)]
    cache_ttl: Seconds = 300
    stale_if_error: Seconds = 3600
    ca_file: ReadableFile = ""
    verify_challenge_resource: bool = True
    resource: NonEmpty = "https://vault.azure.net"


class SqlServerDatabase(_Model):
    kind: Literal["sqlserver"]
    host: NonEmpty
    port: Port = 1433
    database: NonEmpty
    driver: str = ""
    encrypt: Literal["yes", "strict"] = "yes"
    server_certificate: FilePath = ""
    resource: NonEmpty = "https://database.windows.net/"
    timeout: Timeout = 30


class PostgresDatabase(_Model):
    kind: Literal["postgres"]
    host: NonEmpty
    port: Port = 5432
    database: NonEmpty = "postgres"
    user: NonEmpty
    sslmode: Literal["disable", "require", "verify-ca", "verify-full"] = "require"
    sslrootcert: FilePath = ""
    listen: Annotated[str, AfterValidator(_listen_address)] = ""
    max_connections: Annotated[int, Field(ge=1)] = 100
    resource: NonEmpty = "https://ossrdbms-aad.database.windows.net"
    timeout: Timeout = 30


DatabaseConfig = Annotated[SqlServerDatabase | PostgresDatabase, Field(discriminator="kind")]


class Config(_Model):
    server: ServerConfig = ServerConfig()
    identity: IdentityConfig = IdentityConfig()
    clients: tuple[ClientConfig, ...] = ()
    vaults: dict[TableName, VaultConfig] = {}
    databases: dict[TableName, DatabaseConfig] = {}

    # Private so that a "source_path" key in the file is still an unknown key.
    _source_path: Path | None = PrivateAttr(default=None)

    @property
    def source_path(self) -> Path | None:
        """The file this was loaded from (absolute), or None if parsed from text."""
        return self._source_path

    def warm_resources(self) -> tuple[str, ...]:
        """Resources to fetch tokens for at start: vaults', databases', then identity.warm."""
        found = [*(v.resource for v in self.vaults.values()), *(d.resource for d in self.databases.values())]
        return tuple(dict.fromkeys(resource_of(r) for r in [*found, *self.identity.warm]))


# --- loading ------------------------------------------------------------------------------------


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("TOKENBROKER_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve ``path``; raises ``ConfigError`` listing every problem."""
    file = Path(path)
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        problem = f"{file}: no such file"
    except OSError as exc:
        problem = f"{file}: cannot read: {exc.strerror}"
    except UnicodeDecodeError:
        problem = f"{file}: invalid TOML: not UTF-8 text"
    else:
        config = parse_config(text, environ=environ, base_dir=file.absolute().parent, source=str(file))
        config._source_path = file.absolute()
        return config
    raise ConfigError([problem])


def parse_config(
    text: str,
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    source: str = "<config>",
) -> Config:
    """Validate TOML ``text``; relative file paths are taken from ``base_dir`` (else the cwd)."""
    env = os.environ if environ is None else environ
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems = [f"{source}: invalid TOML: {exc}"]
    else:
        overridden = _apply_overrides(data, env)
        scope = _Scope(
            environ=env,
            base_dir=base_dir,
            client_names=frozenset(_raw_names(data.get("clients"))),
            database_names=frozenset(dbs) if isinstance(dbs := data.get("databases", {}), dict) else None,
        )
        try:
            return Config.model_validate(data, context=scope)
        except ValidationError as exc:
            # include_input=False: the input may be a client key.
            problems = [_describe(e, overridden) for e in exc.errors(include_url=False, include_input=False)]
    # Raised outside the handlers so the ValidationError (whose text quotes inputs) is not chained.
    raise ConfigError(list(dict.fromkeys(problems)))


def _apply_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    applied: dict[tuple[str, ...], str] = {}
    for var, key in ENV_OVERRIDES.items():
        if var in environ and isinstance(server := data.setdefault("server", {}), dict):
            server[key] = environ[var]
            applied["server", key] = var
    return applied


def _raw_names(clients: object) -> Iterable[str]:
    if isinstance(clients, list):
        for client in clients:
            if isinstance(client, dict) and isinstance(client.get("name"), str):
                yield client["name"]


# --- error messages -----------------------------------------------------------------------------

_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least {}"),
    "greater_than": ("gt", "must be greater than {}"),
    "less_than_equal": ("le", "must be at most {}"),
    "less_than": ("lt", "must be less than {}"),
}


def _describe(error: ErrorDetails, overridden: Mapping[tuple[str, ...], str]) -> str:
    kind, ctx, loc = error["type"], error.get("ctx", {}), list(error["loc"])
    # A discriminated union puts its tag into the path; users never wrote that key.
    if loc[:1] == ["databases"] and len(loc) > 2 and loc[2] in _DATABASE_KINDS:
        del loc[2]
    if kind != "extra_forbidden" and loc[-1:] == ["[key]"]:
        del loc[-1]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        loc.append("kind")
        message = "must be one of: " + ", ".join(_DATABASE_KINDS)
    elif kind == "tokenbroker":
        loc += [ctx["at"]] if ctx["at"] else []
        message = ctx["message"]
    elif kind == "value_error":
        message = str(ctx["error"])
    elif kind == "literal_error":
        message = "must be one of: " + ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
    elif kind in _BOUNDS:
        bound, template = _BOUNDS[kind]
        limit = ctx[bound]
        message = template.format(int(limit) if isinstance(limit, float) and limit.is_integer() else limit)
    else:
        message = _MESSAGES.get(kind, error["msg"])
    path = _path(loc)
    for key, var in overridden.items():
        if tuple(loc[: len(key)]) == key:
            path += f" (from {var})"
    return f"{path}: {message}"


def _path(loc: Iterable[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            # Quoted like a TOML key when it is not a bare key, so the path stays unambiguous.
            key = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
            path += f".{key}" if path else key
    return path or "(top level)"
