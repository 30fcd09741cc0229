"""gRPC health (grpc.health.v1) as the tests ask it: one Check call on a channel."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2

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
