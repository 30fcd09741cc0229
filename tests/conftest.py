"""Fixtures: a real PostgreSQL for the whole run, a fresh database per test, a real api.

Where the database comes from, in order: ``TEST_DATABASE_URL`` (a superuser URL of a running
server, e.g. one with TimescaleDB); a testcontainers TimescaleDB when a Docker engine answers;
otherwise a throwaway server of Debian's binaries started here (``tools.postgres``).
The schema is migrated once into a template database; each test gets
``CREATE DATABASE ... TEMPLATE`` of it (fast, and fully isolated).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest

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

TIMESCALE_IMAGE = "timescale/timescaledb:2.23.0-pg17"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _docker_available() -> bool:
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        import docker

        client = docker.from_env()  # type: ignore[attr-defined, no-untyped-call]
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return False
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A superuser URL of the server the tests use."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

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
def has_timescaledb(pg_admin_url: str, template_db: str) -> bool:
    async def check() -> bool:
        name = f"automation_probe_{uuid.uuid4().hex[:8]}"
        await _admin(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        try:
            conn = await asyncpg.connect(with_database(pg_admin_url, name))
            try:
                return bool(await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"))
            finally:
                await conn.close()
        finally:
            await _admin(pg_admin_url, f'DROP DATABASE "{name}" WITH (FORCE)')

    return asyncio.run(check())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "timescale" in item.keywords:
            item.fixturenames.append("_require_timescaledb")  # type: ignore[attr-defined]


@pytest.fixture
def _require_timescaledb(has_timescaledb: bool) -> None:
    if not has_timescaledb:
        pytest.skip("the test database has no TimescaleDB extension (set TEST_DATABASE_URL to one that has it)")


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
