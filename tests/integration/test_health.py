"""gRPC health (grpc.health.v1) of the api: SERVING only on a fully migrated database."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.api import migrate
from services.api.server import SERVICE_NAMES, ApiServer
from shared.config import ApiConfig
from tests.conftest import Stubs
from tests.helpers import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(channel: grpc.aio.Channel, service: str) -> int:
    call = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = await call(health_pb2.HealthCheckRequest(service=service))
    assert isinstance(response, health_pb2.HealthCheckResponse)
    return int(response.status)


@pytest.mark.parametrize("service", ["", "automation.v1.EventService"])
async def test_health_is_serving_on_a_migrated_database(stubs: Stubs, service: str) -> None:
    assert await check(stubs.channel, service) == SERVING


async def test_every_automation_service_reports_serving(stubs: Stubs) -> None:
    assert len(SERVICE_NAMES) == 9
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
