"""ExecutionService, HistoryService and AnalyticsService over a real channel to a real api."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from shared.gen.automation.v1 import (
    analytics_pb2,
    common_pb2,
    enforcement_pb2,
    event_pb2,
    execution_pb2,
    history_pb2,
    rule_pb2,
)
from tests.conftest import Stubs
from tests.helpers import field_violations, new_event, rpc_error, rule, struct

PROCESSED = common_pb2.ENFORCEMENT_STATUS_PROCESSED
DISABLED = common_pb2.ENFORCEMENT_STATUS_DISABLED
CREATED = common_pb2.ENFORCEMENT_STATUS_CREATED


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


async def setup(stubs: Stubs, *rules: rule_pb2.Rule) -> None:
    for trigger in sorted({r.trigger_ref for r in rules}):
        await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=trigger)))
    for r in rules:
        await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=r))


async def processed(stubs: Stubs, rule_ref: str, payload: dict[str, Any] | None = None) -> execution_pb2.Execution:
    """Creates an enforcement of ``rule_ref`` and resolves it PROCESSED; returns the execution."""
    enf = await stubs.enforcements.CreateEnforcement(
        enforcement_pb2.CreateEnforcementRequest(rule_ref=rule_ref, payload=struct(payload or {}))
    )
    resp = await stubs.enforcements.ResolveEnforcement(
        enforcement_pb2.ResolveEnforcementRequest(id=enf.enforcement.id, status=PROCESSED)
    )
    assert resp.HasField("execution")
    return resp.execution


# --- ExecutionService -----------------------------------------------------------------------


async def test_get_execution_returns_what_resolve_requested(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook", "core.mail", params={"n": "{{ event.payload.n }}"}))
    x = await processed(stubs, "demo.a", {"n": 4})
    got = await stubs.executions.GetExecution(execution_pb2.GetExecutionRequest(id=x.id))
    assert got == x
    assert got.action_ref == "core.mail" and got.config == struct({"n": 4})
    assert got.status == execution_pb2.EXECUTION_STATUS_REQUESTED
    assert not got.HasField("parent") and not got.HasField("executor")


async def test_get_execution_missing_is_not_found_and_bad_id_invalid(stubs: Stubs) -> None:
    await rpc_error(stubs.executions.GetExecution(execution_pb2.GetExecutionRequest(id=99)), grpc.StatusCode.NOT_FOUND)
    err = await rpc_error(
        stubs.executions.GetExecution(execution_pb2.GetExecutionRequest(id=-1)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "id" in field_violations(err)


async def list_executions(stubs: Stubs, **kw: Any) -> list[int]:
    """The one page of executions the filters select; its count, asked for too, agrees."""
    page = await stubs.executions.ListExecutions(execution_pb2.ListExecutionsRequest(count_matching=True, **kw))
    assert page.next_page_token == ""
    assert (page.matching_count, page.matching_count_more, page.matching_count_stopped) == (
        len(page.executions),
        False,
        False,
    )
    return [x.id for x in page.executions]


async def test_list_executions_filters_combine(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs, rule("demo.a", "core.webhook", "core.mail"), rule("demo.b", "core.webhook", "core.echo"))
    xs = [await processed(stubs, ref) for ref in ["demo.a", "demo.b", "demo.a", "demo.b"]]
    ids = [x.id for x in xs]
    # The worker side moves executions on; here, SQL stands in for it.
    await conn.execute("UPDATE execution SET status = 'running' WHERE id = ANY($1::bigint[])", [ids[1], ids[2]])

    assert await list_executions(stubs) == ids[::-1]
    assert await list_executions(stubs, enforcement=xs[2].enforcement) == [ids[2]]
    assert await list_executions(stubs, action_ref="core.mail") == [ids[2], ids[0]]
    assert await list_executions(stubs, status=execution_pb2.EXECUTION_STATUS_RUNNING) == [ids[2], ids[1]]
    assert await list_executions(stubs, status=execution_pb2.EXECUTION_STATUS_REQUESTED) == [ids[3], ids[0]]
    assert await list_executions(stubs, action_ref="core.echo", status=execution_pb2.EXECUTION_STATUS_RUNNING) == [
        ids[1]
    ]
    window = common_pb2.TimeRange(start=xs[1].created, end=xs[3].created)
    assert await list_executions(stubs, created=window) == [ids[2], ids[1]]
    assert await list_executions(stubs, created=window, action_ref="core.mail") == [ids[2]]
    assert await list_executions(stubs, created=window, enforcement=xs[0].enforcement) == []


async def test_list_executions_pages_without_duplicates(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    ids = [(await processed(stubs, "demo.a")).id for _ in range(5)]
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await stubs.executions.ListExecutions(execution_pb2.ListExecutionsRequest(page_size=2, page_token=token))
        pages += 1
        seen.extend(x.id for x in page.executions)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == ids[::-1]
    # A count covers every page, not the one it comes with; without count_matching, none.
    counted = await stubs.executions.ListExecutions(
        execution_pb2.ListExecutionsRequest(page_size=2, count_matching=True)
    )
    assert (len(counted.executions), counted.matching_count) == (2, 5)
    plain = await stubs.executions.ListExecutions(execution_pb2.ListExecutionsRequest(page_size=2))
    assert plain.matching_count == 0


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (execution_pb2.ListExecutionsRequest(page_size=-1), "page_size"),
        (execution_pb2.ListExecutionsRequest(page_token="nope"), "page_token"),
        (execution_pb2.ListExecutionsRequest(status=77), "status"),  # type: ignore[arg-type]
        (
            execution_pb2.ListExecutionsRequest(
                created=common_pb2.TimeRange(start=ts(datetime(2030, 1, 1, tzinfo=UTC)), end=ts(datetime(2020, 1, 1)))
            ),
            "created",
        ),
    ],
    ids=["page-size", "page-token", "status", "range"],
)
async def test_list_executions_with_bad_request_is_invalid_argument_naming_the_field(
    stubs: Stubs, request_: execution_pb2.ListExecutionsRequest, field: str
) -> None:
    err = await rpc_error(stubs.executions.ListExecutions(request_), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in field_violations(err)


# --- HistoryService -------------------------------------------------------------------------


async def history(stubs: Stubs, entity_type: str, **kw: Any) -> list[history_pb2.HistoryRecord]:
    page = await stubs.history.ListHistory(history_pb2.ListHistoryRequest(entity_type=entity_type, **kw))
    return list(page.records)


async def test_execution_history_records_the_insert_made_by_resolve(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook", "core.mail", params={"k": "v"}))
    x = await processed(stubs, "demo.a")
    (record,) = await history(stubs, "execution")
    assert record.operation == "INSERT"
    assert record.entity_id == x.id and record.entity_ref == "core.mail"
    assert set(record.changed_fields) >= {"status", "config"}
    assert record.new_values["status"] == "requested"
    assert record.new_values["config"] == struct({"k": "v"})
    assert dict(record.old_values) == {}
    assert record.time.seconds > 0


async def test_execution_history_filters_combine(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs, rule("demo.a", "core.webhook", "core.mail"))
    x1 = await processed(stubs, "demo.a")
    x2 = await processed(stubs, "demo.a")
    await conn.execute("UPDATE execution SET status = 'running' WHERE id = $1", x1.id)
    await conn.execute("UPDATE execution SET result = '{\"ok\": true}' WHERE id = $1", x1.id)

    mine = await history(stubs, "execution", entity_id=x1.id)
    assert [r.operation for r in mine] == ["UPDATE", "UPDATE", "INSERT"]
    assert all(r.entity_id == x1.id for r in mine)
    running = mine[1]
    assert list(running.changed_fields) == ["status"]
    assert dict(running.old_values) == {"status": "requested"}
    assert dict(running.new_values) == {"status": "running"}

    assert [r.entity_id for r in await history(stubs, "execution", operation="INSERT")] == [x2.id, x1.id]
    status_changes = await history(stubs, "execution", operation="UPDATE", changed_field="status")
    assert [(r.entity_id, list(r.changed_fields)) for r in status_changes] == [(x1.id, ["status"])]
    assert [r.id for r in await history(stubs, "execution", entity_id=x2.id, operation="UPDATE")] == []
    # An INSERT lists every tracked field; an UPDATE only the ones it changed.
    assert len(await history(stubs, "execution", changed_field="result")) == 3
    result_changes = await history(stubs, "execution", changed_field="result", operation="UPDATE")
    assert [r.new_values["result"] for r in result_changes] == [struct({"ok": True})]

    after_inserts = common_pb2.TimeRange(start=running.time)
    assert [r.id for r in await history(stubs, "execution", time=after_inserts)] == [mine[0].id, mine[1].id]
    before_updates = common_pb2.TimeRange(end=running.time)
    assert {r.operation for r in await history(stubs, "execution", time=before_updates)} == {"INSERT"}


async def test_execution_history_pages_without_duplicates(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    x = await processed(stubs, "demo.a")
    for status in ["scheduling", "scheduled", "running", "completed"]:
        await conn.execute("UPDATE execution SET status = $2::execution_status WHERE id = $1", x.id, status)
    seen: list[history_pb2.HistoryRecord] = []
    token = ""
    pages = 0
    while True:
        page = await stubs.history.ListHistory(
            history_pb2.ListHistoryRequest(entity_type="execution", page_size=2, page_token=token)
        )
        pages += 1
        seen.extend(page.records)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert [r.new_values["status"] for r in seen] == ["completed", "running", "scheduled", "scheduling", "requested"]
    assert len({r.id for r in seen}) == 5


async def test_worker_history_records_insert_and_update_of_a_worker_row(stubs: Stubs, conn: asyncpg.Connection) -> None:
    worker_id = await conn.fetchval("INSERT INTO worker (name, host, port) VALUES ('w-1', 'h1', 8000) RETURNING id")
    other = await conn.fetchval("INSERT INTO worker (name) VALUES ('w-2') RETURNING id")
    await conn.execute("UPDATE worker SET status = 'busy' WHERE id = $1", worker_id)
    await conn.execute("UPDATE worker SET last_heartbeat = now() WHERE id = $1", worker_id)  # not tracked

    records = await history(stubs, "worker", entity_id=worker_id)
    assert [r.operation for r in records] == ["UPDATE", "INSERT"]
    assert all(r.entity_ref == "w-1" for r in records)
    assert dict(records[0].new_values) == {"status": "busy"} and dict(records[0].old_values) == {"status": "active"}
    assert records[1].new_values["host"] == "h1" and records[1].new_values["port"] == 8000
    inserts = await history(stubs, "worker", operation="INSERT")
    assert [r.entity_id for r in inserts] == [other, worker_id]
    assert [r.entity_id for r in await history(stubs, "worker", changed_field="status", operation="UPDATE")] == [
        worker_id
    ]
    assert await history(stubs, "execution") == []


@pytest.mark.parametrize("entity_type", ["event", "enforcement", "rule", ""])
async def test_history_of_other_entity_types_is_invalid_argument_saying_which_have_history(
    stubs: Stubs, entity_type: str
) -> None:
    err = await rpc_error(
        stubs.history.ListHistory(history_pb2.ListHistoryRequest(entity_type=entity_type)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    violations = field_violations(err)
    assert "entity_type" in violations
    assert "execution" in violations["entity_type"] and "worker" in violations["entity_type"]


async def test_history_request_with_several_bad_fields_names_them_all(stubs: Stubs) -> None:
    err = await rpc_error(
        stubs.history.ListHistory(history_pb2.ListHistoryRequest(entity_type="event", operation="UPSERT")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(field_violations(err)) == {"entity_type", "operation"}


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"operation": "UPSERT"}, "operation"),
        ({"entity_id": 0}, "entity_id"),
        ({"page_size": -2}, "page_size"),
        ({"page_token": "zzz"}, "page_token"),
        (
            {
                "time": common_pb2.TimeRange(
                    start=ts(datetime(2024, 1, 2, tzinfo=UTC)), end=ts(datetime(2024, 1, 1, tzinfo=UTC))
                )
            },
            "time",
        ),
    ],
    ids=["operation", "entity-id", "page-size", "page-token", "time"],
)
async def test_list_history_with_bad_filter_is_invalid_argument_naming_it(
    stubs: Stubs, kw: dict[str, Any], field: str
) -> None:
    err = await rpc_error(
        stubs.history.ListHistory(history_pb2.ListHistoryRequest(entity_type="execution", **kw)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert field in field_violations(err)


# --- AnalyticsService -----------------------------------------------------------------------


def hour_of(t: timestamp_pb2.Timestamp) -> timestamp_pb2.Timestamp:
    return ts(t.ToDatetime(tzinfo=UTC).replace(minute=0, second=0, microsecond=0))


async def test_event_volume_counts_just_created_events_in_their_hour(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"), rule("demo.t", "core.timer"))
    made = [
        await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(ref)))
        for ref in ["core.webhook", "core.webhook", "core.timer", "core.webhook"]
    ]
    hours = {hour_of(m.event.created).seconds for m in made}

    resp = await stubs.analytics.QueryEventVolume(analytics_pb2.QueryEventVolumeRequest())
    counts: dict[str, int] = {}
    for b in resp.buckets:
        assert b.bucket.seconds in hours
        counts[b.trigger_ref] = counts.get(b.trigger_ref, 0) + b.event_count
    assert counts == {"core.timer": 1, "core.webhook": 3}

    only = await stubs.analytics.QueryEventVolume(analytics_pb2.QueryEventVolumeRequest(trigger_ref="core.timer"))
    assert [(b.trigger_ref, b.event_count) for b in only.buckets] == [("core.timer", 1)]
    assert only.buckets[0].bucket == hour_of(made[2].event.created)


async def test_event_volume_of_a_range_without_events_is_empty(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook")))
    long_ago = common_pb2.TimeRange(
        start=ts(datetime(2001, 1, 1, tzinfo=UTC)), end=ts(datetime(2001, 1, 2, tzinfo=UTC))
    )
    resp = await stubs.analytics.QueryEventVolume(analytics_pb2.QueryEventVolumeRequest(range=long_ago))
    assert list(resp.buckets) == []


async def test_enforcement_volume_counts_by_rule_and_status(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"), rule("demo.b", "core.webhook"))
    created = [
        await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook"))) for _ in range(3)
    ]
    a_ids = [e.id for c in created for e in c.enforcements if e.rule_ref == "demo.a"]
    b_ids = [e.id for c in created for e in c.enforcements if e.rule_ref == "demo.b"]
    await stubs.enforcements.ResolveEnforcement(
        enforcement_pb2.ResolveEnforcementRequest(id=a_ids[0], status=PROCESSED)
    )
    await stubs.enforcements.ResolveEnforcement(enforcement_pb2.ResolveEnforcementRequest(id=b_ids[0], status=DISABLED))
    await stubs.enforcements.ResolveEnforcement(enforcement_pb2.ResolveEnforcementRequest(id=b_ids[1], status=DISABLED))

    def totals(resp: analytics_pb2.QueryEnforcementVolumeResponse) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for b in resp.buckets:
            out[(b.rule_ref, b.status)] = out.get((b.rule_ref, b.status), 0) + b.enforcement_count
        return out

    everything = await stubs.analytics.QueryEnforcementVolume(analytics_pb2.QueryEnforcementVolumeRequest())
    assert totals(everything) == {
        ("demo.a", PROCESSED): 1,
        ("demo.a", CREATED): 2,
        ("demo.b", DISABLED): 2,
        ("demo.b", CREATED): 1,
    }
    by_rule = await stubs.analytics.QueryEnforcementVolume(
        analytics_pb2.QueryEnforcementVolumeRequest(rule_ref="demo.b")
    )
    assert totals(by_rule) == {("demo.b", DISABLED): 2, ("demo.b", CREATED): 1}
    by_status = await stubs.analytics.QueryEnforcementVolume(
        analytics_pb2.QueryEnforcementVolumeRequest(status=DISABLED)
    )
    assert totals(by_status) == {("demo.b", DISABLED): 2}
    both = await stubs.analytics.QueryEnforcementVolume(
        analytics_pb2.QueryEnforcementVolumeRequest(rule_ref="demo.a", status=DISABLED)
    )
    assert list(both.buckets) == []


async def test_volume_in_day_buckets_starts_each_on_utc_midnight(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    made = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook")))
    midnight = made.event.created.ToDatetime(tzinfo=UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    window = common_pb2.TimeRange(start=ts(midnight - timedelta(days=1)), end=ts(midnight + timedelta(days=1)))
    events = await stubs.analytics.QueryEventVolume(
        analytics_pb2.QueryEventVolumeRequest(range=window, bucket_hours=24)
    )
    assert [(b.bucket.ToDatetime(tzinfo=UTC), b.trigger_ref, b.event_count) for b in events.buckets] == [
        (midnight, "core.webhook", 1)
    ]
    enforcements = await stubs.analytics.QueryEnforcementVolume(
        analytics_pb2.QueryEnforcementVolumeRequest(range=window, bucket_hours=24)
    )
    assert [(b.bucket.ToDatetime(tzinfo=UTC), b.rule_ref, b.enforcement_count) for b in enforcements.buckets] == [
        (midnight, "demo.a", 1)
    ]


@pytest.mark.parametrize("hours", [5, 7, 25, 48, 2**32 - 1])
async def test_volume_bucket_that_does_not_divide_a_day_is_invalid_argument_naming_it(stubs: Stubs, hours: int) -> None:
    err = await rpc_error(
        stubs.analytics.QueryEventVolume(analytics_pb2.QueryEventVolumeRequest(bucket_hours=hours)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "bucket_hours" in field_violations(err)
    err = await rpc_error(
        stubs.analytics.QueryEnforcementVolume(analytics_pb2.QueryEnforcementVolumeRequest(bucket_hours=hours)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "bucket_hours" in field_violations(err)


@pytest.mark.parametrize(
    "window",
    [
        common_pb2.TimeRange(start=ts(datetime(2024, 1, 1, tzinfo=UTC)), end=ts(datetime(2024, 4, 1, tzinfo=UTC))),
        common_pb2.TimeRange(start=ts(datetime.now(UTC) - timedelta(days=91))),
        common_pb2.TimeRange(start=ts(datetime(2024, 1, 2, tzinfo=UTC)), end=ts(datetime(2024, 1, 1, tzinfo=UTC))),
        common_pb2.TimeRange(start=ts(datetime.now(UTC) + timedelta(days=1))),
    ],
    ids=["91-days", "open-end-91-days", "reversed", "start-after-now"],
)
async def test_volume_queries_with_bad_range_are_invalid_argument_naming_range(
    stubs: Stubs, window: common_pb2.TimeRange
) -> None:
    err = await rpc_error(
        stubs.analytics.QueryEventVolume(analytics_pb2.QueryEventVolumeRequest(range=window)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "range" in field_violations(err)
    err = await rpc_error(
        stubs.analytics.QueryEnforcementVolume(analytics_pb2.QueryEnforcementVolumeRequest(range=window)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "range" in field_violations(err)


async def test_volume_query_of_exactly_90_days_is_accepted(stubs: Stubs) -> None:
    end = datetime(2024, 6, 1, tzinfo=UTC)
    window = common_pb2.TimeRange(start=ts(end - timedelta(days=90)), end=ts(end))
    resp = await stubs.analytics.QueryEventVolume(analytics_pb2.QueryEventVolumeRequest(range=window))
    assert list(resp.buckets) == []


async def test_enforcement_volume_with_unknown_status_is_invalid_argument(stubs: Stubs) -> None:
    err = await rpc_error(
        stubs.analytics.QueryEnforcementVolume(analytics_pb2.QueryEnforcementVolumeRequest(status=42)),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "status" in field_violations(err)
