"""Fixtures: a real PostgreSQL for the whole run, a fresh database per test, a real api.

Where the database comes from, in order: ``TEST_DATABASE_URL`` (a superuser URL of a running
server, e.g. one with TimescaleDB); a testcontainers TimescaleDB, of the image and version
docker-compose.yml pins, when a Docker engine answers; otherwise a throwaway server of Debian's
binaries started here (``tools.postgres``). ``TEST_POSTGRES=local`` takes the throwaway server
even where an engine answers; ``TEST_POSTGRES=container`` requires the container (no engine is a
failure, not a fallback: CI's container run must never quietly test something else).
The schema is migrated once into a template database; each test gets
``CREATE DATABASE ... TEMPLATE`` of it (fast, and fully isolated).

Markers: ``timescale`` needs the extension; ``timescale_licensed`` needs the Timescale-licensed
edition (compression, continuous aggregates, policies); ``timescale_apache`` the Apache-licensed
one. Each is skipped, with the reason, on a database without it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
import yaml

from services.api import migrate
from services.api.server import ApiServer
from services.api.store import Store, create_pool
from shared.config import ApiConfig
from shared.gen.automation.v1 import (
    analytics_pb2_grpc,
    enforcement_pb2_grpc,
    event_pb2_grpc,
    execution_pb2_grpc,
    history_pb2_grpc,
    rule_pb2_grpc,
)
from tests.helpers import channel, store_test_tokens
from tools.postgres import LocalPostgres

COMPOSE_FILE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def compose_image(service: str) -> str:
    """The image docker-compose.yml pins for ``service``."""
    image = yaml.safe_load(COMPOSE_FILE.read_text())["services"][service]["image"]
    assert isinstance(image, str)
    return image


# The database image of the compose cluster: the tests run on what users run.
TIMESCALE_IMAGE = compose_image("db")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _docker_available() -> bool:
    """Whether a Docker engine answers ``GET /_ping`` (on DOCKER_HOST, or the default socket).

    Asked over a socket of our own, closed on every path: docker-py's client, built where the
    socket exists but no engine answers, raises from its constructor and leaks its connection
    (a ResourceWarning that then fails whichever test the collector runs in)."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            name, _, port = host.removeprefix("tcp://").rstrip("/").rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (name, int(port))
        else:
            return False
        with sock:
            sock.settimeout(3)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = sock.recv(64)
    except (OSError, ValueError):
        return False
    return reply.startswith(b"HTTP/1.") and reply.split(b" ", 2)[1:2] == [b"200"]


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A superuser URL of the server the tests use."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
        return
    choice = os.environ.get("TEST_POSTGRES", "")
    if choice not in ("", "local", "container"):
        raise pytest.UsageError(f"TEST_POSTGRES={choice!r}: expected 'local' or 'container'")
    if choice == "container" and not _docker_available():
        raise RuntimeError("TEST_POSTGRES=container, but no Docker engine answers (DOCKER_HOST, docker.sock)")
    if choice != "local" and _docker_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer(TIMESCALE_IMAGE, driver=None) as container:
            yield container.get_connection_url()
        return
    with LocalPostgres() as pg:
        yield pg.url


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def _with_tokens(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await store_test_tokens(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """The name of a database holding the migrated schema, used as the template of each test's."""
    name = f"automation_tpl_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(pg_admin_url, f'CREATE DATABASE "{name}"'))
    asyncio.run(migrate.migrate_url(with_database(pg_admin_url, name)))
    asyncio.run(_with_tokens(with_database(pg_admin_url, name)))
    # TimescaleDB's scheduler keeps a connection to every database that has the extension,
    # which would block CREATE DATABASE ... TEMPLATE; it leaves alone databases that refuse
    # connections.
    asyncio.run(
        _admin(
            pg_admin_url,
            f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false',
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
        )
    )
    yield name
    asyncio.run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def timescaledb_license(pg_admin_url: str, template_db: str) -> str:
    """The TimescaleDB edition of the test database: ``timescale``, ``apache``, or ``""``
    without the extension."""

    async def check() -> str:
        name = f"automation_probe_{uuid.uuid4().hex[:8]}"
        await _admin(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        try:
            conn = await asyncpg.connect(with_database(pg_admin_url, name))
            try:
                if not await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"):
                    return ""
                return str(await conn.fetchval("SELECT current_setting('timescaledb.license', true)") or "")
            finally:
                await conn.close()
        finally:
            await _admin(pg_admin_url, f'DROP DATABASE "{name}" WITH (FORCE)')

    return asyncio.run(check())


@pytest.fixture(scope="session")
def has_timescaledb(timescaledb_license: str) -> bool:
    return bool(timescaledb_license)


_NEEDS = {
    "timescale": "the test database has no TimescaleDB extension (set TEST_DATABASE_URL to one that has it, "
    "or run where a Docker engine answers)",
    "timescale_licensed": "needs TimescaleDB's Timescale-licensed edition (compression, continuous aggregates, "
    "policies); the test database's edition is {edition!r}",
    "timescale_apache": "needs TimescaleDB's Apache-licensed edition; the test database's edition is {edition!r}",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(marker in item.keywords for marker in _NEEDS):
            item.fixturenames.append("_require_timescaledb")  # type: ignore[attr-defined]
    if os.environ.get("TEST_DATABASE_TESTS_ONLY", "").lower() in ("1", "true", "yes"):
        # CI's second run of the whole suite, on the other database path: only the tests whose
        # outcome depends on that database (the ones using it, directly or through a fixture);
        # the rest would run exactly as in the first run.
        using = [i for i in items if "pg_admin_url" in getattr(i, "fixturenames", ())]
        skipped = [i for i in items if "pg_admin_url" not in getattr(i, "fixturenames", ())]
        if skipped:
            config.hook.pytest_deselected(items=skipped)
            items[:] = using


@pytest.fixture
def _require_timescaledb(request: pytest.FixtureRequest, timescaledb_license: str) -> None:
    wanted = {"timescale": bool(timescaledb_license)}
    wanted["timescale_licensed"] = timescaledb_license == "timescale"
    wanted["timescale_apache"] = timescaledb_license == "apache"
    for marker, reason in _NEEDS.items():
        if request.node.get_closest_marker(marker) and not wanted[marker]:
            pytest.skip(reason.format(edition=timescaledb_license or "none"))


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    yield with_database(pg_admin_url, name)
    asyncio.run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"e_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(pg_admin_url, f'CREATE DATABASE "{name}"'))
    yield with_database(pg_admin_url, name)
    asyncio.run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection to the test database, for checks in SQL."""
    connection = await asyncpg.connect(db_url)
    yield connection
    await connection.close()


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = Store(await create_pool(db_url, 1, 8))
    yield s
    await s.close()


@pytest.fixture
def api_config(db_url: str) -> ApiConfig:
    """Settings of the in-process api: short leases and polls so that tests run fast."""
    return ApiConfig(
        database_url=db_url,
        addr="127.0.0.1:0",
        pool_min=1,
        pool_max=8,
        lease_s=2.0,
        poll_s=0.2,
        heartbeat_s=0.5,
        grace_s=2.0,
    )


@dataclass
class Stubs:
    """One stub per service over one real channel."""

    channel: grpc.aio.Channel
    target: str
    events: event_pb2_grpc.EventServiceAsyncStub
    enforcements: enforcement_pb2_grpc.EnforcementServiceAsyncStub
    rules: rule_pb2_grpc.RuleServiceAsyncStub
    executions: execution_pb2_grpc.ExecutionServiceAsyncStub
    history: history_pb2_grpc.HistoryServiceAsyncStub
    analytics: analytics_pb2_grpc.AnalyticsServiceAsyncStub


@pytest.fixture
async def api(api_config: ApiConfig) -> AsyncIterator[ApiServer]:
    """A real api server in this process, on a free port."""
    server = ApiServer(api_config)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def stubs(api: ApiServer) -> AsyncIterator[Stubs]:
    target = f"127.0.0.1:{api.port}"
    async with channel(target) as ch:
        yield stubs_for(ch, target)


def stubs_for(ch: grpc.aio.Channel, target: str) -> Stubs:
    """One stub per service over ``ch`` (a channel to the api at ``target``)."""
    return Stubs(
        channel=ch,
        target=target,
        events=event_pb2_grpc.EventServiceStub(ch),
        enforcements=enforcement_pb2_grpc.EnforcementServiceStub(ch),
        rules=rule_pb2_grpc.RuleServiceStub(ch),
        executions=execution_pb2_grpc.ExecutionServiceStub(ch),
        history=history_pb2_grpc.HistoryServiceStub(ch),
        analytics=analytics_pb2_grpc.AnalyticsServiceStub(ch),
    )


__all__ = ["Stubs", "with_database"]
