"""Small helpers the tests share: waiting on conditions, building requests, reading errors."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
import uvicorn
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2

from services.api.auth import ROLES, token_hash
from services.web import create_app
from services.web.edge import server_config
from shared.config import WebConfig
from shared.gen.automation.v1 import common_pb2, event_pb2, rule_pb2
from shared.transport import ClientSecurity, open_channel
from tools.postgres import free_port

T = TypeVar("T")

TOKENS = {role: f"atk_test-{role}-{secrets.token_urlsafe(24)}" for role in ROLES}
"""One token per role, stored in every test database (tests/conftest.py): the in-process api
and the real processes of the e2e tests authenticate callers as they would in production."""
OPERATOR = TOKENS["operator"]


def channel(target: str, token: str | None = OPERATOR) -> grpc.aio.Channel:
    """A plaintext channel to a test api whose calls carry ``token`` (operator by default)."""
    return open_channel(target, ClientSecurity(token=token or ""))


async def store_test_tokens(conn: asyncpg.Connection) -> None:
    """Stores TOKENS (hashes only) in a test database."""
    for role, token in TOKENS.items():
        await conn.execute(
            "INSERT INTO api_token (name, roles, token_hash) VALUES ($1, $2, $3)",
            f"test-{role}",
            [role],
            token_hash(token),
        )


def holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A plain condition on in-process state, as ``eventually`` polls it."""

    async def polled() -> bool:
        return check()

    return polled


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 15.0, what: str = "condition") -> T:
    """Polls ``check`` until it returns a truthy value; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)  # poll interval of a condition wait, not a synchronisation


async def throughout(check: Callable[[], None], window_s: float) -> None:
    """Runs ``check`` (it asserts) at every poll for ``window_s`` seconds: for what must not
    happen, the window gives a wrong implementation the time to show itself; it waits for no
    state, and nothing passes by its end that did not hold all along."""
    deadline = time.monotonic() + window_s
    while True:
        check()
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)  # poll interval of an observation window, not a synchronisation


async def pace(period_s: float, stop: asyncio.Event) -> None:
    """The gap between two turns of a load or probe loop: a rate, never a wait for a state
    (``eventually`` waits on a condition). Ends early once ``stop`` is set, so that a loop that
    checks ``stop`` ends at once instead of a period later."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), period_s)


@asynccontextmanager
async def web_service(
    target: str, ch: grpc.aio.Channel, rpc_timeout_s: float = 10.0, **settings: Any
) -> AsyncIterator[str]:
    """The web service in this process (uvicorn on a free port, with production's edge settings),
    reaching the api at ``target`` through ``ch`` (whose token is the service's); ``settings``
    are other WebConfig fields; yields its base URL."""
    port = free_port()
    config = WebConfig(addr=f"127.0.0.1:{port}", target=target, rpc_timeout_s=rpc_timeout_s, **settings)
    server = uvicorn.Server(server_config(create_app(config, ch), config, timeout_graceful_shutdown=3))
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        if task.done():
            task.result()  # it died before it started: its error
        return bool(server.started)

    await eventually(started, what="the web service to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def rule(
    ref: str,
    trigger_ref: str,
    action_ref: str = "core.echo",
    *,
    params: dict[str, Any] | None = None,
    conditions: Sequence[tuple[str, int, Any]] = (),
    any_of: bool = False,
    enabled: bool = True,
) -> rule_pb2.Rule:
    """A rule message; conditions are (field, CONDITION_OPERATOR_*, value)."""
    msg = rule_pb2.Rule(
        ref=ref,
        trigger_ref=trigger_ref,
        action_ref=action_ref,
        action_params=struct(params or {}),
        condition=common_pb2.ENFORCEMENT_CONDITION_ANY if any_of else common_pb2.ENFORCEMENT_CONDITION_ALL,
        enabled=enabled,
    )
    for field, op, value in conditions:
        c = msg.conditions.add(field=field, operator=op)
        c.value.CopyFrom(struct({"v": value}).fields["v"])
    return msg


def new_event(trigger_ref: str, payload: dict[str, Any] | None = None, **kw: Any) -> event_pb2.NewEvent:
    return event_pb2.NewEvent(trigger_ref=trigger_ref, payload=struct(payload or {}), **kw)


def field_violations(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations of a failed call, as {field: description}."""
    out: dict[str, str] = {}
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.TypeName() == error_details_pb2.BadRequest.DESCRIPTOR.full_name:
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    out.update({v.field: v.description for v in bad.field_violations})
    return out


async def rpc_error(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail with ``code``; returns the error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


async def count(conn: asyncpg.Connection, table: str) -> int:
    """Rows in ``table`` (a name written in the test, never input)."""
    return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
