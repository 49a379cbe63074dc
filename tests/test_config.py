from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.config import (
    ClientConfig,
    Config,
    PostgresDatabase,
    SqlServerDatabase,
    default_config_path,
    load_config,
    parse_config,
)
from broker.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.toml"
KEY = "k3y-0123456789abcdef"  # 20 characters
CLIENT = '[[clients]]\nname = "c"\nuids = [1]\n'


def problems(text: str, environ: dict[str, str] | None = None, base_dir: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ=environ or {}, base_dir=base_dir)
    return list(info.value.problems)


def one_problem(text: str, environ: dict[str, str] | None = None, base_dir: Path | None = None) -> str:
    found = problems(text, environ, base_dir)
    assert len(found) == 1, found
    return found[0]


# --- the example and the defaults -----------------------------------------------------------


def test_example_file_validates() -> None:
    config = load_config(EXAMPLE, environ={"TOKENBROKER_APP_KEY": KEY})
    assert config.source_path == EXAMPLE
    runbooks, app = config.clients
    assert runbooks.uids == (1001,)
    assert key_of(runbooks) is None
    assert key_of(app) == KEY
    assert config.server.socket_mode == 0o660
    assert isinstance(config.databases["reporting"], SqlServerDatabase)
    warehouse = config.databases["warehouse"]
    assert isinstance(warehouse, PostgresDatabase)
    assert warehouse.listen == "unix:/run/tokenbroker/pg/warehouse"
    assert config.vaults["main"].url == "https://myvault.vault.azure.net/"
    assert config.warm_resources() == (
        "https://vault.azure.net",
        "https://database.windows.net/",
        "https://ossrdbms-aad.database.windows.net",
    )


def test_example_file_needs_its_key_env() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, environ={})
    assert info.value.problems == (
        "clients[1].key_env: environment variable TOKENBROKER_APP_KEY is not set",
    )


def test_example_file_sets_every_key() -> None:
    text = EXAMPLE.read_text()
    models = {
        "server": Config.model_fields["server"].annotation,
        "identity": Config.model_fields["identity"].annotation,
        "clients": ClientConfig,
        "sqlserver": SqlServerDatabase,
        "postgres": PostgresDatabase,
    }
    for section, model in models.items():
        assert model is not None
        for key in model.model_fields:
            assert f"\n{key} =" in text or f"# {key} =" in text, (section, key)


def test_defaults() -> None:
    config = parse_config("", environ={})
    assert config.server.socket == "/run/tokenbroker/broker.sock"
    assert config.server.socket_mode == 0o660
    assert config.server.http_address() == ("127.0.0.1", 8765)
    assert config.server.health_address() == ("127.0.0.1", 8766)
    assert config.server.shutdown_grace == 30
    assert not config.server.imds_compat
    assert config.identity.source == "auto"
    assert (config.identity.timeout, config.identity.attempts) == (10.0, 4)
    assert (config.clients, config.vaults, config.databases) == ((), {}, {})
    assert config.source_path is None
    assert config.warm_resources() == ()


def test_section_defaults() -> None:
    config = parse_config(
        CLIENT
        + '[vaults.v]\nurl = "https://v.vault.azure.net"\n'
        + '[databases.s]\nkind = "sqlserver"\nhost = "h"\ndatabase = "d"\n'
        + '[databases.p]\nkind = "postgres"\nhost = "h"\nuser = "u"\n',
        environ={},
    )
    vault = config.vaults["v"]
    assert (vault.cache_ttl, vault.stale_if_error, vault.verify_challenge_resource) == (300, 3600, True)
    sql, pg = config.databases["s"], config.databases["p"]
    assert isinstance(sql, SqlServerDatabase)
    assert isinstance(pg, PostgresDatabase)
    assert (sql.port, sql.encrypt, sql.timeout) == (1433, "yes", 30)
    assert sql.resource == "https://database.windows.net/"
    assert (pg.port, pg.database, pg.sslmode, pg.max_connections) == (5432, "postgres", "require", 100)
    assert pg.resource == "https://ossrdbms-aad.database.windows.net"
    client = config.clients[0]
    assert (client.admin, client.rate_limit, client.resolved_key) == (False, 0, None)


def test_models_are_frozen() -> None:
    config = parse_config("", environ={})
    with pytest.raises(ValueError, match="frozen"):
        config.server.http = "127.0.0.1:1"  # type: ignore[misc]


# --- file and syntax problems ---------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.problems == (f"{path}: no such file",)


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nhttp = "127.0.0.1:1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    (line,) = info.value.problems
    assert line.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in line


def test_default_config_path() -> None:
    assert default_config_path({}) == Path("/etc/tokenbroker/config.toml")
    assert default_config_path({"TOKENBROKER_CONFIG": "/x/y.toml"}) == Path("/x/y.toml")


# --- every problem at once, with its key path -----------------------------------------------


def test_all_problems_reported_at_once() -> None:
    found = problems(
        '[server]\nhttp = "0.0.0.0:8765"\n'
        '[vaults.main]\nurl = "http://myvault.vault.azure.net"\n'
        '[databases.reporting]\nkind = "sqlserver"\nhost = "h"\ndatabase = "d"\nport = "x"\n'
    )
    assert found == [
        "server.http: must be a loopback address (127.0.0.0/8, ::1 or localhost), got 0.0.0.0:8765",
        "vaults.main.url: must be an https:// URL",
        "databases.reporting.port: must be an integer",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bogus = 1\n", "bogus: unknown key"),
        ("[server]\nbogus = 1\n", "server.bogus: unknown key"),
        ("[identity]\nbogus = 1\n", "identity.bogus: unknown key"),
        (CLIENT + "bogus = 1\n", "clients[0].bogus: unknown key"),
        ('[vaults.v]\nurl = "https://v/"\nbogus = 1\n', "vaults.v.bogus: unknown key"),
        ('[databases.x]\nkind = "sqlserver"\nhost = "h"\ndatabase = "d"\nbogus = 1\n',
         "databases.x.bogus: unknown key"),
        ('[databases.x]\nkind = "postgres"\nhost = "h"\nuser = "u"\nbogus = 1\n',
         "databases.x.bogus: unknown key"),
        ('source_path = "/x"\n', "source_path: unknown key"),
    ],
)
def test_unknown_keys(text: str, expected: str) -> None:
    assert one_problem(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[databases.reporting]\nkind = "sqlserver"\nhost = "h"\ndatabase = "d"\nport = "x"\n',
         "databases.reporting.port: must be an integer"),
        ('[databases.reporting]\nkind = "sqlserver"\nhost = "h"\ndatabase = "d"\nport = 70000\n',
         "databases.reporting.port: must be at most 65535"),
        ('[databases.reporting]\nkind = "sqlserver"\nhost = "h"\n', "databases.reporting.database: required"),
        ('[databases.reporting]\nkind = "sqlserver"\nhost = ""\ndatabase = "d"\n',
         "databases.reporting.host: must not be empty"),
        ('[databases.reporting]\nkind = "sqlserver"\nhost = "h"\ndatabase = "d"\nencrypt = "no"\n',
         "databases.reporting.encrypt: must be one of: yes, strict"),
        ('[databases.w]\nkind = "postgres"\nhost = "h"\n', "databases.w.user: required"),
        ('[databases.w]\nkind = "postgres"\nhost = "h"\nuser = "u"\nmax_connections = 0\n',
         "databases.w.max_connections: must be at least 1"),
        ('[databases.x]\nkind = "mysql"\nhost = "h"\n',
         "databases.x.kind: must be one of: sqlserver, postgres"),
        ('[databases.x]\nhost = "h"\n', "databases.x.kind: must be one of: sqlserver, postgres"),
        ('databases.x = "sqlserver"\n', "databases.x: must be a table"),
        ('[databases."my db"]\nkind = "sqlserver"\nhost = "h"\ndatabase = "d"\n',
         'databases."my db": invalid name'),
        ('[server]\nshutdown_grace = -1\n', "server.shutdown_grace: must be at least 0"),
        ('[server]\nshutdown_grace = "soon"\n', "server.shutdown_grace: must be a number"),
        ('[server]\nimds_compat = "maybe"\n', "server.imds_compat: must be true or false"),
        ("[server]\nsocket = 5\n", "server.socket: must be a string"),
        ('[identity]\nwarm = "https://x"\n', "identity.warm: must be a list"),
        ('[identity]\nsource = "magic"\n',
         "identity.source: must be one of: auto, app_service, imds, arc, workload, client_secret, dev"),
        ("[identity]\nattempts = 11\n", "identity.attempts: must be at most 10"),
        ("[identity]\ntimeout = 0\n", "identity.timeout: must be greater than 0"),
        ('[identity]\nendpoint = "ftp://x"\n', "identity.endpoint: must be an http:// or https:// URL"),
        ('[vaults.main]\nurl = "http://myvault.vault.azure.net/"\n',
         "vaults.main.url: must be an https:// URL"),
        ('[vaults.main]\nurl = "https://"\n', "vaults.main.url: must be an https:// URL"),
        ("[vaults.main]\n", "vaults.main.url: required"),
        ('[vaults.main]\nurl = "https://v/"\ncache_ttl = -5\n', "vaults.main.cache_ttl: must be at least 0"),
        ('[vaults."a.b"]\nurl = "https://v/"\n', 'vaults."a.b": invalid name'),
        ("clients = 3\n", "clients: must be a list"),
        ('[[clients]]\nuids = [1]\n', "clients[0].name: required"),
        ('[[clients]]\nname = "a b"\nuids = [1]\n',
         "clients[0].name: must be 1-64 of the characters A-Z a-z 0-9 _ . -"),
        ('[[clients]]\nname = "c"\nuids = [1, -2]\n', "clients[0].uids[1]: must be at least 0"),
        (CLIENT + "rate_limit = -1\n", "clients[0].rate_limit: must be at least 0"),
        ('[[clients]]\nname = "c"\n', "clients[0]: names no uids, gids or key, so no caller could match it"),
        (CLIENT + CLIENT, "clients[1].name: duplicate client name 'c'"),
        (CLIENT + 'secrets = ["main/*", "*"]\n', "clients[0].secrets[1]: must be VAULT/NAME (globs allowed)"),
        (CLIENT + 'databases = ["*", "nope"]\n', "clients[0].databases[1]: unknown database 'nope'"),
        (CLIENT + '[server]\nimds_compat = true\nimds_client = "other"\n',
         "server.imds_client: no [[clients]] entry is named 'other'"),
    ],
)
def test_problem_lines(text: str, expected: str) -> None:
    assert one_problem(text) == expected


def test_cross_references_resolve() -> None:
    config = parse_config(
        CLIENT + 'databases = ["reporting", "*"]\nsecrets = ["main/db-*"]\n'
        '[server]\nimds_compat = true\nimds_client = "c"\n'
        '[databases.reporting]\nkind = "sqlserver"\nhost = "h"\ndatabase = "d"\n',
        environ={},
    )
    assert config.clients[0].databases == ("reporting", "*")
    assert config.server.imds_client == "c"


def test_client_secret_source_needs_its_settings() -> None:
    assert problems('[identity]\nsource = "client_secret"\n') == [
        'identity.client_id: required when source = "client_secret"',
        'identity.tenant_id: required when source = "client_secret"',
        'identity.client_secret_env: required when source = "client_secret"',
    ]
    text = (
        '[identity]\nsource = "client_secret"\nclient_id = "app"\ntenant_id = "t"\n'
        'client_secret_env = "SP_SECRET"\n'
    )
    assert one_problem(text) == "identity.client_secret_env: environment variable SP_SECRET is not set"
    assert parse_config(text, environ={"SP_SECRET": "s"}).identity.client_secret_env == "SP_SECRET"


# --- listeners ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com", "[::]"])
def test_non_loopback_http_refused(host: str) -> None:
    assert one_problem(f'[server]\nhttp = "{host}:8765"\n') == (
        f"server.http: must be a loopback address (127.0.0.0/8, ::1 or localhost), got {host}:8765"
    )


@pytest.mark.parametrize(
    ("http", "address"),
    [("127.0.0.1:8765", ("127.0.0.1", 8765)), ("127.9.9.9:1", ("127.9.9.9", 1)),
     ("[::1]:0", ("::1", 0)), ("localhost:80", ("localhost", 80))],
)
def test_loopback_http_accepted(http: str, address: tuple[str, int]) -> None:
    assert parse_config(f'[server]\nhttp = "{http}"\n', environ={}).server.http_address() == address


@pytest.mark.parametrize("value", ["127.0.0.1", "::1:80", "127.0.0.1:99999", "[127.0.0.1]:80", ":80"])
def test_malformed_addresses_refused(value: str) -> None:
    assert one_problem(f'[server]\nhttp = "{value}"\n').startswith("server.http: ")


def test_health_may_bind_anywhere_and_listeners_disable() -> None:
    server = parse_config('[server]\nhealth = "0.0.0.0:8766"\n', environ={}).server
    assert server.health_address() == ("0.0.0.0", 8766)
    server = parse_config('[server]\nhttp = ""\nhealth = ""\nsocket = ""\n', environ={}).server
    assert (server.http_address(), server.health_address(), server.socket) == (None, None, "")
    assert one_problem('[server]\nhealth = "nowhere"\n').startswith("server.health: must be HOST:PORT")


@pytest.mark.parametrize(
    ("value", "mode"),
    [('"0660"', 0o660), ('"600"', 0o600), ('"0o755"', 0o755), ("0o640", 0o640), ("384", 0o600)],
)
def test_socket_mode(value: str, mode: int) -> None:
    assert parse_config(f"[server]\nsocket_mode = {value}\n", environ={}).server.socket_mode == mode


@pytest.mark.parametrize("value", ['"999"', '"rw-rw----"', "1000", "-1", "true"])
def test_socket_mode_refused(value: str) -> None:
    line = one_problem(f"[server]\nsocket_mode = {value}\n")
    assert line.startswith("server.socket_mode: must be an octal mode")


def test_postgres_listen() -> None:
    base = '[databases.w]\nkind = "postgres"\nhost = "h"\nuser = "u"\n'
    for ok in ("unix:/run/pg/w", "127.0.0.1:6432", "[::1]:0", ""):
        db = parse_config(base + f'listen = "{ok}"\n', environ={}).databases["w"]
        assert isinstance(db, PostgresDatabase)
        assert db.listen == ok
    assert one_problem(base + 'listen = "0.0.0.0:6432"\n') == (
        "databases.w.listen: must be a loopback address (127.0.0.0/8, ::1 or localhost), got 0.0.0.0:6432"
    )
    line = one_problem(base + 'listen = "unix:relative/dir"\n')
    assert line.startswith("databases.w.listen: must be unix:/")


# --- environment overrides ------------------------------------------------------------------


def test_env_overrides() -> None:
    env = {"TOKENBROKER_SOCKET": "/tmp/b.sock", "TOKENBROKER_HTTP": "[::1]:9000", "TOKENBROKER_HEALTH": ""}
    server = parse_config('[server]\nhttp = "127.0.0.1:1"\nhealth = "0.0.0.0:2"\n', environ=env).server
    assert (server.socket, server.http, server.health) == ("/tmp/b.sock", "[::1]:9000", "")
    # No [server] table at all: the override still applies.
    assert parse_config("", environ={"TOKENBROKER_HTTP": ""}).server.http_address() is None


def test_env_override_problem_names_the_variable() -> None:
    assert one_problem("", {"TOKENBROKER_HTTP": "0.0.0.0:80"}) == (
        "server.http (from TOKENBROKER_HTTP): must be a loopback address (127.0.0.0/8, ::1 or localhost), "
        "got 0.0.0.0:80"
    )


# --- client keys ----------------------------------------------------------------------------


def test_key_file_read_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "app.key").write_text(KEY + " \n\n")
    config = load_config(_write(tmp_path, '[[clients]]\nname = "c"\nkey_file = "app.key"\n'), environ={})
    client = config.clients[0]
    assert client.key_file == str(tmp_path / "app.key")
    assert key_of(client) == KEY


def test_key_file_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    assert one_problem(f'[[clients]]\nname = "c"\nkey_file = "{missing}"\n') == (
        f"clients[0].key_file: cannot read {missing}: No such file or directory"
    )


def test_key_file_relative_to_parse_base_dir(tmp_path: Path) -> None:
    assert one_problem('[[clients]]\nname = "c"\nkey_file = "x.key"\n', base_dir=tmp_path) == (
        f"clients[0].key_file: cannot read {tmp_path / 'x.key'}: No such file or directory"
    )


def test_key_file_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.key").write_text("\n")
    text = '[[clients]]\nname = "c"\nkey_file = "empty.key"\n'
    assert one_problem(text, base_dir=tmp_path) == "clients[0].key_file: is empty"


def test_key_env() -> None:
    text = '[[clients]]\nname = "c"\nkey_env = "APP_KEY"\n'
    assert key_of(parse_config(text, environ={"APP_KEY": KEY}).clients[0]) == KEY
    expected = "clients[0].key_env: environment variable APP_KEY is not set"
    assert one_problem(text) == expected
    assert one_problem(text, {"APP_KEY": ""}) == expected


def test_key_sources_exclusive() -> None:
    text = f'[[clients]]\nname = "c"\nkey = "{KEY}"\nkey_env = "APP_KEY"\n'
    assert one_problem(text, {"APP_KEY": KEY}) == (
        "clients[0]: set at most one of key_file, key and key_env (got key, key_env)"
    )


def test_short_key_refused_without_showing_it(tmp_path: Path) -> None:
    short = "tiny-secret-123"  # 15 characters
    (tmp_path / "short.key").write_text(short + "\n")
    for text, env in [
        (f'[[clients]]\nname = "c"\nkey = "{short}"\n', {}),
        ('[[clients]]\nname = "c"\nkey_env = "K"\n', {"K": short}),
        ('[[clients]]\nname = "c"\nkey_file = "short.key"\n', {}),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(text, environ=env, base_dir=tmp_path)
        assert info.value.problems == ("clients[0].key: must be at least 16 characters",)
        assert short not in f"{info.value} {info.value!r}"
        # A chained ValidationError would carry the input (the key) in its own text.
        assert info.value.__cause__ is None
        assert info.value.__context__ is None


def test_key_never_in_repr_or_errors() -> None:
    config = parse_config(f'[[clients]]\nname = "c"\nkey = "{KEY}"\n', environ={})
    assert KEY not in f"{config} {config!r} {config.clients[0]!r} {config.clients[0].resolved_key!r}"
    # A file that is otherwise wrong must not echo the key in any problem either.
    for text in (
        f'[[clients]]\nname = "c"\nkey = "{KEY}"\nuids = "x"\n',
        f'[[clients]]\nname = "c"\nkey = ["{KEY}"]\n',
        f'[server]\nkey = "{KEY}"\n',
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(text, environ={})
        assert KEY not in f"{info.value} {info.value.problems!r}"


# --- vaults and resources -------------------------------------------------------------------


def test_vault_url_normalised_and_ca_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("pem")
    path = _write(
        tmp_path,
        '[vaults.a]\nurl = "https://a.vault.azure.net"\nca_file = "ca.pem"\n'
        '[vaults.b]\nurl = "https://b.vault.azure.net///"\n',
    )
    config = load_config(path, environ={})
    assert config.vaults["a"].url == "https://a.vault.azure.net/"
    assert config.vaults["b"].url == "https://b.vault.azure.net/"
    assert config.vaults["a"].ca_file == str(tmp_path / "ca.pem")
    assert one_problem('[vaults.main]\nurl = "https://v/"\nca_file = "/nonexistent/ca.pem"\n') == (
        "vaults.main.ca_file: cannot read /nonexistent/ca.pem: No such file or directory"
    )


def test_warm_resources_deduplicated() -> None:
    config = parse_config(
        '[identity]\nwarm = ["https://management.azure.com/.default", "https://vault.azure.net/.default"]\n'
        '[vaults.a]\nurl = "https://a/"\n[vaults.b]\nurl = "https://b/"\nresource = "https://vault.azure.net/.default"\n'
        '[databases.s]\nkind = "sqlserver"\nhost = "h"\ndatabase = "d"\n'
        '[databases.t]\nkind = "sqlserver"\nhost = "h"\ndatabase = "d"\n'
        '[databases.p]\nkind = "postgres"\nhost = "h"\nuser = "u"\n',
        environ={},
    )
    assert config.warm_resources() == (
        "https://vault.azure.net",
        "https://database.windows.net/",
        "https://ossrdbms-aad.database.windows.net",
        "https://management.azure.com",
    )


def test_models_built_in_code_use_process_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, "TB_TEST_KEY", KEY)
    client = ClientConfig(name="c", key_env="TB_TEST_KEY")
    assert key_of(client) == KEY


def key_of(client: ClientConfig) -> str | None:
    return None if client.resolved_key is None else client.resolved_key.get_secret_value()


def _write(directory: Path, text: str) -> Path:
    path = directory / "config.toml"
    path.write_text(text)
    return path
