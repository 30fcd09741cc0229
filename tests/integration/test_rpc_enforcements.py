"""EnforcementService (create, read, list, resolve) over a real channel to a real api."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from shared.errors import error_reason
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, event_pb2, execution_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import count, field_violations, new_event, rpc_error, rule, struct

CREATED = common_pb2.ENFORCEMENT_STATUS_CREATED
PROCESSED = common_pb2.ENFORCEMENT_STATUS_PROCESSED
DISABLED = common_pb2.ENFORCEMENT_STATUS_DISABLED


async def setup(stubs: Stubs, *rules: rule_pb2.Rule) -> None:
    for trigger in sorted({r.trigger_ref for r in rules} | {"core.webhook"}):
        await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=trigger)))
    for r in rules:
        await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=r))


async def enforce(stubs: Stubs, rule_ref: str, **kw: Any) -> enforcement_pb2.CreateEnforcementResponse:
    return await stubs.enforcements.CreateEnforcement(enforcement_pb2.CreateEnforcementRequest(rule_ref=rule_ref, **kw))


async def get(stubs: Stubs, id_: int) -> common_pb2.Enforcement:
    return await stubs.enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=id_))


def resolve(stubs: Stubs, id_: int, status: int, **kw: Any) -> Awaitable[enforcement_pb2.ResolveEnforcementResponse]:
    return stubs.enforcements.ResolveEnforcement(
        enforcement_pb2.ResolveEnforcementRequest(id=id_, status=status, executor_id="test", **kw)  # type: ignore[arg-type]
    )


async def set_enabled(stubs: Stubs, ref: str, enabled: bool) -> None:
    await stubs.rules.UpdateRule(
        rule_pb2.UpdateRuleRequest(
            rule=rule_pb2.Rule(ref=ref, enabled=enabled), update_mask=field_mask_pb2.FieldMask(paths=["enabled"])
        )
    )


# --- CreateEnforcement ----------------------------------------------------------------------


async def test_create_enforcement_for_an_event_that_does_not_exist(stubs: Stubs) -> None:
    await setup(
        stubs, rule("demo.a", "core.webhook", params={"who": "{{ event.payload.user }}", "r": "{{ rule.ref }}"})
    )
    resp = await enforce(stubs, "demo.a", event=987654, payload=struct({"user": "ann"}))
    enf = resp.enforcement
    assert resp.replayed is False
    assert enf.id > 0 and enf.event == 987654
    assert (enf.rule_ref, enf.trigger_ref, enf.status) == ("demo.a", "core.webhook", CREATED)
    assert enf.config == struct({"who": "ann", "r": "demo.a"})
    assert enf.payload == struct({"user": "ann"})
    assert not enf.HasField("resolved_at")


async def test_create_enforcement_with_given_config_and_no_event(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook", params={"ignored": 1}))
    resp = await enforce(stubs, "demo.a", config=struct({"x": [1, 2]}))
    assert resp.enforcement.config == struct({"x": [1, 2]})
    assert not resp.enforcement.HasField("event")
    assert resp.enforcement.payload == struct({})


async def test_create_enforcement_for_unknown_rule_is_not_found_and_writes_nothing(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    err = await rpc_error(enforce(stubs, "demo.none", event=1, request_id="r1"), grpc.StatusCode.NOT_FOUND)
    assert "demo.none" in (err.details() or "")
    assert await count(conn, "enforcement") == 0
    assert await count(conn, "ingest_request") == 0


async def test_create_enforcement_twice_for_same_rule_and_event_is_replayed(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"), rule("demo.b", "core.webhook"))
    first = await enforce(stubs, "demo.a", event=5)
    again = await enforce(stubs, "demo.a", event=5, payload=struct({"different": True}))
    other_rule = await enforce(stubs, "demo.b", event=5)
    assert (first.replayed, again.replayed, other_rule.replayed) == (False, True, False)
    assert again.enforcement == first.enforcement
    assert other_rule.enforcement.id != first.enforcement.id
    assert await count(conn, "enforcement") == 2


async def test_create_enforcement_retry_with_request_id_is_replayed(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    first = await enforce(stubs, "demo.a", payload=struct({"a": 1}), request_id="req-9")
    again = await enforce(stubs, "demo.a", payload=struct({"a": 1}), request_id="req-9")
    assert again.replayed is True and again.enforcement == first.enforcement
    err = await rpc_error(
        enforce(stubs, "demo.a", payload=struct({"a": 2}), request_id="req-9"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "request_id" in field_violations(err)
    assert await count(conn, "enforcement") == 1


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"rule_ref": ""}, "rule_ref"),
        ({"rule_ref": "Demo A"}, "rule_ref"),
        ({"rule_ref": "demo.a", "event": 0}, "event"),
        ({"rule_ref": "demo.a", "event": -4}, "event"),
        ({"rule_ref": "demo.a", "request_id": "x" * 201}, "request_id"),
    ],
    ids=["no-rule", "bad-rule", "zero-event", "negative-event", "long-request-id"],
)
async def test_create_enforcement_with_bad_field_is_invalid_argument_naming_it(
    stubs: Stubs, conn: asyncpg.Connection, kw: dict[str, Any], field: str
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    err = await rpc_error(
        stubs.enforcements.CreateEnforcement(enforcement_pb2.CreateEnforcementRequest(**kw)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert field in field_violations(err)
    assert await count(conn, "enforcement") == 0


# --- GetEnforcement -------------------------------------------------------------------------


async def test_get_enforcement_has_no_resolved_at_while_created(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    created = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook", {"k": 1})))
    enf = await get(stubs, created.enforcements[0].id)
    assert enf == created.enforcements[0]
    assert enf.status == CREATED
    assert not enf.HasField("resolved_at")


async def test_get_enforcement_missing_is_not_found_and_bad_id_invalid(stubs: Stubs) -> None:
    await rpc_error(get(stubs, 31337), grpc.StatusCode.NOT_FOUND)
    err = await rpc_error(get(stubs, 0), grpc.StatusCode.INVALID_ARGUMENT)
    assert "id" in field_violations(err)


# --- ListEnforcements -----------------------------------------------------------------------


async def list_ids(stubs: Stubs, **kw: Any) -> list[int]:
    page = await stubs.enforcements.ListEnforcements(enforcement_pb2.ListEnforcementsRequest(**kw))
    assert page.next_page_token == ""
    return [e.id for e in page.enforcements]


async def test_list_enforcements_filters_combine(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"), rule("demo.b", "core.webhook"), rule("demo.t", "core.timer"))
    e1 = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook")))
    e2 = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.timer")))
    e3 = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook")))
    a1, b1 = sorted(e1.enforcements, key=lambda e: e.rule_ref)
    (t2,) = e2.enforcements
    a3, b3 = sorted(e3.enforcements, key=lambda e: e.rule_ref)
    await resolve(stubs, a1.id, PROCESSED)
    await resolve(stubs, b3.id, DISABLED)
    await resolve(stubs, t2.id, DISABLED)

    all_ids = await list_ids(stubs)
    assert sorted(all_ids) == sorted(e.id for e in (a1, b1, t2, a3, b3))
    assert await list_ids(stubs, rule_ref="demo.a") == [a3.id, a1.id]
    assert sorted(await list_ids(stubs, event=e3.event.id)) == sorted([a3.id, b3.id])
    assert await list_ids(stubs, status=PROCESSED) == [a1.id]
    assert sorted(await list_ids(stubs, status=DISABLED)) == sorted([t2.id, b3.id])
    assert sorted(await list_ids(stubs, status=CREATED)) == sorted([b1.id, a3.id])
    assert await list_ids(stubs, trigger_ref="core.timer") == [t2.id]
    assert await list_ids(stubs, rule_ref="demo.b", status=CREATED) == [b1.id]
    assert await list_ids(stubs, trigger_ref="core.webhook", status=DISABLED) == [b3.id]
    assert await list_ids(stubs, rule_ref="demo.a", event=e1.event.id, status=PROCESSED) == [a1.id]
    assert await list_ids(stubs, rule_ref="demo.a", event=e1.event.id, status=DISABLED) == []

    window = common_pb2.TimeRange(start=e2.event.created, end=e3.event.created)
    assert await list_ids(stubs, created=window) == [t2.id]
    since = common_pb2.TimeRange(start=e3.event.created)
    assert sorted(await list_ids(stubs, created=since, trigger_ref="core.webhook")) == sorted([a3.id, b3.id])
    assert await list_ids(stubs, created=since, rule_ref="demo.a", status=CREATED) == [a3.id]
    assert await list_ids(stubs, created=since, trigger_ref="core.timer") == []


async def test_list_enforcements_pages_newest_first_without_duplicates(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    ids = [(await enforce(stubs, "demo.a", event=i)).enforcement.id for i in range(1, 8)]
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await stubs.enforcements.ListEnforcements(
            enforcement_pb2.ListEnforcementsRequest(page_size=3, page_token=token, rule_ref="demo.a")
        )
        pages += 1
        seen.extend(e.id for e in page.enforcements)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == ids[::-1]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (enforcement_pb2.ListEnforcementsRequest(page_size=-5), "page_size"),
        (enforcement_pb2.ListEnforcementsRequest(page_token="%%%"), "page_token"),
        (enforcement_pb2.ListEnforcementsRequest(status=99), "status"),  # type: ignore[arg-type]
        (
            enforcement_pb2.ListEnforcementsRequest(
                created=common_pb2.TimeRange(
                    start=timestamp_pb2.Timestamp(seconds=2_000_000_000),
                    end=timestamp_pb2.Timestamp(seconds=1_000_000_000),
                )
            ),
            "created",
        ),
    ],
    ids=["page-size", "page-token", "status", "range"],
)
async def test_list_enforcements_with_bad_request_is_invalid_argument_naming_the_field(
    stubs: Stubs, request_: enforcement_pb2.ListEnforcementsRequest, field: str
) -> None:
    err = await rpc_error(stubs.enforcements.ListEnforcements(request_), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in field_violations(err)


# --- ResolveEnforcement ---------------------------------------------------------------------


async def test_resolve_processed_requests_an_execution_and_sets_resolved_at(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook", "core.mail", params={"to": "{{ event.payload.to }}"}))
    created = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook", {"to": "x"})))
    enf = created.enforcements[0]

    resp = await resolve(stubs, enf.id, PROCESSED, reason="rule enabled")

    assert resp.replayed is False
    assert resp.enforcement.status == PROCESSED
    assert resp.enforcement.HasField("resolved_at")
    assert resp.enforcement.resolved_at.ToDatetime() >= enf.created.ToDatetime()
    assert resp.HasField("execution")
    x = resp.execution
    assert x.id > 0 and x.action_ref == "core.mail"
    assert x.config == enf.config == struct({"to": "x"})
    assert x.enforcement == enf.id
    assert x.status == execution_pb2.EXECUTION_STATUS_REQUESTED
    assert await get(stubs, enf.id) == resp.enforcement
    assert await count(conn, "execution") == 1
    assert await count(conn, "enforcement_dispatch") == 0


async def test_resolve_disabled_requests_no_execution(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    enf = (await enforce(stubs, "demo.a")).enforcement
    resp = await resolve(stubs, enf.id, DISABLED)
    assert resp.enforcement.status == DISABLED and resp.enforcement.HasField("resolved_at")
    assert not resp.HasField("execution")
    assert resp.replayed is False
    assert await count(conn, "execution") == 0


async def test_resolve_retry_with_same_status_is_replayed_with_the_same_execution(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    enf = (await enforce(stubs, "demo.a")).enforcement
    first = await resolve(stubs, enf.id, PROCESSED)
    again = await resolve(stubs, enf.id, PROCESSED)
    assert again.replayed is True
    assert again.enforcement == first.enforcement
    assert again.execution == first.execution
    assert await count(conn, "execution") == 1

    other = (await enforce(stubs, "demo.a")).enforcement
    await resolve(stubs, other.id, DISABLED)
    replay = await resolve(stubs, other.id, DISABLED)
    assert replay.replayed is True and not replay.HasField("execution")


@pytest.mark.parametrize(
    ("first", "second", "stored"), [(PROCESSED, DISABLED, "processed"), (DISABLED, PROCESSED, "disabled")]
)
async def test_resolve_differently_is_failed_precondition_naming_the_stored_status(
    stubs: Stubs, conn: asyncpg.Connection, first: int, second: int, stored: str
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    enf = (await enforce(stubs, "demo.a")).enforcement
    done = await resolve(stubs, enf.id, first)
    err = await rpc_error(resolve(stubs, enf.id, second), grpc.StatusCode.FAILED_PRECONDITION)
    assert f"already {stored}" in (err.details() or "")
    assert error_reason(err) == "ALREADY_RESOLVED"
    assert await get(stubs, enf.id) == done.enforcement
    assert await count(conn, "execution") == (1 if first == PROCESSED else 0)


async def test_resolve_processed_while_rule_disabled_fails_then_disabled_works(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    enf = (await enforce(stubs, "demo.a")).enforcement
    await set_enabled(stubs, "demo.a", False)

    err = await rpc_error(resolve(stubs, enf.id, PROCESSED), grpc.StatusCode.FAILED_PRECONDITION)
    assert "disabled" in (err.details() or "")
    assert error_reason(err) == "RULE_NOT_ENABLED"
    still = await get(stubs, enf.id)
    assert still.status == CREATED and not still.HasField("resolved_at")
    assert await count(conn, "execution") == 0

    resp = await resolve(stubs, enf.id, DISABLED)
    assert resp.enforcement.status == DISABLED and not resp.HasField("execution")


async def test_resolve_processed_after_rule_deleted_or_without_action_fails(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"), rule_pb2.Rule(ref="demo.noaction", trigger_ref="core.webhook"))
    deleted = (await enforce(stubs, "demo.a")).enforcement
    no_action = (await enforce(stubs, "demo.noaction")).enforcement
    await stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(ref="demo.a"))

    err = await rpc_error(resolve(stubs, deleted.id, PROCESSED), grpc.StatusCode.FAILED_PRECONDITION)
    assert "deleted" in (err.details() or "")
    err = await rpc_error(resolve(stubs, no_action.id, PROCESSED), grpc.StatusCode.FAILED_PRECONDITION)
    assert "no action" in (err.details() or "")
    assert await count(conn, "execution") == 0
    assert (await resolve(stubs, deleted.id, DISABLED)).enforcement.status == DISABLED


@pytest.mark.parametrize("status", [common_pb2.ENFORCEMENT_STATUS_UNSPECIFIED, CREATED, 42])
async def test_resolve_with_status_other_than_processed_or_disabled_is_invalid_argument(
    stubs: Stubs, status: int
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    enf = (await enforce(stubs, "demo.a")).enforcement
    err = await rpc_error(resolve(stubs, enf.id, status), grpc.StatusCode.INVALID_ARGUMENT)
    assert "status" in field_violations(err)
    assert (await get(stubs, enf.id)).status == CREATED


async def test_resolve_unknown_enforcement_is_not_found_and_bad_id_invalid(stubs: Stubs) -> None:
    await rpc_error(resolve(stubs, 777777, PROCESSED), grpc.StatusCode.NOT_FOUND)
    await rpc_error(resolve(stubs, 777777, DISABLED), grpc.StatusCode.NOT_FOUND)
    err = await rpc_error(resolve(stubs, 0, DISABLED), grpc.StatusCode.INVALID_ARGUMENT)
    assert "id" in field_violations(err)


# --- ResolveEnforcements ----------------------------------------------------------------------


def resolve_many(stubs: Stubs, *decisions: tuple[int, int]) -> Awaitable[enforcement_pb2.ResolveEnforcementsResponse]:
    return stubs.enforcements.ResolveEnforcements(
        enforcement_pb2.ResolveEnforcementsRequest(
            decisions=[
                enforcement_pb2.ResolveEnforcementRequest(id=i, status=s)  # type: ignore[arg-type]
                for i, s in decisions
            ]
        )
    )


async def test_resolve_many_decides_each_on_its_own_as_resolve_would(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"), rule("demo.off", "core.webhook"))
    ok, off, done, dis = [
        (await enforce(stubs, ref)).enforcement.id for ref in ("demo.a", "demo.off", "demo.a", "demo.a")
    ]
    await resolve(stubs, done, DISABLED)
    await set_enabled(stubs, "demo.off", False)

    resp = await resolve_many(
        stubs, (ok, PROCESSED), (off, PROCESSED), (777777, DISABLED), (done, PROCESSED), (dis, DISABLED)
    )

    by_id = {o.id: o for o in resp.outcomes}
    assert [o.id for o in resp.outcomes] == [ok, off, 777777, done, dis]
    assert by_id[ok].status == PROCESSED and by_id[ok].HasField("execution_id") and not by_id[ok].HasField("error")
    assert by_id[dis].status == DISABLED and not by_id[dis].HasField("execution_id")
    assert (by_id[off].error.code, by_id[off].error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "RULE_NOT_ENABLED",
    )
    assert by_id[off].status == common_pb2.ENFORCEMENT_STATUS_UNSPECIFIED
    assert by_id[777777].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert (by_id[done].error.reason, "already disabled" in by_id[done].error.message) == ("ALREADY_RESOLVED", True)
    assert (await get(stubs, off)).status == CREATED
    executions = await conn.fetch("SELECT id, enforcement FROM execution")
    assert [(r["id"], r["enforcement"]) for r in executions] == [(by_id[ok].execution_id, ok)]


async def test_resolve_many_again_is_replayed_and_executes_once(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    ids = [(await enforce(stubs, "demo.a")).enforcement.id for _ in range(3)]
    first = await resolve_many(stubs, *[(i, PROCESSED) for i in ids])
    again = await resolve_many(stubs, *[(i, PROCESSED) for i in ids])
    assert [o.replayed for o in first.outcomes] == [False] * 3
    assert [o.replayed for o in again.outcomes] == [True] * 3
    assert [o.execution_id for o in again.outcomes] == [o.execution_id for o in first.outcomes]
    assert await count(conn, "execution") == 3


async def test_concurrent_batches_of_the_same_enforcements_resolve_each_once(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    ids = [(await enforce(stubs, "demo.a")).enforcement.id for _ in range(20)]
    answers = await asyncio.gather(
        *(resolve_many(stubs, *[(i, PROCESSED) for i in ids[::step]]) for step in (1, -1, 1, -1))
    )
    fresh = [o.id for a in answers for o in a.outcomes if not o.replayed and not o.HasField("error")]
    assert sorted(fresh) == sorted(ids)
    assert all(not o.HasField("error") for a in answers for o in a.outcomes)
    assert await count(conn, "execution") == 20
    assert await conn.fetchval("SELECT count(DISTINCT enforcement) FROM execution") == 20


async def test_resolve_many_with_bad_decisions_is_invalid_argument_and_resolves_nothing(stubs: Stubs) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    a, b = [(await enforce(stubs, "demo.a")).enforcement.id for _ in range(2)]
    err = await rpc_error(
        resolve_many(stubs, (a, PROCESSED), (b, CREATED), (a, DISABLED), (0, DISABLED)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(field_violations(err)) == {"decisions[1].status", "decisions[2].id", "decisions[3].id"}
    err = await rpc_error(resolve_many(stubs), grpc.StatusCode.INVALID_ARGUMENT)
    assert "decisions" in field_violations(err)
    assert [(await get(stubs, i)).status for i in (a, b)] == [CREATED, CREATED]
