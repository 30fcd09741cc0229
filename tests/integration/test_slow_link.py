"""Ingest over a slow link to PostgreSQL: 200 ms +- 100 ms each way (tools.chaos.proxy).

Every statement then costs about 400 ms of round trip, so one transaction per CreateEvent would
cap a small pool at a few events per second, and callers queued behind each other would see
their deadlines pass. Concurrent CreateEvent calls, keyed ones included, are gathered into
shared statements, so all of them are answered; a write whose caller went away still finishes
(and its retry is answered from what it stored). A connection opened to replace one that was
lost (a reset, a failover) answers its first write in the round trips the write needs, not in
the dozen more asyncpg would spend asking the server about built-in types.
"""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.parse
from collections import Counter

import asyncpg
import grpc
import pytest

from services.api.server import ApiServer
from services.api.store import NewEvent, Store, create_pool
from shared.config import ApiConfig
from shared.gen.automation.v1 import event_pb2, event_pb2_grpc, rule_pb2, rule_pb2_grpc
from tests.helpers import channel, new_event, rule
from tools.chaos.proxy import FaultProxy

TRIGGER = "slow.tick"


def _through(url: str, proxy: FaultProxy) -> str:
    parts = urllib.parse.urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{proxy.address}" if user else proxy.address))


async def test_keyed_events_are_all_answered_over_a_slow_link(api_config: ApiConfig) -> None:
    parts = urllib.parse.urlsplit(api_config.database_url)
    host, port = parts.hostname, parts.port
    assert host and port
    async with FaultProxy(host, port, latency_s=0.2, jitter_s=0.1, seed=7) as proxy:
        # Two connections: a call per transaction would take 60 x ~1 s / 2 = ~30 s for these.
        config = dataclasses.replace(api_config, database_url=_through(api_config.database_url, proxy), pool_max=2)
        server = ApiServer(config)
        await server.start()
        try:
            async with channel(f"127.0.0.1:{server.port}") as ch:
                rules = rule_pb2_grpc.RuleServiceStub(ch)
                events = event_pb2_grpc.EventServiceStub(ch)
                await rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=TRIGGER)))
                await rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("slow.all", TRIGGER)))
                await proxy.set_mode("latency")
                codes: Counter[str] = Counter()
                answers: dict[str, int] = {}

                async def send(i: int) -> None:
                    request = event_pb2.CreateEventRequest(event=new_event(TRIGGER, {"i": i}, request_id=f"slow-{i}"))
                    try:
                        answer = await events.CreateEvent(request, timeout=15)
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1
                        return
                    codes["OK"] += 1
                    answers[f"slow-{i}"] = answer.event.id

                await asyncio.gather(*(send(i) for i in range(60)))
                assert codes == {"OK": 60}, codes
                assert proxy.delays, "the link was not slow"
        finally:
            await server.stop()
    conn = await asyncpg.connect(api_config.database_url)
    try:
        rows = await conn.fetch(
            "SELECT request_id, entity_id FROM ingest_request WHERE kind = 'event' AND request_id LIKE 'slow-%'"
        )
    finally:
        await conn.close()
    assert {r["request_id"]: r["entity_id"] for r in rows} == answers


async def test_a_fresh_connection_does_not_ask_for_types_again(db_url: str) -> None:
    # asyncpg asks the server to describe every type it has no codec for yet (bigint[] and int[]
    # in the insert, the status enums in a replay's answer) in statements of its own, on each
    # connection: over a 400 ms link a fresh connection's first insert took about 5 s, past a
    # caller's deadline. Once a pool's connection has asked, its next connections do not.
    pool = await create_pool(db_url, 1, 1)
    store = Store(pool)
    statements: list[str] = []
    try:
        await store.rules.create_trigger(TRIGGER, "Slow", "", None, None)
        await store.rules.create_rule(
            ref="slow.every",
            label="",
            description="",
            trigger_ref=TRIGGER,
            action_ref="core.echo",
            action_params={},
            conditions=[],
            condition="all",
            enabled=True,
        )
        for n in range(2):
            async with pool.acquire() as conn:
                conn.add_query_logger(lambda q: statements.append(q.query))
            # An insert, and its replay: every type the ingest path reads and writes.
            for _ in range(2):
                [created] = await store.events.create_many([NewEvent(TRIGGER, {"n": n}, request_id=f"fresh-{n}")])
            assert created.replayed and created.enforcements
            if n == 0:
                statements.clear()
                await pool.expire_connections()  # the next acquire opens a new connection
    finally:
        await store.close()
    assert statements, "the second connection ran nothing"
    assert [q for q in statements if "typeinfo_tree" in q] == []


@pytest.fixture(autouse=True)
def _quiet_proxy_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="chaos.proxy")
