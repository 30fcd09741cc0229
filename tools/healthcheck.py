"""Health checks for compose and scripts (no grpc_health_probe can be installed here).

``python -m tools.healthcheck [target] [service]``: exit 0 when the api reports SERVING.
``python -m tools.healthcheck --file PATH --max-age S``: exit 0 when PATH was touched within S
seconds (the executor touches its health file whenever its watch stream delivers anything).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
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


def file_fresh(path: str, max_age: float) -> bool:
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError as exc:
        print(f"{path}: {exc.strerror}", file=sys.stderr)
        return False
    if age > max_age:
        print(f"{path}: last touched {age:.0f}s ago (more than {max_age:.0f}s)", file=sys.stderr)
    return age <= max_age


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default=os.environ.get("API_TARGET", "127.0.0.1:50051"))
    parser.add_argument("service", nargs="?", default="")
    parser.add_argument("--file", help="check a health file's age instead of gRPC health")
    parser.add_argument("--max-age", type=float, default=30.0, help="seconds (with --file)")
    ns = parser.parse_args()
    if ns.file:
        return 0 if file_fresh(ns.file, ns.max_age) else 1
    return 0 if asyncio.run(check(ns.target, ns.service)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
