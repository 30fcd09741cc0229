"""Health checks for compose and scripts (no grpc_health_probe can be installed here).

``python -m tools.healthcheck [target] [service]``: exit 0 when the api reports SERVING.
``python -m tools.healthcheck --file PATH --max-age S``: exit 0 when PATH was touched within S
seconds (the executor touches its health file whenever its watch stream delivers anything).

Over TLS when ``API_TLS_CA`` (or ``--ca``) is set, with a client certificate for mutual TLS
(``API_TLS_CLIENT_CERT`` / ``API_TLS_CLIENT_KEY``, or ``--cert`` / ``--key``); health needs no
token, so none is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.config import ConfigError
from shared.transport import ClientSecurity, client_security, open_channel


def health_security(security: ClientSecurity | None = None) -> ClientSecurity:
    """``security`` (the environment's when None) without its token: health is open to all."""
    return dataclasses.replace(client_security() if security is None else security, token="")


async def check(
    target: str, service: str = "", timeout: float = 3.0, quiet: bool = False, security: ClientSecurity | None = None
) -> bool:
    """Whether ``target`` reports SERVING, over TLS as ``security`` (the environment's when None) says."""
    async with open_channel(target, health_security(security)) as channel:
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


async def wait_serving(target: str, timeout: float = 30.0, security: ClientSecurity | None = None) -> None:
    """Waits until ``target`` is SERVING; raises TimeoutError after ``timeout`` seconds."""
    security = health_security(security)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check(target, timeout=1.0, quiet=True, security=security):
        if loop.time() > deadline:
            raise TimeoutError(f"{target} not SERVING after {timeout}s")
        await asyncio.sleep(0.1)


async def http_ok(addr: str, path: str = "/healthz") -> bool:
    """Whether an HTTP service at ``host:port`` answers ``GET path`` with 200 (the web service)."""
    host, _, port = addr.rpartition(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return False
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return b" 200 " in await reader.readline()
    except OSError:
        return False
    finally:
        writer.close()


async def wait_http(addr: str, timeout: float = 30.0) -> None:
    """Waits until ``http_ok(addr)``; raises TimeoutError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await http_ok(addr):
        if loop.time() > deadline:
            raise TimeoutError(f"http://{addr} did not answer after {timeout}s")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default=os.environ.get("API_TARGET", "127.0.0.1:50051"))
    parser.add_argument("service", nargs="?", default="")
    parser.add_argument("--file", help="check a health file's age instead of gRPC health")
    parser.add_argument("--max-age", type=float, default=30.0, help="seconds (with --file)")
    parser.add_argument("--ca", help="CA of the api's certificate: check over TLS (default: API_TLS_CA)")
    parser.add_argument("--cert", help="client certificate for mutual TLS (default: API_TLS_CLIENT_CERT)")
    parser.add_argument("--key", help="its key (default: API_TLS_CLIENT_KEY)")
    parser.add_argument("--server-name", help="name expected in the api's certificate (default: API_TLS_SERVER_NAME)")
    ns = parser.parse_args(argv)
    if ns.file:
        return 0 if file_fresh(ns.file, ns.max_age) else 1
    env = dict(os.environ)
    for flag, name in (
        ("ca", "API_TLS_CA"),
        ("cert", "API_TLS_CLIENT_CERT"),
        ("key", "API_TLS_CLIENT_KEY"),
        ("server_name", "API_TLS_SERVER_NAME"),
    ):
        if getattr(ns, flag):
            env[name] = getattr(ns, flag)
    try:
        security = client_security(env)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return 0 if asyncio.run(check(ns.target, ns.service, security=security)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
