"""The services under network faults, through the fault proxy: real PostgreSQL, real gRPC.

Between the api and PostgreSQL: a blackhole longer than the statement timeout, resets in the
middle of calls, refused connections, latency, and a database that turns read-only (what a
demoted primary answers). Between an executor and the api: a blackhole, which only HTTP/2
keepalive can see. Every call ends within its deadline with OK or UNAVAILABLE (never INTERNAL,
never a hang), health says NOT_SERVING while no writable primary answers and SERVING by itself
after, and the LISTEN connection comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api.server import ApiServer
from services.executor import Executor
from shared.config import ApiConfig, ClientSecurity, ExecutorConfig
from shared.gen.automation.v1 import enforcement_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs, stubs_for
from tests.helpers import TOKENS, channel, eventually, holds, new_event, rule
from tools.chaos.proxy import FaultProxy, Mode

TRIGGER = "net.tick"
DEADLINE_S = 20.0
"""Every call's deadline: an answer within it is what "does not hang" means here."""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def through(url: str, proxy: FaultProxy) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{proxy.port}" if user else proxy.address))


@pytest.fixture
async def db_proxy(db_url: str) -> AsyncIterator[FaultProxy]:
    parts = urlsplit(db_url)
    async with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432, seed=1) as proxy:
        yield proxy


@dataclasses.dataclass
class Proxied:
    api: ApiServer
    stubs: Stubs
    proxy: FaultProxy
    health: Any


@pytest.fixture
def statement_timeout_s() -> float:
    """Short, so that a blackhole outlasts it within a test (a test may override it)."""
    return 1.0


@pytest.fixture
async def proxied(api_config: ApiConfig, db_proxy: FaultProxy, statement_timeout_s: float) -> AsyncIterator[Proxied]:
    """An api whose every database connection goes through the proxy."""
    config = dataclasses.replace(
        api_config, database_url=through(api_config.database_url, db_proxy), statement_timeout_s=statement_timeout_s
    )
    server = ApiServer(config)
    await server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        async with channel(target) as ch:
            stubs = stubs_for(ch, target)
            await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=TRIGGER)))
            await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("net.all", TRIGGER)))
            yield Proxied(server, stubs, db_proxy, health_pb2_grpc.HealthStub(ch))
    finally:
        await db_proxy.set_mode(Mode.PASS)
        await server.stop()


async def create(p: Proxied, request_id: str) -> grpc.StatusCode:
    """One CreateEvent; its status (OK or the error's)."""
    try:
        await p.stubs.events.CreateEvent(
            event_pb2.CreateEventRequest(event=new_event(TRIGGER, {"rid": request_id}, request_id=request_id)),
            timeout=DEADLINE_S,
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def health_is(p: Proxied, status: int) -> bool:
    answer = await p.health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
    return bool(answer.status == status)


async def stored(conn: asyncpg.Connection, request_ids: list[str]) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT payload->>'rid' AS rid, count(*) AS n FROM event WHERE payload->>'rid' = ANY($1) GROUP BY 1",
        request_ids,
    )
    return {r["rid"]: int(r["n"]) for r in rows}


async def test_a_blackhole_longer_than_the_statement_timeout_fails_calls_within_their_deadline(
    proxied: Proxied, conn: asyncpg.Connection
) -> None:
    assert await create(proxied, "before") == grpc.StatusCode.OK
    listens = proxied.api.dispatcher.listen_connects
    await proxied.proxy.set_mode(Mode.BLACKHOLE)

    # The pooled connections went silent without closing: the call is answered UNAVAILABLE
    # (the client-side bound past statement_timeout), not left to the caller's deadline.
    assert await create(proxied, "during") == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: health_is(proxied, NOT_SERVING), timeout=DEADLINE_S, what="NOT_SERVING")

    await proxied.proxy.set_mode(Mode.PASS)
    # The dead connections were discarded, not pooled: new ones work, health comes back by itself.
    await eventually(lambda: health_is(proxied, SERVING), timeout=DEADLINE_S, what="SERVING again")

    async def created() -> bool:
        return await create(proxied, "after") == grpc.StatusCode.OK

    await eventually(created, timeout=DEADLINE_S, what="CreateEvent OK again")
    # The LISTEN connection saw the silence (its probe) and connected again.
    await eventually(
        holds(lambda: proxied.api.dispatcher.listen_connects > listens),
        timeout=DEADLINE_S,
        what="LISTEN reconnected",
    )
    # "during" may or may not have committed before the silence; it is never stored twice.
    counts = await stored(conn, ["before", "during", "after"])
    assert counts["before"] == 1 and counts["after"] == 1 and counts.get("during", 0) <= 1


async def test_resets_in_the_middle_of_calls_lose_nothing_and_duplicate_nothing(
    proxied: Proxied, conn: asyncpg.Connection
) -> None:
    # Latency keeps every call in flight long enough for the reset to land in the middle of it.
    await proxied.proxy.set_mode(Mode.LATENCY)
    ids = [f"r{i}" for i in range(24)]
    first = [asyncio.create_task(create(proxied, rid)) for rid in ids]
    await eventually(holds(lambda: len(proxied.proxy.delays) > 4), timeout=DEADLINE_S, what="calls in flight")
    proxied.proxy.reset()
    codes = await asyncio.gather(*first)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    await proxied.proxy.set_mode(Mode.PASS)
    # What was not acknowledged is sent again with its request id, as any client would.
    for rid, code in zip(ids, codes, strict=True):
        if code != grpc.StatusCode.OK:

            async def acked(rid: str = rid) -> bool:
                code = await create(proxied, rid)
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), code
                return code == grpc.StatusCode.OK

            await eventually(acked, timeout=DEADLINE_S, what=f"{rid} acknowledged")
    assert await stored(conn, ids) == dict.fromkeys(ids, 1)


# A statement waiting on a lock that a slow transaction holds outlasts a 1 s timeout by design.
@pytest.mark.parametrize("statement_timeout_s", [10.0])
async def test_latency_slows_calls_but_they_succeed(proxied: Proxied) -> None:
    await proxied.proxy.set_mode(Mode.LATENCY)
    codes = await asyncio.gather(*(create(proxied, f"slow{i}") for i in range(8)))
    assert codes == [grpc.StatusCode.OK] * 8
    assert await health_is(proxied, SERVING)


async def test_refused_connections_mean_not_serving_then_serving_by_itself(proxied: Proxied) -> None:
    await proxied.proxy.set_mode(Mode.REFUSE)
    proxied.proxy.reset()  # the database "restarted" and nobody gets back in
    assert await create(proxied, "refused") == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: health_is(proxied, NOT_SERVING), timeout=DEADLINE_S, what="NOT_SERVING")
    await proxied.proxy.set_mode(Mode.PASS)
    await eventually(lambda: health_is(proxied, SERVING), timeout=DEADLINE_S, what="SERVING again")
    assert await create(proxied, "back") == grpc.StatusCode.OK


async def test_a_read_only_database_is_unavailable_and_the_pool_reconnects_when_it_is_writable(
    proxied: Proxied, conn: asyncpg.Connection, db_url: str
) -> None:
    name = urlsplit(db_url).path.lstrip("/")
    assert await create(proxied, "rw") == grpc.StatusCode.OK
    # What a client sees of a failover onto a node that takes no writes: its connections drop,
    # and the new ones are read-only (SQLSTATE 25006 on every write).
    await conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name
    )

    async def refused() -> bool:
        code = await create(proxied, "ro")
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), code
        return code == grpc.StatusCode.UNAVAILABLE

    await eventually(refused, timeout=DEADLINE_S, what="a write refused as UNAVAILABLE")
    await eventually(lambda: health_is(proxied, NOT_SERVING), timeout=DEADLINE_S, what="NOT_SERVING")
    # Reads still work on a read-only node.
    rw_id = await conn.fetchval("SELECT id FROM event WHERE payload->>'rid' = 'rw'")
    got = await proxied.stubs.events.GetEvent(event_pb2.GetEventRequest(id=rw_id), timeout=DEADLINE_S)
    assert got.id == rw_id

    # The primary is writable again, but the open sessions are still read-only: the read-only
    # answer must make the api replace them rather than fail forever.
    await conn.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    await eventually(lambda: health_is(proxied, SERVING), timeout=DEADLINE_S, what="SERVING again")

    async def written() -> bool:
        code = await create(proxied, "rw2")
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), code
        return code == grpc.StatusCode.OK

    await eventually(written, timeout=DEADLINE_S, what="writes accepted again")
    assert (await stored(conn, ["ro", "rw2"])).get("rw2") == 1


@contextlib.asynccontextmanager
async def running_executor(target: str) -> AsyncIterator[Executor]:
    config = ExecutorConfig(
        target=target,
        executor_id="exec-net",
        rpc_timeout_s=5.0,
        keepalive_s=1.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        security=ClientSecurity(token=TOKENS["executor"]),
    )
    ex = Executor(config)
    task = asyncio.create_task(ex.run())
    try:
        yield ex
    finally:
        ex.stop()
        await asyncio.wait_for(task, 15)


async def test_executor_keepalive_sees_a_blackhole_to_the_api_and_reconnects(api: ApiServer, stubs: Stubs) -> None:
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=TRIGGER)))
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("net.all", TRIGGER)))

    async def resolved(event_id: int) -> bool:
        answer = await stubs.enforcements.ListEnforcements(
            enforcement_pb2.ListEnforcementsRequest(event=event_id), timeout=DEADLINE_S
        )
        return bool(answer.enforcements) and all(e.resolved_at.seconds for e in answer.enforcements)

    async with (
        FaultProxy("127.0.0.1", api.port, seed=2) as proxy,
        running_executor(proxy.address),
    ):
        first = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(TRIGGER)))
        await eventually(lambda: resolved(first.event.id), what="resolved through the proxy")
        await proxy.set_mode(Mode.BLACKHOLE)
        # The executor's connection is dead for good: it resolves anything again only once its
        # keepalive saw no answer to a ping, it gave the connection up and opened a new one.
        await eventually(
            holds(lambda: not any(s.executor_id == "exec-net" for s in api.dispatcher.subscriptions())),
            timeout=DEADLINE_S,
            what="the api's own keepalive ending the silent stream",
        )
        await proxy.set_mode(Mode.PASS)
        second = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(TRIGGER)))
        await eventually(lambda: resolved(second.event.id), timeout=DEADLINE_S, what="resolved after the blackhole")
