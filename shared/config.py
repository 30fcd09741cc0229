"""Every setting of both services, read from the environment in one place.

Names are fixed so that compose, scripts and people agree: ``DATABASE_URL``, ``API_ADDR``,
``API_TARGET``, ``LOG_LEVEL``, ``LOG_FORMAT``; the rest are documented in the README.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network

from shared.logs import LOG_FORMATS


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


def _pem_file(env: Mapping[str, str], name: str) -> str:
    """The path in ``name``, checked to be a readable PEM file ("" when unset)."""
    path = env.get(name, "").strip()
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{name}: {path!r} is not a PEM file")
    return path


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {env[name]!r}")


def _log_format(env: Mapping[str, str]) -> str:
    raw = env.get("LOG_FORMAT", "").strip().lower()
    if raw == "":
        return "text"
    if raw not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT must be {' or '.join(LOG_FORMATS)}, got {env['LOG_FORMAT']!r}")
    return raw


def _metrics_addr(env: Mapping[str, str]) -> str:
    raw = env.get("METRICS_ADDR", "").strip()
    if not raw:
        return ""
    _host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"METRICS_ADDR must be host:port (e.g. 127.0.0.1:9464), got {raw!r}")
    return raw


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """Settings of the api service."""

    database_url: str
    """DATABASE_URL: the PostgreSQL the api owns. Required."""
    database_read_url: str = ""
    """DATABASE_READ_URL: a streaming standby for the reads that may lag (list pages, Get,
    history, audit, analytics); may be multi-host with ``target_session_attrs=prefer-standby``.
    Empty: every read on DATABASE_URL."""
    read_max_lag_s: float = 5.0
    """DATABASE_READ_MAX_LAG_SECONDS: past this staleness the standby's reads go to the primary.
    At least 1: the lag is measured once a second, so under steady writes it reads up to about a
    second even for a standby that keeps up."""
    addr: str = "127.0.0.1:50051"
    """API_ADDR: where the gRPC server listens."""
    log_level: str = "INFO"
    """LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""
    log_format: str = "text"
    """LOG_FORMAT: text (readable) or json (one object per line, for log shippers)."""
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
    insecure: bool = False
    """API_INSECURE: development only: no authentication, every caller may do everything (the
    api logs a warning on every start). Never the default."""
    reflection_public: bool = False
    """API_REFLECTION_PUBLIC: serve reflection without credentials (it needs a valid token of
    any role otherwise)."""
    certificate_principals: str = ""
    """API_TLS_PRINCIPALS: with mutual TLS, client certificates that stand for a principal
    without a token: ``CN=role[+role],...`` (e.g. ``executor-1=executor,ops=operator``); the
    certificate's common name is the principal's name."""
    metrics_addr: str = ""
    """METRICS_ADDR: host:port serving Prometheus metrics at /metrics; off when empty."""
    token_refresh_s: float = 2.0
    """API_TOKEN_REFRESH_SECONDS: how often the api reloads tokens (a revocation takes effect
    within this)."""
    tls_cert: str = ""
    """API_TLS_CERT: the api's certificate (PEM; a chain may follow it). With API_TLS_KEY the api
    speaks TLS only; without both, plaintext. Reloaded for new connections when the file changes
    (rotation without a restart)."""
    tls_key: str = ""
    """API_TLS_KEY: the private key of API_TLS_CERT (PEM, unencrypted)."""
    tls_client_ca: str = ""
    """API_TLS_CLIENT_CA: mutual TLS: CA certificate(s) (PEM) that must have signed every client's
    certificate; a client without one cannot connect at all. Needs API_TLS_CERT. Reloaded like it."""
    max_calls: int = 512
    """API_MAX_CALLS: calls served at once, health checks aside (services/api/budgets.py)."""
    reserved_calls: int = 128
    """API_RESERVED_CALLS: of API_MAX_CALLS, how many only ingest and the executor's calls may use."""
    principal_calls: int = 128
    """API_PRINCIPAL_CALLS: calls one principal may have in flight at once, streams included."""
    principal_streams: int = 16
    """API_PRINCIPAL_STREAMS: tails, replays and reflection streams one principal may hold open."""
    principal_memory_fraction: float = 0.25
    """API_PRINCIPAL_MEMORY_FRACTION: the share of the request memory budget one principal may hold."""
    health_watches: int = 64
    """API_HEALTH_WATCHES: Health.Watch streams open at once (Health.Check is always answered)."""
    ingest_rate: float = 2000.0
    """API_INGEST_RATE: events per second one principal may create (a burst of 2 s of it); 0 for
    no pacing. Past it a sensor's calls are slowed up to 2 s, then refused with RetryInfo."""
    cloudevents_source: str = "/automation"
    """CLOUDEVENTS_SOURCE: the ``source`` of the CloudEvents the tails send (a URI-reference, at
    most 255 characters): one per deployment, so that ``source`` + ``id`` stays unique for a
    consumer that follows several."""
    ingest_rates: str = ""
    """API_INGEST_RATES: rates of named principals, ``name=rate,...`` (0: unpaced), e.g. the web
    service's sensor, which carries every webhook."""


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """How a client reaches the api: TLS when ``ca`` is set, its own certificate for mutual TLS,
    a bearer token on every call. Every client reads it from the same variables."""

    ca: str = ""
    """API_TLS_CA: CA certificate(s) (PEM) that signed the api's certificate; when set, the client
    speaks TLS and checks the api's certificate against them."""
    cert: str = ""
    """API_TLS_CLIENT_CERT: this client's certificate (PEM) for mutual TLS; with API_TLS_CLIENT_KEY."""
    key: str = ""
    """API_TLS_CLIENT_KEY: the private key of API_TLS_CLIENT_CERT (PEM, unencrypted)."""
    token: str = field(default="", repr=False)
    """API_TOKEN: a bearer token, sent as ``authorization: Bearer <token>`` with every call."""
    server_name: str = ""
    """API_TLS_SERVER_NAME: the name checked in the api's certificate instead of the target's host
    (when connecting by an address the certificate does not name)."""

    @property
    def tls(self) -> bool:
        return bool(self.ca)


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """Settings of the executor service."""

    target: str = "127.0.0.1:50051"
    """API_TARGET: the api to connect to."""
    log_level: str = "INFO"
    """LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""
    log_format: str = "text"
    """LOG_FORMAT: text (readable) or json (one object per line, for log shippers)."""
    executor_id: str = ""
    """EXECUTOR_ID: this executor's name among executors (default: host-pid-random)."""
    max_in_flight: int = 32
    """EXECUTOR_MAX_IN_FLIGHT: enforcements held and decided at once."""
    rpc_timeout_s: float = 10.0
    """RPC_TIMEOUT_SECONDS: deadline of each unary call."""
    keepalive_s: float = 30.0
    """EXECUTOR_KEEPALIVE_SECONDS: how often the executor pings the api over HTTP/2 (and how long,
    at most 10 s, it waits for the answer): a path that went silent without closing (a
    blackhole, a lost host) ends the watch stream and the executor reconnects. Below 10 s only
    while the api sends heartbeats more often than that (HEARTBEAT_SECONDS), or the api answers
    frequent pings with GOAWAY."""
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
    metrics_addr: str = ""
    """METRICS_ADDR: host:port serving Prometheus metrics at /metrics; off when empty."""
    security: ClientSecurity = field(default_factory=ClientSecurity)
    """API_TLS_CA, API_TLS_CLIENT_CERT, API_TLS_CLIENT_KEY, API_TOKEN, API_TLS_SERVER_NAME: how it
    reaches the api (see ClientSecurity)."""


@dataclass(frozen=True, slots=True)
class WebConfig:
    """Settings of the web service (webhooks and the console)."""

    addr: str = "127.0.0.1:8080"
    """WEB_ADDR: host:port the web service listens on."""
    target: str = "127.0.0.1:50051"
    """API_TARGET: the api to hand deliveries to."""
    log_level: str = "INFO"
    """LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""
    log_format: str = "text"
    """LOG_FORMAT: text (readable) or json (one object per line, for log shippers)."""
    rpc_timeout_s: float = 10.0
    """RPC_TIMEOUT_SECONDS: how long a delivery may wait for the api before it is answered 503."""
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    """WEB_TRUSTED_PROXIES: addresses or CIDRs of the proxies in front of the service. A client's
    address is the peer's, unless the peer is one of these: then the right-most address of
    X-Forwarded-For that is not one of these (every entry left of it is the client's own word).
    Empty: X-Forwarded-For is never read. (WEB_TRUST_PROXY=true without it is a configuration
    error: it trusted any peer's header.)"""
    read_deadline_s: float = 10.0
    """WEB_READ_DEADLINE_SECONDS: a request's headers must arrive within this of the connection
    (or of the previous answer on it), and a webhook body or form within this of its headers;
    past it the connection is closed (headers) or answered 408 (body)."""
    body_budget_bytes: int = 32 * 1024 * 1024
    """WEB_BODY_BUDGET_BYTES: webhook bodies held at once, in all (each claims its declared
    length, or the 256 KiB limit when it declares none); a delivery past it is answered 503
    with Retry-After before its body is read."""
    known_key_s: float = 10.0
    """WEB_KNOWN_KEY_SECONDS: how long the service remembers that a webhook key names an
    enabled webhook, so that only an unseen key costs a call before its body is read."""
    signin_burst: int = 5
    """WEB_SIGNIN_BURST: failed sign-ins one client address may make in a row."""
    signin_refill_s: float = 12.0
    """WEB_SIGNIN_REFILL_SECONDS: one more failed sign-in is allowed after this long (5 a
    minute by default); past the burst, sign-ins are 429 with Retry-After."""
    security: ClientSecurity = field(default_factory=ClientSecurity)
    """API_TLS_CA, API_TOKEN or API_TOKEN_FILE, ...: how it reaches the api, as the executor
    does; its token needs the sensor role."""


def parse_networks(name: str, text: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """Comma-separated addresses or CIDRs (an address is its own /32 or /128)."""
    out: list[IPv4Network | IPv6Network] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            out.append(ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an address or CIDR") from None
    return tuple(out)


def _trusted_proxies(env: Mapping[str, str]) -> tuple[IPv4Network | IPv6Network, ...]:
    proxies = parse_networks("WEB_TRUSTED_PROXIES", env.get("WEB_TRUSTED_PROXIES", ""))
    if not proxies and _bool(env, "WEB_TRUST_PROXY", False):
        # The old switch believed X-Forwarded-For from any peer: it is not carried over silently.
        raise ConfigError(
            "WEB_TRUST_PROXY is replaced by WEB_TRUSTED_PROXIES: the addresses or CIDRs of your "
            "proxies (e.g. WEB_TRUSTED_PROXIES=10.0.0.5,127.0.0.1)"
        )
    return proxies


_ROLES = ("sensor", "executor", "viewer", "operator", "reveal")


def parse_principals(text: str) -> dict[str, tuple[str, ...]]:
    """``CN=role[+role],...`` as {common name: roles}; ConfigError when malformed."""
    out: dict[str, tuple[str, ...]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, roles = item.partition("=")
        wanted = tuple(r.strip() for r in roles.split("+") if r.strip())
        if not sep or not name.strip() or not wanted or any(r not in _ROLES for r in wanted):
            raise ConfigError(
                f"API_TLS_PRINCIPALS: {item!r} must look like COMMON_NAME=role[+role], roles from {', '.join(_ROLES)}"
            )
        out[name.strip()] = wanted
    return out


def parse_ingest_rates(text: str) -> dict[str, float]:
    """``name=rate,...`` (API_INGEST_RATES) as a mapping; ConfigError when malformed."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, rate = item.rpartition("=")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or not value >= 0 or value == float("inf"):
            raise ConfigError(f"API_INGEST_RATES: {item!r} is not name=rate (events per second, 0 for unpaced)")
        out[name.strip()] = value
    return out


def _ingest_rates(text: str) -> str:
    parse_ingest_rates(text)  # refuse a malformed mapping at start
    return text


def _principals(text: str) -> str:
    parse_principals(text)  # refuse a malformed mapping at start, not at the first call
    return text


def client_security(env: Mapping[str, str] | None = None) -> ClientSecurity:
    """Reads how a client reaches the api from the environment (``os.environ`` by default);
    ConfigError when the variables do not fit together or a file cannot be read."""
    env = os.environ if env is None else env
    ca = _pem_file(env, "API_TLS_CA")
    cert = _pem_file(env, "API_TLS_CLIENT_CERT")
    key = _pem_file(env, "API_TLS_CLIENT_KEY")
    server_name = env.get("API_TLS_SERVER_NAME", "").strip()
    token = env.get("API_TOKEN", "").strip()
    if not token and (token_file := env.get("API_TOKEN_FILE", "").strip()):
        # A secret mounted as a file (compose's tokens volume, a Kubernetes secret) stays out
        # of the environment, which other processes and logs can see.
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"API_TOKEN_FILE: cannot read {token_file!r}: {exc.strerror}") from None
    if bool(cert) != bool(key):
        raise ConfigError("API_TLS_CLIENT_CERT and API_TLS_CLIENT_KEY go together: set both or neither")
    if cert and not ca:
        raise ConfigError("API_TLS_CLIENT_CERT needs API_TLS_CA: a client certificate is only sent over TLS")
    if server_name and not ca:
        raise ConfigError("API_TLS_SERVER_NAME needs API_TLS_CA: it names the api's certificate, checked over TLS")
    if token and not all("!" <= ch <= "~" for ch in token):
        raise ConfigError("API_TOKEN must be printable ASCII without spaces")
    return ClientSecurity(ca=ca, cert=cert, key=key, token=token, server_name=server_name)


def _uri_reference(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    # RFC 3986's characters only: no space, no control, nothing that needs percent-encoding.
    if not 0 < len(raw) <= 255 or not re.fullmatch(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+", raw):
        raise ConfigError(f"{name} must be a URI-reference of 1 to 255 characters (e.g. /automation/prod), got {raw!r}")
    return raw


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
    tls_cert, tls_key = _pem_file(env, "API_TLS_CERT"), _pem_file(env, "API_TLS_KEY")
    tls_client_ca = _pem_file(env, "API_TLS_CLIENT_CA")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("API_TLS_CERT and API_TLS_KEY go together: set both (TLS) or neither (plaintext)")
    if tls_client_ca and not tls_cert:
        raise ConfigError("API_TLS_CLIENT_CA needs API_TLS_CERT and API_TLS_KEY: mutual TLS is TLS first")
    return ApiConfig(
        database_url=url,
        database_read_url=env.get("DATABASE_READ_URL", ""),
        read_max_lag_s=_float(env, "DATABASE_READ_MAX_LAG_SECONDS", 5.0, minimum=1.0),
        addr=env.get("API_ADDR", "127.0.0.1:50051"),
        log_level=env.get("LOG_LEVEL", "INFO").upper(),
        log_format=_log_format(env),
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
        max_calls=_int(env, "API_MAX_CALLS", 512),
        reserved_calls=_int(env, "API_RESERVED_CALLS", 128, minimum=0),
        principal_calls=_int(env, "API_PRINCIPAL_CALLS", 128),
        principal_streams=_int(env, "API_PRINCIPAL_STREAMS", 16),
        principal_memory_fraction=_float(env, "API_PRINCIPAL_MEMORY_FRACTION", 0.25, minimum=0.01),
        health_watches=_int(env, "API_HEALTH_WATCHES", 64),
        ingest_rate=_float(env, "API_INGEST_RATE", 2000.0, minimum=0.0),
        ingest_rates=_ingest_rates(env.get("API_INGEST_RATES", "")),
        cloudevents_source=_uri_reference(env, "CLOUDEVENTS_SOURCE", "/automation"),
        insecure=_bool(env, "API_INSECURE", False),
        reflection_public=_bool(env, "API_REFLECTION_PUBLIC", False),
        certificate_principals=_principals(env.get("API_TLS_PRINCIPALS", "")),
        token_refresh_s=_float(env, "API_TOKEN_REFRESH_SECONDS", 2.0, minimum=0.1),
        metrics_addr=_metrics_addr(env),
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
    )


def executor_config(env: Mapping[str, str] | None = None) -> ExecutorConfig:
    """Reads the executor's settings from the environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    return ExecutorConfig(
        target=env.get("API_TARGET", "127.0.0.1:50051"),
        log_level=env.get("LOG_LEVEL", "INFO").upper(),
        log_format=_log_format(env),
        executor_id=env.get("EXECUTOR_ID", ""),
        max_in_flight=_int(env, "EXECUTOR_MAX_IN_FLIGHT", 32),
        rpc_timeout_s=_float(env, "RPC_TIMEOUT_SECONDS", 10.0, minimum=0.01),
        keepalive_s=_float(env, "EXECUTOR_KEEPALIVE_SECONDS", 30.0, minimum=1.0),
        backoff_initial_s=_float(env, "RECONNECT_BACKOFF_INITIAL_SECONDS", 0.1, minimum=0.001),
        backoff_max_s=_float(env, "RECONNECT_BACKOFF_MAX_SECONDS", 5.0, minimum=0.001),
        rule_cache_s=_float(env, "RULE_CACHE_SECONDS", 1.0),
        grace_s=_float(env, "SHUTDOWN_GRACE_SECONDS", 10.0),
        health_file=env.get("EXECUTOR_HEALTH_FILE", ""),
        metrics_addr=_metrics_addr(env),
        security=client_security(env),
    )


def web_config(env: Mapping[str, str] | None = None) -> WebConfig:
    """Reads the web service's settings from the environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    return WebConfig(
        addr=env.get("WEB_ADDR", "127.0.0.1:8080"),
        target=env.get("API_TARGET", "127.0.0.1:50051"),
        log_level=env.get("LOG_LEVEL", "INFO").upper(),
        log_format=_log_format(env),
        rpc_timeout_s=_float(env, "RPC_TIMEOUT_SECONDS", 10.0, minimum=0.01),
        trusted_proxies=_trusted_proxies(env),
        read_deadline_s=_float(env, "WEB_READ_DEADLINE_SECONDS", 10.0, minimum=0.1),
        body_budget_bytes=_int(env, "WEB_BODY_BUDGET_BYTES", 32 * 1024 * 1024, minimum=256 * 1024 + 1),
        known_key_s=_float(env, "WEB_KNOWN_KEY_SECONDS", 10.0),
        signin_burst=_int(env, "WEB_SIGNIN_BURST", 5),
        signin_refill_s=_float(env, "WEB_SIGNIN_REFILL_SECONDS", 12.0, minimum=0.001),
        security=client_security(env),
    )
