"""``python -m tools.healthcheck [target] [service]``: exit 0 when the api reports SERVING.

A tiny gRPC health client for compose health checks (no grpc_health_probe can be installed
here) and for scripts that wait for the api.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def check(target: str, service: str = "", timeout: float = 3.0, quiet: bool = False) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            response: health_pb2.HealthCheckResponse = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            if not quiet:
                print(f"{target}: {exc.code().name} {exc.details()}", file=sys.stderr)
            return False
    serving: bool = response.status == health_pb2.HealthCheckResponse.SERVING
    if not serving and not quiet:
        print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}", file=sys.stderr)
    return serving


async def wait_serving(target: str, timeout: float = 30.0) -> None:
    """Waits until ``target`` is SERVING; raises TimeoutError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check(target, timeout=1.0, quiet=True):
        if loop.time() > deadline:
            raise TimeoutError(f"{target} not SERVING after {timeout}s")
        await asyncio.sleep(0.1)


def main() -> int:
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("API_TARGET", "127.0.0.1:50051")
    service = sys.argv[2] if len(sys.argv) > 2 else ""
    return 0 if asyncio.run(check(target, service)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
