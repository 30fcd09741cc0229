"""Every setting of both services, read from the environment in one place.

Names are fixed so that compose, scripts and people agree: ``DATABASE_URL``, ``API_ADDR``,
``API_TARGET``, ``LOG_LEVEL``; the rest are documented in the README.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


class ConfigError(ValueError):
    """An environment variable has a value that cannot be used."""


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    value = _float(env, name, default, minimum)
    if value != int(value):
        raise ConfigError(f"{name} must be a whole number, got {env[name]!r}")
    return int(value)


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {env[name]!r}")


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """Settings of the api service."""

    database_url: str
    """DATABASE_URL: the PostgreSQL the api owns. Required."""
    addr: str = "127.0.0.1:50051"
    """API_ADDR: where the gRPC server listens."""
    log_level: str = "INFO"
    """LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""
    migrate_on_start: bool = False
    """MIGRATE_ON_START: apply pending migrations before serving."""
    pool_min: int = 2
    """DB_POOL_MIN: connections kept open."""
    pool_max: int = 16
    """DB_POOL_MAX: most connections at once."""
    statement_timeout_s: float = 30.0
    """DB_STATEMENT_TIMEOUT: seconds any one statement may run."""
    lease_s: float = 15.0
    """LEASE_SECONDS: how long an executor holds an enforcement without its stream renewing."""
    max_attempts: int = 5
    """MAX_ATTEMPTS: hand-outs of one enforcement before it is reported as exhausted."""
    poll_s: float = 1.0
    """DISPATCH_POLL_SECONDS: a watch stream looks for work at least this often (NOTIFY only
    makes it sooner)."""
    heartbeat_s: float = 5.0
    """HEARTBEAT_SECONDS: how often a watch stream renews its leases and sends a heartbeat."""
    grace_s: float = 10.0
    """SHUTDOWN_GRACE_SECONDS: how long in-flight calls may finish after SIGTERM."""
    request_retention_h: float = 48.0
    """REQUEST_ID_RETENTION_HOURS: idempotency keys are kept at least this long (>= 24)."""


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """Settings of the executor service."""

    target: str = "127.0.0.1:50051"
    """API_TARGET: the api to connect to."""
    log_level: str = "INFO"
    """LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""
    executor_id: str = ""
    """EXECUTOR_ID: this executor's name among executors (default: host-pid-random)."""
    max_in_flight: int = 32
    """EXECUTOR_MAX_IN_FLIGHT: enforcements held and decided at once."""
    rpc_timeout_s: float = 10.0
    """RPC_TIMEOUT_SECONDS: deadline of each unary call."""
    backoff_initial_s: float = 0.1
    """RECONNECT_BACKOFF_INITIAL_SECONDS: first wait before reconnecting."""
    backoff_max_s: float = 5.0
    """RECONNECT_BACKOFF_MAX_SECONDS: longest wait between reconnects."""
    rule_cache_s: float = 1.0
    """RULE_CACHE_SECONDS: how long an enabled rule is trusted without asking again (the api
    re-checks at commit time, so a stale entry costs a retry, never a wrong execution)."""
    grace_s: float = 10.0
    """SHUTDOWN_GRACE_SECONDS: how long in-flight decisions may finish after SIGTERM."""
    health_file: str = ""
    """EXECUTOR_HEALTH_FILE: a file touched whenever the watch stream delivers (heartbeats
    included), for container health checks; empty for none."""


def api_config(env: Mapping[str, str] | None = None) -> ApiConfig:
    """Reads the api's settings from the environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    url = env.get("DATABASE_URL", "")
    if not url:
        raise ConfigError("DATABASE_URL is required (e.g. postgresql://user@localhost:5432/db)")
    pool_min = _int(env, "DB_POOL_MIN", 2, minimum=0)
    pool_max = _int(env, "DB_POOL_MAX", 16)
    if pool_min > pool_max:
        raise ConfigError(f"DB_POOL_MIN ({pool_min}) exceeds DB_POOL_MAX ({pool_max})")
    return ApiConfig(
        database_url=url,
        addr=env.get("API_ADDR", "127.0.0.1:50051"),
        log_level=env.get("LOG_LEVEL", "INFO").upper(),
        migrate_on_start=_bool(env, "MIGRATE_ON_START", False),
        pool_min=pool_min,
        pool_max=pool_max,
        statement_timeout_s=_float(env, "DB_STATEMENT_TIMEOUT", 30.0, minimum=0.1),
        lease_s=_float(env, "LEASE_SECONDS", 15.0, minimum=0.1),
        max_attempts=_int(env, "MAX_ATTEMPTS", 5),
        poll_s=_float(env, "DISPATCH_POLL_SECONDS", 1.0, minimum=0.01),
        heartbeat_s=_float(env, "HEARTBEAT_SECONDS", 5.0, minimum=0.05),
        grace_s=_float(env, "SHUTDOWN_GRACE_SECONDS", 10.0),
        request_retention_h=_float(env, "REQUEST_ID_RETENTION_HOURS", 48.0, minimum=24.0),
    )


def executor_config(env: Mapping[str, str] | None = None) -> ExecutorConfig:
    """Reads the executor's settings from the environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    return ExecutorConfig(
        target=env.get("API_TARGET", "127.0.0.1:50051"),
        log_level=env.get("LOG_LEVEL", "INFO").upper(),
        executor_id=env.get("EXECUTOR_ID", ""),
        max_in_flight=_int(env, "EXECUTOR_MAX_IN_FLIGHT", 32),
        rpc_timeout_s=_float(env, "RPC_TIMEOUT_SECONDS", 10.0, minimum=0.01),
        backoff_initial_s=_float(env, "RECONNECT_BACKOFF_INITIAL_SECONDS", 0.1, minimum=0.001),
        backoff_max_s=_float(env, "RECONNECT_BACKOFF_MAX_SECONDS", 5.0, minimum=0.001),
        rule_cache_s=_float(env, "RULE_CACHE_SECONDS", 1.0),
        grace_s=_float(env, "SHUTDOWN_GRACE_SECONDS", 10.0),
        health_file=env.get("EXECUTOR_HEALTH_FILE", ""),
    )
