"""The shapes of work every scenario shares: triggers and rules, event requests, raw SQL.

An ingest event matches two rules (1 event + 2 enforcements = 3 rows); a pipeline event
matches one rule, whose action the executor requests (an execution row).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
from google.protobuf import struct_pb2

from shared.gen.automation.v1 import common_pb2, event_pb2, event_pb2_grpc, rule_pb2, rule_pb2_grpc

ACTION = "core.echo"
PAYLOAD: dict[str, Any] = {"host": "web-1", "status": 500, "path": "/api/orders", "ms": 812}
PAYLOAD_JSON = json.dumps(PAYLOAD)
SOURCE = "sensor.http"


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


async def define(channel: grpc.aio.Channel, trigger_ref: str, rule_refs: list[str]) -> dict[str, int]:
    """Creates the trigger and rules (no conditions, so every event matches) through the api;
    returns {ref: id} of the trigger and each rule."""
    stub: rule_pb2_grpc.RuleServiceAsyncStub = rule_pb2_grpc.RuleServiceStub(channel)
    trigger = await stub.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=trigger_ref)))
    ids = {trigger_ref: trigger.id}
    for ref in rule_refs:
        rule = await stub.CreateRule(
            rule_pb2.CreateRuleRequest(
                rule=rule_pb2.Rule(
                    ref=ref,
                    trigger_ref=trigger_ref,
                    action_ref=ACTION,
                    action_params=struct({"host": "{{ event.payload.host }}", "fixed": 1}),
                    condition=common_pb2.ENFORCEMENT_CONDITION_ALL,
                    enabled=True,
                )
            )
        )
        ids[ref] = rule.id
    return ids


def new_event(trigger_ref: str) -> event_pb2.NewEvent:
    return event_pb2.NewEvent(trigger_ref=trigger_ref, payload=struct(PAYLOAD), source_ref=SOURCE)


# ---- raw SQL: the same rows, written by asyncpg without the api ------------------------------

# One event and its enforcements in one statement (one round trip, one transaction): the
# strongest form of the transaction, so the ratio is not flattered by a naive baseline.
RAW_EVENT_WITH_ENFORCEMENTS = """
WITH ev AS (
    INSERT INTO event (trigger, trigger_ref, payload, source_ref)
    VALUES ($1, $2, $3::jsonb, $4)
    RETURNING id, created
)
INSERT INTO enforcement (rule, rule_ref, trigger_ref, config, event, payload, condition, conditions, created)
SELECT r.id, r.ref, $2, $5::jsonb, ev.id, $3::jsonb, 'all', '[]'::jsonb, ev.created
  FROM ev, unnest($6::bigint[], $7::text[]) AS r(id, ref)
RETURNING id, created
"""

# Resolution as the api does it, in SQL alone: conditional update + execution insert.
RAW_RESOLVE = """
WITH done AS (
    UPDATE enforcement SET status = 'processed', resolved_at = now()
     WHERE id = $1 AND created = $2 AND status = 'created'
    RETURNING id, config
)
INSERT INTO execution (action_ref, config, enforcement)
SELECT $3, COALESCE(config, '{}'::jsonb), id FROM done
RETURNING id
"""

RAW_CONFIG = json.dumps({"host": "web-1", "fixed": 1})


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """The api's pool skips asyncpg's reset query (one round trip per release); so does the
    baseline, or it would be slower than the raw database is."""


async def raw_pool(url: str, size: int) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(url, min_size=size, max_size=size, reset=_no_reset)
    assert pool is not None
    return pool


def create_event(channel: grpc.aio.Channel, trigger_ref: str, enforcements: int = 2) -> Callable[[], Awaitable[int]]:
    """A closed-loop call: one CreateEvent of the workload's event, which must have fired
    ``enforcements`` rules."""
    stub: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(channel)
    request = event_pb2.CreateEventRequest(event=new_event(trigger_ref))

    async def call() -> int:
        response = await stub.CreateEvent(request, timeout=30)
        assert len(response.enforcements) == enforcements
        return 1

    return call
