"""PostgreSQL crashes on a single node: kill -9 of the postmaster and an immediate shutdown.

Neither lets PostgreSQL write a shutdown checkpoint: the restart replays WAL (crash recovery).
Every event the api acknowledged before the crash must be there after it, the api must answer
UNAVAILABLE (never INTERNAL) while the database is gone, and SERVING again by itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api import migrate
from services.api.server import ApiServer
from shared.config import ApiConfig
from shared.gen.automation.v1 import event_pb2, event_pb2_grpc, rule_pb2, rule_pb2_grpc
from tests.helpers import channel, eventually, holds, new_event, rule, store_test_tokens
from tools.postgres import LocalPostgres

TRIGGER = "crash.tick"


@pytest.fixture
async def durable() -> AsyncIterator[LocalPostgres]:
    pg = LocalPostgres(durable=True)
    await asyncio.to_thread(pg.start)
    try:
        await migrate.migrate_url(pg.url)
        conn = await asyncpg.connect(pg.url)
        try:
            await store_test_tokens(conn)
        finally:
            await conn.close()
        yield pg
    finally:
        await asyncio.to_thread(pg.destroy)


def kill_postmaster(pg: LocalPostgres) -> None:
    pid = int((pg.datadir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)


async def crash_and_recover(pg: LocalPostgres, how: str) -> None:
    if how == "kill -9":
        await asyncio.to_thread(kill_postmaster, pg)
    else:
        await asyncio.to_thread(pg.stop, "immediate")

    async def gone() -> bool:
        try:
            conn = await asyncpg.connect(pg.url, timeout=2)
        except (OSError, asyncpg.PostgresError):
            return True
        await conn.close()
        return False

    await eventually(gone, what="PostgreSQL down")

    # The backends of a killed postmaster exit by themselves, soon; until they have, a new
    # postmaster refuses to start on their shared memory.
    async def started() -> bool:
        try:
            await asyncio.to_thread(pg.start)
        except subprocess.CalledProcessError:
            return False
        return True

    await eventually(started, timeout=30, what="PostgreSQL started again (crash recovery)")


@pytest.mark.parametrize("how", ["kill -9", "immediate shutdown"])
async def test_acknowledged_events_survive_a_crash_of_postgresql(durable: LocalPostgres, how: str) -> None:
    server = ApiServer(
        ApiConfig(database_url=durable.url, addr="127.0.0.1:0", pool_min=1, pool_max=8, lease_s=2.0, grace_s=2.0)
    )
    await server.start()
    try:
        async with channel(f"127.0.0.1:{server.port}") as ch:
            rules = rule_pb2_grpc.RuleServiceStub(ch)
            events = event_pb2_grpc.EventServiceStub(ch)
            health: object = health_pb2_grpc.HealthStub(ch)
            await rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=TRIGGER)))
            await rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("crash.all", TRIGGER)))
            acked: dict[str, int] = {}
            codes: set[grpc.StatusCode] = set()
            stop = asyncio.Event()

            async def load() -> None:
                n = 0
                while not stop.is_set():
                    rid = f"c{n}"
                    try:
                        answer = await events.CreateEvent(
                            event_pb2.CreateEventRequest(event=new_event(TRIGGER, {"rid": rid}, request_id=rid)),
                            timeout=10,
                        )
                        acked[rid] = answer.event.id
                        n += 1
                    except grpc.aio.AioRpcError as exc:
                        codes.add(exc.code())  # the same request id is sent again

            task = asyncio.create_task(load())
            await eventually(holds(lambda: len(acked) >= 20), what="events acknowledged")
            await crash_and_recover(durable, how)
            before = len(acked)
            await eventually(holds(lambda: len(acked) >= before + 20), timeout=30, what="ingest again")
            stop.set()
            await task

            async def serving() -> bool:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # type: ignore[attr-defined]
                return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

            await eventually(serving, what="SERVING by itself")
    finally:
        await server.stop()
    assert codes <= {grpc.StatusCode.UNAVAILABLE}, codes
    conn = await asyncpg.connect(durable.url)
    try:
        rows = await conn.fetch("SELECT payload->>'rid' AS rid, id FROM event WHERE trigger_ref = $1", TRIGGER)
    finally:
        await conn.close()
    stored = {r["rid"]: r["id"] for r in rows}
    assert len(rows) == len(stored)  # no request id stored twice
    assert {rid: stored.get(rid) for rid in acked} == acked  # every acknowledged event, as answered
