"""A primary lost or moved under ingest: a real Patroni failover (``tools/chaos/patroni.py``).

An api in this process reaches a two-node Patroni cluster through the multi-host DSN with
``target_session_attrs=read-write``; a sensor sends CreateEvent calls with request ids without
pause (an error sends the same request id again, as a sensor should), and an executor resolves
the work. Then everything on the primary's node is killed (Patroni and PostgreSQL, kill -9):
Patroni promotes the standby once the leader key expires.

Synchronous replication: every acknowledged event is on the new primary, once, with the id the
sensor was told; meanwhile the only answer is UNAVAILABLE; health comes back to SERVING by
itself; every enforcement is resolved once; the old primary rejoins as a standby (pg_rewind)
and holds every acknowledged event too. Asynchronous replication: the same run, but the
acknowledged events missing from the new primary are counted and printed, not refused: that is
what asynchronous replication costs, and why the README asks for synchronous mode.

The same checks run through a planned switchover (the old primary demoted and following the
new one) and a kill -9 of the primary's postmaster alone (Patroni keeps the leader key and
starts PostgreSQL again: crash recovery in place).

The figures (unavailability window, time to SERVING, losses) are printed, never asserted: the
machines are shared and noisy. Without patroni or etcd the test fails saying how to install them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api import migrate
from services.api.server import ApiServer
from services.executor import Executor
from shared.config import ApiConfig, ClientSecurity, ExecutorConfig
from shared.gen.automation.v1 import event_pb2, event_pb2_grpc, rule_pb2, rule_pb2_grpc
from tests.helpers import TOKENS, channel, eventually, holds, new_event, pace, rule, store_test_tokens
from tools.chaos.patroni import Node, PatroniCluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRIGGER = "ha.tick"
DATABASE = "automation"
SERVING = health_pb2.HealthCheckResponse.SERVING


KILL_NODE = "kill -9 of the node"
KILL_POSTMASTER = "kill -9 of the postmaster"
SWITCHOVER = "switchover"


@pytest.fixture
async def ha(request: pytest.FixtureRequest) -> AsyncIterator[PatroniCluster]:
    """A migrated database on a fresh Patroni cluster of the mode the (indirect) parameter names."""
    cluster = PatroniCluster(synchronous=request.param == "synchronous")
    leader = await cluster.start()
    try:
        conn = await asyncpg.connect(leader.url())
        try:
            await conn.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            await conn.close()
        # asyncpg goes on to the next host of a multi-host URL only when one refuses the
        # connection or is starting up: a standby that has not replayed CREATE DATABASE yet
        # ("does not exist") would end the attempt before it reaches the primary listed after it.
        await eventually(lambda: _has_database(cluster), timeout=30, what="the database on every node")
        await migrate.migrate_url(cluster.dsn(DATABASE))
        conn = await asyncpg.connect(cluster.dsn(DATABASE))
        try:
            await store_test_tokens(conn)
        finally:
            await conn.close()
        yield cluster
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(cluster.logs(20000))
        await cluster.close()


@dataclass
class Sensor:
    """CreateEvent without pause; each request id sent until it is acknowledged."""

    events: event_pb2_grpc.EventServiceAsyncStub
    acked: dict[str, int] = field(default_factory=dict)
    ack_times: list[float] = field(default_factory=list)
    errors: dict[grpc.StatusCode, int] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            rid = f"ha{n}"
            try:
                answer = await self.events.CreateEvent(
                    event_pb2.CreateEventRequest(event=new_event(TRIGGER, {"rid": rid}, request_id=rid)), timeout=20
                )
            except grpc.aio.AioRpcError as exc:
                self.errors[exc.code()] = self.errors.get(exc.code(), 0) + 1
                # An error is answered at once (refused connections): the retries' rate keeps
                # the loop from spinning while no primary exists.
                await pace(0.05, self.stop)
                continue
            self.acked[rid] = answer.event.id
            self.ack_times.append(time.monotonic())
            n += 1

    async def more(self, count: int, timeout: float, what: str) -> None:
        target = len(self.acked) + count
        await eventually(holds(lambda: len(self.acked) >= target), timeout=timeout, what=what)


@contextlib.asynccontextmanager
async def executor(target: str) -> AsyncIterator[Executor]:
    ex = Executor(
        ExecutorConfig(
            target=target,
            executor_id="exec-ha",
            rpc_timeout_s=5.0,
            keepalive_s=1.0,
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
            security=ClientSecurity(token=TOKENS["executor"]),
        )
    )
    task = asyncio.create_task(ex.run())
    try:
        yield ex
    finally:
        ex.stop()
        await asyncio.wait_for(task, 15)


async def stored(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch("SELECT payload->>'rid' AS rid, id FROM event WHERE trigger_ref = $1", TRIGGER))
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("ha", "fault"),
    [
        ("synchronous", KILL_NODE),
        ("asynchronous", KILL_NODE),
        ("synchronous", SWITCHOVER),
        ("synchronous", KILL_POSTMASTER),
    ],
    indirect=["ha"],
    ids=["sync-kill-node", "async-kill-node", "sync-switchover", "sync-kill-postmaster"],
)
async def test_a_primary_lost_or_moved_under_ingest(ha: PatroniCluster, fault: str) -> None:
    old = await ha.leader()
    assert old is not None
    server = ApiServer(
        ApiConfig(
            database_url=ha.dsn(DATABASE),
            addr="127.0.0.1:0",
            pool_min=1,
            pool_max=8,
            lease_s=2.0,
            poll_s=0.2,
            heartbeat_s=0.5,
            grace_s=2.0,
        )
    )
    await server.start()
    target = f"127.0.0.1:{server.port}"
    health_seen: list[tuple[float, int]] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        async with channel(target) as ch, executor(target):
            rules = rule_pb2_grpc.RuleServiceStub(ch)
            health: object = health_pb2_grpc.HealthStub(ch)
            await rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=TRIGGER)))
            await rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("ha.all", TRIGGER)))
            sensor = Sensor(event_pb2_grpc.EventServiceStub(ch))

            async def watch_health() -> None:
                while not sensor.stop.is_set():
                    try:
                        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # type: ignore[attr-defined]
                        health_seen.append((time.monotonic(), answer.status))
                    except grpc.aio.AioRpcError:
                        health_seen.append((time.monotonic(), -1))
                    await pace(0.1, sensor.stop)

            tasks += [asyncio.create_task(sensor.run()), asyncio.create_task(watch_health())]
            await sensor.more(50, timeout=30, what="events acknowledged before the fault")

            killed_at = time.monotonic()
            if fault == KILL_NODE:
                await ha.kill_node(old)

                async def promoted() -> Node | None:
                    new = await ha.leader()
                    return new if new is not None and new is not old else None

                new = await eventually(promoted, timeout=60, what="Patroni to promote the standby")
            elif fault == SWITCHOVER:
                new = await ha.switchover()
            else:
                # Patroni keeps the leader key and starts PostgreSQL again: crash recovery in
                # place, no failover.
                await ha.kill_postmaster(old)
                await eventually(lambda: _down(old), timeout=30, what="the postmaster gone")
                new = await eventually(ha.leader, timeout=60, what="PostgreSQL started again by Patroni")
            promoted_at = time.monotonic()
            acked_at_kill = sum(1 for t in sensor.ack_times if t < killed_at)
            await sensor.more(50, timeout=60, what="events acknowledged by the new primary")

            async def serving() -> bool:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # type: ignore[attr-defined]
                return bool(answer.status == SERVING)

            await eventually(serving, timeout=30, what="SERVING by itself")
            serving_at = time.monotonic()
            sensor.stop.set()
            await asyncio.gather(*tasks)

            # The executor resolves every enforcement, those of the events before the failover too.
            async def resolved() -> bool:
                conn = await asyncpg.connect(ha.dsn(DATABASE))
                try:
                    pending = await conn.fetchval(
                        "SELECT count(*) FROM enforcement WHERE trigger_ref = $1 AND status = 'created'", TRIGGER
                    )
                finally:
                    await conn.close()
                return bool(pending == 0)

            await eventually(resolved, timeout=60, what="every enforcement resolved after the failover")
    finally:
        for task in tasks:  # a failure half-way: nothing left calling a closed channel
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop()

    rows = await stored(new.url(DATABASE))
    on_new = {r["rid"]: r["id"] for r in rows}
    lost = sorted(set(sensor.acked) - set(on_new))
    # The longest time without an acknowledgement: what a sensor saw of the failover.
    gap = max(b - a for a, b in zip(sensor.ack_times, sensor.ack_times[1:], strict=False))
    not_serving = [t for t, status in health_seen if t > killed_at and status != SERVING]
    # The probe may stop before it sees SERVING again: then the wait above saw it first.
    serving_again = next(
        (t for t, s in health_seen if t > max(not_serving, default=killed_at) and s == SERVING), serving_at
    )
    conn = await asyncpg.connect(new.url(DATABASE))
    try:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM enforcement WHERE trigger_ref = $1) AS enforcements,"
            " (SELECT count(*) FROM execution x JOIN enforcement e ON e.id = x.enforcement WHERE e.trigger_ref = $1)"
            " AS executions",
            TRIGGER,
        )
        assert counts is not None
        enforcements, executions = counts["enforcements"], counts["executions"]
    finally:
        await conn.close()
    health_seen_by_probe = (
        f"health not SERVING for {serving_again - not_serving[0]:.1f} s (SERVING again "
        f"{serving_again - killed_at:.1f} s after the fault)"
        if not_serving
        else "health never seen NOT_SERVING (the api checks every 2 s)"
    )
    print(
        f"\n[{fault}, {ha.mode}] {old.name} was primary; primary {new.name} after "
        f"{promoted_at - killed_at:.1f} s; no event acknowledged for {gap:.1f} s; {health_seen_by_probe}; "
        f"answers meanwhile: { {c.name: n for c, n in sensor.errors.items()} }; "
        f"acknowledged {len(sensor.acked)} ({acked_at_kill} before the fault), stored {len(on_new)}, "
        f"lost {len(lost)}; enforcements {enforcements}, executions {executions}"
    )

    assert set(sensor.errors) <= {grpc.StatusCode.UNAVAILABLE}, sensor.errors
    assert len(rows) == len(on_new), "a request id stored twice"
    assert set(on_new) <= set(sensor.acked) | {f"ha{len(sensor.acked)}"}, "an event stored that was never sent"
    assert {rid: on_new[rid] for rid in sensor.acked if rid in on_new} == {
        rid: i for rid, i in sensor.acked.items() if rid in on_new
    }, "an event stored under another id than the one acknowledged"
    assert executions == enforcements == len(on_new), "every stored event's enforcement executed once"
    if ha.synchronous:
        assert lost == [], f"acknowledged events lost in a synchronous failover: {lost[:10]}"

    if fault != KILL_NODE:
        # The former primary follows the new one (switchover) or is the primary again (crash):
        # the cluster is whole once a standby streams again.
        assert await ha.wait_ready(timeout=60) is new
        return
    # The old primary rejoins as a standby (pg_rewind to the new timeline) and streams again.
    rejoined_start = time.monotonic()
    await ha.start_node(old)
    assert await ha.wait_ready(timeout=60) is new

    async def caught_up() -> list[asyncpg.Record] | None:
        rows = await stored(old.url(DATABASE))
        return rows if len(rows) == len(on_new) else None

    on_old = {r["rid"]: r["id"] for r in await eventually(caught_up, timeout=30, what="the rejoined standby")}
    print(
        f"[{fault}, {ha.mode}] {old.name} rejoined as a standby (pg_rewind) and caught up "
        f"{time.monotonic() - rejoined_start:.1f} s after it was started again"
    )
    assert on_old == on_new


async def _down(node: Node) -> bool:
    return await node.role() == "down"


async def _has_database(cluster: PatroniCluster) -> bool:
    for node in cluster.nodes:
        try:
            conn = await asyncpg.connect(node.url(DATABASE), timeout=2)
        except (OSError, asyncpg.PostgresError):
            return False
        await conn.close()
    return True
