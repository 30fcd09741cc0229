"""Ingest over a slow link to PostgreSQL: 200 ms +- 100 ms each way (tools.chaos.proxy).

Every statement then costs about 400 ms of round trip, so one transaction per CreateEvent would
cap a small pool at a few events per second, and callers queued behind each other would see
their deadlines pass. Concurrent CreateEvent calls, keyed ones included, are gathered into
shared statements, so all of them are answered; a write whose caller went away still finishes
(and its retry is answered from what it stored).
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


@pytest.fixture(autouse=True)
def _quiet_proxy_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="chaos.proxy")
