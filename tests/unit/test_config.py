"""Settings from environment variables (no database)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ApiConfig, ClientSecurity, ConfigError, ExecutorConfig, api_config, executor_config
from tools import certs

URL = "postgresql://app@db:5432/automation"


def test_api_defaults_with_only_database_url() -> None:
    assert api_config({"DATABASE_URL": URL}) == ApiConfig(database_url=URL)
    cfg = api_config({"DATABASE_URL": URL})
    assert cfg.addr == "127.0.0.1:50051"
    assert cfg.pool_min == 2 and cfg.pool_max == 16
    assert cfg.max_attempts == 5 and cfg.lease_s == 15.0
    assert cfg.migrate_on_start is False
    assert cfg.request_retention_h == 48.0


def test_a_read_url_and_its_lag_bound_are_read_and_optional() -> None:
    assert api_config({"DATABASE_URL": URL}).database_read_url == ""
    standby = "postgresql://app@db2:5432,db1:5432/automation?target_session_attrs=prefer-standby"
    cfg = api_config({"DATABASE_URL": URL, "DATABASE_READ_URL": standby, "DATABASE_READ_MAX_LAG_SECONDS": "2.5"})
    assert cfg.database_read_url == standby and cfg.read_max_lag_s == 2.5
    assert api_config({"DATABASE_URL": URL}).read_max_lag_s == 5.0
    # Below the probe's one-second period a standby that keeps up would be judged behind.
    with pytest.raises(ConfigError, match="DATABASE_READ_MAX_LAG_SECONDS"):
        api_config({"DATABASE_URL": URL, "DATABASE_READ_MAX_LAG_SECONDS": "0.5"})


@pytest.mark.parametrize("env", [{}, {"DATABASE_URL": ""}])
def test_database_url_is_required(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL is required"):
        api_config(env)


def test_api_values_are_read() -> None:
    cfg = api_config(
        {
            "DATABASE_URL": URL,
            "API_ADDR": "0.0.0.0:6000",
            "LOG_LEVEL": "debug",
            "MIGRATE_ON_START": "yes",
            "DB_POOL_MIN": "0",
            "DB_POOL_MAX": "4",
            "DB_STATEMENT_TIMEOUT": "2.5",
            "LEASE_SECONDS": "3",
            "MAX_ATTEMPTS": "9",
            "DISPATCH_POLL_SECONDS": "0.5",
            "HEARTBEAT_SECONDS": "1",
            "SHUTDOWN_GRACE_SECONDS": "0",
            "REQUEST_ID_RETENTION_HOURS": "24",
        }
    )
    assert cfg == ApiConfig(
        database_url=URL,
        addr="0.0.0.0:6000",
        log_level="DEBUG",
        migrate_on_start=True,
        pool_min=0,
        pool_max=4,
        statement_timeout_s=2.5,
        lease_s=3.0,
        max_attempts=9,
        poll_s=0.5,
        heartbeat_s=1.0,
        grace_s=0.0,
        request_retention_h=24.0,
    )


def test_empty_values_mean_default() -> None:
    cfg = api_config({"DATABASE_URL": URL, "DB_POOL_MAX": "", "MIGRATE_ON_START": "  "})
    assert cfg.pool_max == 16 and cfg.migrate_on_start is False


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DB_POOL_MAX", "many", "DB_POOL_MAX must be a number"),
        ("DB_POOL_MAX", "0", "DB_POOL_MAX must be at least 1"),
        ("DB_POOL_MAX", "2.5", "DB_POOL_MAX must be a whole number"),
        ("DB_POOL_MIN", "-1", "DB_POOL_MIN must be at least 0"),
        ("MAX_ATTEMPTS", "0", "MAX_ATTEMPTS must be at least 1"),
        ("LEASE_SECONDS", "0", "LEASE_SECONDS must be at least 0.1"),
        ("LEASE_SECONDS", "soon", "LEASE_SECONDS must be a number"),
        ("DB_STATEMENT_TIMEOUT", "0.01", "DB_STATEMENT_TIMEOUT must be at least 0.1"),
        ("REQUEST_ID_RETENTION_HOURS", "1", "REQUEST_ID_RETENTION_HOURS must be at least 24"),
        ("MIGRATE_ON_START", "maybe", "MIGRATE_ON_START must be true or false"),
        ("SHUTDOWN_GRACE_SECONDS", "-1", "SHUTDOWN_GRACE_SECONDS must be at least 0"),
        ("CLOUDEVENTS_SOURCE", "/a b", "CLOUDEVENTS_SOURCE must be a URI-reference"),
        ("CLOUDEVENTS_SOURCE", "/" + "x" * 255, "CLOUDEVENTS_SOURCE must be a URI-reference"),
    ],
)
def test_bad_api_value_names_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        api_config({"DATABASE_URL": URL, name: value})
    assert str(info.value).startswith(message)
    assert repr(value) in str(info.value)


def test_cloudevents_source_is_read_and_defaults_to_the_project() -> None:
    assert api_config({"DATABASE_URL": URL}).cloudevents_source == "/automation"
    assert api_config({"DATABASE_URL": URL, "CLOUDEVENTS_SOURCE": ""}).cloudevents_source == "/automation"
    given = "https://automation.example.com/prod"
    assert api_config({"DATABASE_URL": URL, "CLOUDEVENTS_SOURCE": given}).cloudevents_source == given


def test_pool_min_above_max_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"DB_POOL_MIN \(5\) exceeds DB_POOL_MAX \(3\)"):
        api_config({"DATABASE_URL": URL, "DB_POOL_MIN": "5", "DB_POOL_MAX": "3"})


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("TRUE", True), ("on", True), ("0", False), ("Off", False)])
def test_boolean_spellings(raw: str, expected: bool) -> None:
    assert api_config({"DATABASE_URL": URL, "MIGRATE_ON_START": raw}).migrate_on_start is expected


def test_executor_defaults_need_no_variables() -> None:
    assert executor_config({}) == ExecutorConfig()
    assert executor_config({}).target == "127.0.0.1:50051"


def test_executor_values_are_read() -> None:
    cfg = executor_config(
        {
            "API_TARGET": "api:50051",
            "LOG_LEVEL": "warning",
            "EXECUTOR_ID": "ex-1",
            "EXECUTOR_MAX_IN_FLIGHT": "8",
            "RPC_TIMEOUT_SECONDS": "2",
            "RECONNECT_BACKOFF_INITIAL_SECONDS": "0.05",
            "RECONNECT_BACKOFF_MAX_SECONDS": "1",
            "RULE_CACHE_SECONDS": "0",
            "SHUTDOWN_GRACE_SECONDS": "3",
        }
    )
    assert cfg == ExecutorConfig(
        target="api:50051",
        log_level="WARNING",
        executor_id="ex-1",
        max_in_flight=8,
        rpc_timeout_s=2.0,
        backoff_initial_s=0.05,
        backoff_max_s=1.0,
        rule_cache_s=0.0,
        grace_s=3.0,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [("EXECUTOR_MAX_IN_FLIGHT", "0"), ("EXECUTOR_MAX_IN_FLIGHT", "1.5"), ("RPC_TIMEOUT_SECONDS", "x")],
)
def test_bad_executor_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        executor_config({name: value})
    assert str(info.value).startswith(name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.ensure(directory, ("localhost",), ("executor",))
    return directory


def test_api_tls_files_are_read(pki: Path) -> None:
    cfg = api_config(
        {
            "DATABASE_URL": URL,
            "API_TLS_CERT": str(pki / "api.pem"),
            "API_TLS_KEY": str(pki / "api-key.pem"),
            "API_TLS_CLIENT_CA": str(pki / "ca.pem"),
        }
    )
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) == (
        str(pki / "api.pem"),
        str(pki / "api-key.pem"),
        str(pki / "ca.pem"),
    )
    assert api_config({"DATABASE_URL": URL}).tls_cert == ""  # plaintext by default


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (("API_TLS_CERT",), "API_TLS_CERT and API_TLS_KEY go together"),
        (("API_TLS_KEY",), "API_TLS_CERT and API_TLS_KEY go together"),
        (("API_TLS_CLIENT_CA",), "API_TLS_CLIENT_CA needs API_TLS_CERT and API_TLS_KEY"),
    ],
)
def test_api_tls_settings_that_do_not_fit_together_are_refused(pki: Path, names: tuple[str, ...], message: str) -> None:
    files = {"API_TLS_CERT": "api.pem", "API_TLS_KEY": "api-key.pem", "API_TLS_CLIENT_CA": "ca.pem"}
    with pytest.raises(ConfigError, match=message):
        api_config({"DATABASE_URL": URL, **{n: str(pki / files[n]) for n in names}})


def test_an_unreadable_api_tls_file_is_named(pki: Path) -> None:
    with pytest.raises(ConfigError, match=r"API_TLS_KEY: cannot read '/nonexistent/key\.pem'"):
        api_config({"DATABASE_URL": URL, "API_TLS_CERT": str(pki / "api.pem"), "API_TLS_KEY": "/nonexistent/key.pem"})
    with pytest.raises(ConfigError, match=r"API_TLS_CERT: '/dev/null' is not a PEM file"):
        api_config({"DATABASE_URL": URL, "API_TLS_CERT": "/dev/null", "API_TLS_KEY": str(pki / "api-key.pem")})


def test_executor_reads_how_it_reaches_the_api(pki: Path) -> None:
    cfg = executor_config({"API_TLS_CA": str(pki / "ca.pem"), "API_TOKEN": "atk_x"})
    assert cfg.security == ClientSecurity(ca=str(pki / "ca.pem"), token="atk_x")
    with pytest.raises(ConfigError, match="API_TLS_CLIENT_CERT and API_TLS_CLIENT_KEY go together"):
        executor_config({"API_TLS_CA": str(pki / "ca.pem"), "API_TLS_CLIENT_CERT": str(pki / "client-executor.pem")})
