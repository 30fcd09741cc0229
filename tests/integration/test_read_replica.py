"""Reads that may lag, on a real streaming standby (DATABASE_READ_URL).

The primary and its standby are PostgreSQL servers of these tests' own (``tools.postgres``:
``pg_basebackup -R``, streaming replication), whatever TEST_POSTGRES says: a standby needs a
server whose replication we control. What the standby served is proved by what only it can
answer (a row it has not replayed yet is missing from its list pages) and by the api's count of
reads per server (``Reads.served``, the ``automation_db_reads_total`` metric's values).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.api import migrate
from services.api.server import ApiServer
from shared.config import ApiConfig
from shared.gen.automation.v1 import (
    analytics_pb2,
    common_pb2,
    enforcement_pb2,
    event_pb2,
    execution_pb2,
    rule_pb2,
)
from tests.conftest import Stubs, stubs_for
from tests.helpers import channel, eventually, holds, new_event, rule, store_test_tokens, struct
from tests.integration.health_support import check
from tools.postgres import LocalPostgres, free_port

DB = "automation"


def _url(pg: LocalPostgres) -> str:
    return pg.url.rsplit("/", 1)[0] + f"/{DB}"


async def _prepare(url: str) -> None:
    admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f"CREATE DATABASE {DB}")
    finally:
        await admin.close()
    await migrate.migrate_url(url)
    conn = await asyncpg.connect(url)
    try:
        await store_test_tokens(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def primary() -> Iterator[LocalPostgres]:
    """A primary with the migrated schema and the test tokens; tests use refs of their own."""
    with LocalPostgres() as pg:
        asyncio.run(_prepare(_url(pg)))
        yield pg


@pytest.fixture
def standby(primary: LocalPostgres) -> Iterator[LocalPostgres]:
    """A fresh streaming standby of ``primary`` for each test (a paused or stopped one stays
    with its test)."""
    replica = primary.standby()
    try:
        yield replica
    finally:
        replica.destroy()


@dataclass
class Api:
    server: ApiServer
    stubs: Stubs


@pytest.fixture
async def start_api(primary: LocalPostgres) -> AsyncIterator[object]:
    servers: list[ApiServer] = []
    channels = []

    async def start(read_url: str, max_lag_s: float = 3600.0) -> Api:
        config = ApiConfig(
            database_url=_url(primary),
            database_read_url=read_url,
            read_max_lag_s=max_lag_s,
            addr="127.0.0.1:0",
            pool_min=1,
            pool_max=8,
            lease_s=2.0,
            poll_s=0.2,
            heartbeat_s=0.5,
            grace_s=2.0,
        )
        server = ApiServer(config)
        await server.start()
        servers.append(server)
        target = f"127.0.0.1:{server.port}"
        ch = channel(target)
        channels.append(ch)
        return Api(server, stubs_for(ch, target))

    yield start
    for ch in channels:
        await ch.close()
    for server in servers:
        await server.stop()


async def _setup(stubs: Stubs) -> tuple[str, str]:
    """A trigger and one rule on it, with refs no other test uses."""
    suffix = uuid.uuid4().hex[:8]
    trigger, rule_ref = f"replica.t{suffix}", f"replica.r{suffix}"
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=trigger)))
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule(rule_ref, trigger)))
    return trigger, rule_ref


async def _create(stubs: Stubs, trigger: str) -> event_pb2.CreateEventResponse:
    response: event_pb2.CreateEventResponse = await stubs.events.CreateEvent(
        event_pb2.CreateEventRequest(event=new_event(trigger, {"n": 1}))
    )
    return response


async def _listed(stubs: Stubs, trigger: str) -> set[int]:
    page = await stubs.events.ListEvents(event_pb2.ListEventsRequest(trigger_ref=trigger, page_size=100))
    return {e.id for e in page.events}


async def _sql(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_reads_are_served_by_the_standby_and_a_get_after_create_finds_the_row(
    standby: LocalPostgres, start_api: object
) -> None:
    api: Api = await start_api(standby.url.rsplit("/", 1)[0] + f"/{DB}")  # type: ignore[operator]
    reads = api.server.store.reads  # type: ignore[union-attr]
    await eventually(holds(lambda: reads.usable), what="the standby probed usable")
    trigger, rule_ref = await _setup(api.stubs)
    first = await _create(api.stubs, trigger)
    await eventually(lambda: _has(api.stubs, trigger, first.event.id), what="the standby to replay the first event")

    # Replay paused: the standby keeps answering (the bound is an hour) with what it had.
    await _sql(standby.url, "SELECT pg_wal_replay_pause()")
    second = await _create(api.stubs, trigger)
    before = reads.served["replica"]
    assert await _listed(api.stubs, trigger) == {first.event.id}, "the list page came from the paused standby"
    assert reads.served["replica"] == before + 1
    enf = await api.stubs.enforcements.ListEnforcements(
        enforcement_pb2.ListEnforcementsRequest(rule_ref=rule_ref, page_size=100)
    )
    assert [e.event for e in enf.enforcements] == [first.event.id]

    # A Get right after a Create: missing on the standby, found on the primary.
    got = await api.stubs.events.GetEvent(event_pb2.GetEventRequest(id=second.event.id))
    assert got.id == second.event.id and got.trigger_ref == trigger
    enf_id = second.enforcements[0].id
    got_enf = await api.stubs.enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=enf_id))
    assert got_enf.id == enf_id and got_enf.event == second.event.id

    # Analytics and the other lists go to the standby too.
    served = reads.served["replica"]
    await api.stubs.executions.ListExecutions(execution_pb2.ListExecutionsRequest(page_size=10))
    await api.stubs.analytics.QueryEventVolume(
        analytics_pb2.QueryEventVolumeRequest(range=common_pb2.TimeRange(), trigger_ref=trigger)
    )
    assert reads.served["replica"] == served + 2

    # Replay resumed: the standby catches up and its pages show the second event.
    await _sql(standby.url, "SELECT pg_wal_replay_resume()")
    await eventually(lambda: _has(api.stubs, trigger, second.event.id), what="the standby to replay the second event")


async def _has(stubs: Stubs, trigger: str, event_id: int) -> bool:
    return event_id in await _listed(stubs, trigger)


async def test_a_standby_lagging_past_the_bound_sends_reads_to_the_primary(
    standby: LocalPostgres, start_api: object
) -> None:
    api: Api = await start_api(standby.url.rsplit("/", 1)[0] + f"/{DB}", 1.0)  # type: ignore[operator]
    reads = api.server.store.reads  # type: ignore[union-attr]
    await eventually(holds(lambda: reads.usable), what="the standby probed usable")
    trigger, _ = await _setup(api.stubs)
    await _sql(standby.url, "SELECT pg_wal_replay_pause()")
    created = await _create(api.stubs, trigger)
    # The primary moved on and the standby's replay did not: its lag grows past 1 s.
    await eventually(holds(lambda: not reads.usable), what="the paused standby judged too far behind")
    assert reads.lag_s is not None and reads.lag_s > 1.0
    before = reads.served["primary"]
    assert created.event.id in await _listed(api.stubs, trigger), "the page came from the primary"
    assert reads.served["primary"] == before + 1

    await _sql(standby.url, "SELECT pg_wal_replay_resume()")
    await eventually(holds(lambda: reads.usable), what="the standby caught up and usable again")
    before = reads.served["replica"]
    assert created.event.id in await _listed(api.stubs, trigger)
    assert reads.served["replica"] == before + 1


async def test_reads_are_answered_with_the_standby_down_and_health_ignores_it(
    standby: LocalPostgres, start_api: object
) -> None:
    api: Api = await start_api(standby.url.rsplit("/", 1)[0] + f"/{DB}")  # type: ignore[operator]
    reads = api.server.store.reads  # type: ignore[union-attr]
    await eventually(holds(lambda: reads.usable), what="the standby probed usable")
    trigger, _ = await _setup(api.stubs)
    created = await _create(api.stubs, trigger)
    await eventually(lambda: _has(api.stubs, trigger, created.event.id), what="the standby to replay the event")

    standby.stop("immediate")
    # The first read after the loss may find the standby's pooled connection dead: it is
    # answered by the primary all the same.
    assert created.event.id in await _listed(api.stubs, trigger)
    got = await api.stubs.events.GetEvent(event_pb2.GetEventRequest(id=created.event.id))
    assert got.id == created.event.id
    await eventually(holds(lambda: not reads.usable), what="the lost standby judged unusable")
    before = reads.served["primary"]
    assert created.event.id in await _listed(api.stubs, trigger)
    assert reads.served["primary"] == before + 1
    assert await check(api.stubs.channel, "") == health_pb2.HealthCheckResponse.SERVING


async def test_an_unreachable_read_url_delays_nothing_and_reads_go_to_the_primary(
    primary: LocalPostgres, start_api: object
) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/{DB}"
    api: Api = await start_api(nowhere)  # type: ignore[operator]
    reads = api.server.store.reads  # type: ignore[union-attr]
    assert await check(api.stubs.channel, "") == health_pb2.HealthCheckResponse.SERVING
    trigger, _ = await _setup(api.stubs)
    created = await _create(api.stubs, trigger)
    assert await _listed(api.stubs, trigger) == {created.event.id}
    await eventually(holds(lambda: "does not answer" in reads.reason), what="the probe to find no standby")
    assert not reads.usable and reads.served["replica"] == 0


async def test_a_multi_host_read_url_prefers_the_standby_and_leaves_a_primary_alone(
    primary: LocalPostgres, standby: LocalPostgres, start_api: object
) -> None:
    hosts = f"127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
    api: Api = await start_api(f"postgresql://postgres@{hosts}/{DB}?target_session_attrs=prefer-standby")  # type: ignore[operator]
    reads = api.server.store.reads  # type: ignore[union-attr]
    await eventually(holds(lambda: reads.usable), what="the standby found among the hosts")
    trigger, _ = await _setup(api.stubs)
    await _listed(api.stubs, trigger)
    assert reads.served["replica"] >= 1

    # The standby gone, prefer-standby settles for the primary: not used as a replica.
    standby.stop("immediate")
    await eventually(holds(lambda: "not a standby" in reads.reason), what="the read URL reaching only the primary")
    created = await _create(api.stubs, trigger)
    before = reads.served["primary"]
    assert created.event.id in await _listed(api.stubs, trigger)
    assert reads.served["primary"] == before + 1


async def test_a_search_stopped_on_the_standby_leaves_the_standby_in_use(
    primary: LocalPostgres, standby: LocalPostgres, start_api: object
) -> None:
    """A payload search runs under its own statement timeout. Stopped on the standby (SQLSTATE
    57014, a class the read route takes for a failing standby), it is answered INVALID_ARGUMENT
    from there: the standby is not set aside, nor the same search run again on the primary."""
    api: Api = await start_api(standby.url.rsplit("/", 1)[0] + f"/{DB}")  # type: ignore[operator]
    reads = api.server.store.reads  # type: ignore[union-attr]
    await eventually(holds(lambda: reads.usable), what="the standby probed usable")
    trigger, _rule_ref = await _setup(api.stubs)
    await _create(api.stubs, trigger)
    holder = await asyncpg.connect(_url(primary))
    watcher = await asyncpg.connect(standby.url.rsplit("/", 1)[0] + f"/{DB}")
    try:
        async with holder.transaction():
            # An ACCESS EXCLUSIVE lock is replayed on the standby: reads of event wait there.
            await holder.execute("LOCK TABLE event IN ACCESS EXCLUSIVE MODE")

            async def replayed() -> bool:
                held = await watcher.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE relation = 'event'::regclass AND mode = 'AccessExclusiveLock'"
                )
                return bool(held)

            await eventually(replayed, what="the lock replayed on the standby")
            served = dict(reads.served)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await api.stubs.events.ListEvents(
                    event_pb2.ListEventsRequest(payload_contains=struct({"n": 1}), trigger_ref=trigger)
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "payload_contains" in (info.value.details() or "")
            assert reads.usable, "a stopped search set the standby aside"
            assert reads.served["replica"] == served.get("replica", 0) + 1
            assert reads.served["primary"] == served.get("primary", 0), "the search ran again on the primary"
    finally:
        await holder.close()
        await watcher.close()
    page = await api.stubs.events.ListEvents(
        event_pb2.ListEventsRequest(payload_contains=struct({"n": 1}), trigger_ref=trigger)
    )
    assert len(page.events) == 1
