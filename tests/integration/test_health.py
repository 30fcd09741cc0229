"""gRPC health (grpc.health.v1) of the api: SERVING only on a fully migrated database."""

from __future__ import annotations

import dataclasses

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.api import migrate
from services.api.server import CHORES_APPLICATION, SERVICE_NAMES, ApiServer
from shared.config import ApiConfig
from tests.conftest import Stubs
from tests.helpers import eventually
from tests.integration.health_support import NOT_SERVING, SERVING, check


@pytest.mark.parametrize("service", ["", "automation.v1.EventService"])
async def test_health_is_serving_on_a_migrated_database(stubs: Stubs, service: str) -> None:
    assert await check(stubs.channel, service) == SERVING


async def test_every_automation_service_reports_serving(stubs: Stubs) -> None:
    assert len(SERVICE_NAMES) == 10
    for service in SERVICE_NAMES:
        assert await check(stubs.channel, service) == SERVING, service


async def test_health_of_an_unknown_service_is_not_found(stubs: Stubs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(stubs.channel, "automation.v1.NoSuchService")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_is_not_serving_while_migrations_are_pending_then_serving(
    api_config: ApiConfig, empty_db_url: str
) -> None:
    server = ApiServer(dataclasses.replace(api_config, database_url=empty_db_url, migrate_on_start=False))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await check(channel, "") == NOT_SERVING
            assert await check(channel, "automation.v1.EnforcementService") == NOT_SERVING

            await migrate.migrate_url(empty_db_url)

            async def serving() -> bool:
                return await check(channel, "") == SERVING

            await eventually(serving, what="SERVING once the migrations are applied")
            assert await check(channel, "automation.v1.EnforcementService") == SERVING
    finally:
        await server.stop()


async def test_background_loops_keep_off_the_connections_that_serve_calls(api: ApiServer, db_url: str) -> None:
    """Health checks and maintenance run on a connection of their own: borrowing one of the
    serving pool's sent calls to connections that had not planned their statements yet (on
    TimescaleDB, 20-30 ms a plan: the list pages' p99 outliers)."""
    conn = await asyncpg.connect(db_url)
    try:

        async def backends() -> list[asyncpg.Record]:
            return await conn.fetch(
                "SELECT application_name, query FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE 'automation-api%'"
            )

        async def chores_ran() -> bool:
            return any(
                r["application_name"] == CHORES_APPLICATION and "enforcement_dispatch" in r["query"]
                for r in await backends()
            )

        # The maintenance loop (every lease_s / 3) and the health loop (every 2 s) both run.
        await eventually(chores_ran, what="maintenance on the chores connection")
        for _ in range(3):
            await api._check_health()
            serving = [r["query"] for r in await backends() if r["application_name"] == "automation-api"]
            assert serving, "the serving pool keeps its connections"
            assert not [q for q in serving if "schema_migrations" in q or "enforcement_dispatch" in q], serving
    finally:
        await conn.close()


async def test_health_watch_streams_through_a_real_channel_with_metrics_on(api_config: ApiConfig) -> None:
    """Health.Watch writes with ``context.write`` instead of yielding: the metrics interceptor
    once iterated it as a generator and answered UNKNOWN."""
    server = ApiServer(dataclasses.replace(api_config, metrics_addr="127.0.0.1:0"))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            watch = channel.unary_stream(
                "/grpc.health.v1.Health/Watch",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            call = watch(health_pb2.HealthCheckRequest(service=""))
            first = await call.read()
            assert isinstance(first, health_pb2.HealthCheckResponse)
            assert first.status == SERVING
            await server.stop()  # graceful shutdown turns every service NOT_SERVING, and Watch says so
            second = await call.read()
            assert isinstance(second, health_pb2.HealthCheckResponse)
            assert second.status == NOT_SERVING
    finally:
        await server.stop()
