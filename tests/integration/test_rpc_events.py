"""EventService over a real channel to a real api on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from services.api.dispatcher import Dispatcher
from services.api.servicers.events import EventService
from services.api.store import NewEvent, Store
from shared.gen.automation.v1 import common_pb2, condition_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import field_violations, new_event, rpc_error, rule, struct

EQUALS = condition_pb2.CONDITION_OPERATOR_EQUALS


async def counts(conn: asyncpg.Connection) -> tuple[int, int, int]:
    """How many events, enforcements and idempotency keys are stored."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM event), (SELECT count(*) FROM enforcement), (SELECT count(*) FROM ingest_request)"
    )
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def setup(stubs: Stubs, *triggers: str) -> None:
    for ref in triggers:
        await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=ref)))


async def add_rule(stubs: Stubs, msg: rule_pb2.Rule) -> rule_pb2.Rule:
    return await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=msg))


async def create(stubs: Stubs, event: event_pb2.NewEvent) -> event_pb2.CreateEventResponse:
    return await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=event))


def ts(t: timestamp_pb2.Timestamp) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.CopyFrom(t)
    return out


# --- CreateEvent ----------------------------------------------------------------------------


async def test_create_event_stores_event_and_one_enforcement_per_matching_enabled_rule(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, "core.webhook", "core.timer")
    push = await add_rule(stubs, rule("demo.push", "core.webhook", conditions=[("body.action", EQUALS, "push")]))
    await add_rule(stubs, rule("demo.pull", "core.webhook", conditions=[("body.action", EQUALS, "pull")]))
    everything = await add_rule(stubs, rule("demo.all", "core.webhook", "core.log"))
    await add_rule(stubs, rule("demo.off", "core.webhook", enabled=False))
    await add_rule(stubs, rule("demo.timer", "core.timer"))

    resp = await create(
        stubs,
        new_event(
            "core.webhook",
            {"body": {"action": "push"}},
            config=struct({"url": "/hook"}),
            source=7,
            source_ref="sensors.http",
        ),
    )

    ev = resp.event
    assert ev.id > 0 and ev.trigger > 0 and ev.trigger_ref == "core.webhook"
    assert dict(ev.config) == {"url": "/hook"}
    assert ev.payload == struct({"body": {"action": "push"}})
    assert (ev.source, ev.source_ref) == (7, "sensors.http")
    assert not ev.HasField("rule") and ev.rule_ref == ""
    assert resp.replayed is False
    assert sorted(e.rule_ref for e in resp.enforcements) == ["demo.all", "demo.push"]
    by_ref = {e.rule_ref: e for e in resp.enforcements}
    pushed = by_ref["demo.push"]
    assert pushed.rule == push.id and by_ref["demo.all"].rule == everything.id
    assert pushed.event == ev.id
    assert pushed.trigger_ref == "core.webhook"
    assert pushed.status == common_pb2.ENFORCEMENT_STATUS_CREATED
    assert not pushed.HasField("resolved_at")
    assert pushed.payload == ev.payload
    assert pushed.condition == common_pb2.ENFORCEMENT_CONDITION_ALL
    # The same shape and operator names as the rule itself.
    assert list(pushed.conditions) == list(push.conditions)
    assert pushed.conditions[0].operator == condition_pb2.CONDITION_OPERATOR_EQUALS
    assert pushed.created == ev.created
    assert await counts(conn) == (1, 2, 0)


async def test_create_event_renders_action_param_templates(stubs: Stubs) -> None:
    await setup(stubs, "core.webhook")
    params = {
        "user": "{{ event.payload.user.name }}",
        "count": "{{ event.payload.n }}",
        "id": "{{ event.id }}",
        "trigger": "{{ event.trigger }}",
        "rule": "{{ rule.ref }}",
        "text": "n={{ event.payload.n }} by {{ event.payload.user.name }}",
        "missing": "{{ event.payload.nope }}",
        "fixed": 1,
    }
    await add_rule(stubs, rule("demo.t", "core.webhook", params=params))
    resp = await create(stubs, new_event("core.webhook", {"user": {"name": "ann"}, "n": 3}))
    (enf,) = resp.enforcements
    assert enf.config == struct(
        {
            "user": "ann",
            "count": 3,
            "id": resp.event.id,
            "trigger": "core.webhook",
            "rule": "demo.t",
            "text": "n=3 by ann",
            "missing": None,
            "fixed": 1,
        }
    )


async def test_create_event_matching_no_rule_stores_the_event_alone(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs, "core.webhook")
    await add_rule(stubs, rule("demo.a", "core.webhook", conditions=[("x", EQUALS, 1)]))
    resp = await create(stubs, new_event("core.webhook", {"x": 2}))
    assert list(resp.enforcements) == []
    assert await counts(conn) == (1, 0, 0)


async def test_create_event_targeting_a_rule_evaluates_only_that_rule(stubs: Stubs) -> None:
    await setup(stubs, "core.webhook")
    target = await add_rule(stubs, rule("demo.a", "core.webhook"))
    await add_rule(stubs, rule("demo.b", "core.webhook"))
    resp = await create(stubs, new_event("core.webhook", rule_ref="demo.a"))
    assert [e.rule_ref for e in resp.enforcements] == ["demo.a"]
    assert resp.event.rule == target.id and resp.event.rule_ref == "demo.a"


async def test_create_event_for_unknown_trigger_is_not_found_and_writes_nothing(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    err = await rpc_error(create(stubs, new_event("core.missing", request_id="k1")), grpc.StatusCode.NOT_FOUND)
    assert "core.missing" in (err.details() or "")
    assert await counts(conn) == (0, 0, 0)


async def test_create_event_targeting_unknown_or_foreign_rule_fails_and_writes_nothing(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, "core.webhook", "core.timer")
    await add_rule(stubs, rule("demo.timer", "core.timer"))
    await rpc_error(create(stubs, new_event("core.webhook", rule_ref="demo.none")), grpc.StatusCode.NOT_FOUND)
    err = await rpc_error(
        create(stubs, new_event("core.webhook", rule_ref="demo.timer")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "event.rule_ref" in field_violations(err)
    assert await counts(conn) == (0, 0, 0)


async def test_concurrent_create_events_each_get_their_own_outcome(stubs: Stubs, conn: asyncpg.Connection) -> None:
    # Concurrent calls may share one statement: a bad event must fail only its own call.
    await setup(stubs, "core.webhook", "core.timer")
    await add_rule(stubs, rule("demo.timer", "core.timer"))
    good = [new_event("core.webhook", {"i": i}) for i in range(12)]
    bad = [new_event("core.missing"), new_event("core.webhook", rule_ref="demo.timer")]
    calls = [create(stubs, e) for e in good[:6] + bad[:1] + good[6:] + bad[1:]]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    created = [o for o in outcomes if isinstance(o, event_pb2.CreateEventResponse)]
    failed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert sorted(int(c.event.payload["i"]) for c in created) == list(range(12))  # type: ignore[arg-type]
    assert len({c.event.id for c in created}) == 12
    assert sorted(f.code().name for f in failed) == ["INVALID_ARGUMENT", "NOT_FOUND"]
    assert any("event.rule_ref" in field_violations(f) for f in failed if f.code() == grpc.StatusCode.INVALID_ARGUMENT)
    assert await counts(conn) == (12, 0, 0)


async def test_coalesced_events_are_stored_together_or_each_with_its_own_error(
    stubs: Stubs, store: Store, conn: asyncpg.Connection
) -> None:
    await setup(stubs, "core.webhook")
    await add_rule(stubs, rule("demo.a", "core.webhook"))
    service = EventService(store, Dispatcher("postgresql://unused"), lease_s=15.0)
    ok = NewEvent("core.webhook", {"n": 1})
    together = await service._create_coalesced([ok, ok])
    assert [type(o).__name__ for o in together] == ["CreatedEvent", "CreatedEvent"]
    mixed = await service._create_coalesced([ok, NewEvent("core.missing", {}), ok])
    assert [type(o).__name__ for o in mixed] == ["CreatedEvent", "NotFound", "CreatedEvent"]
    assert "event.trigger_ref" in str(mixed[1])
    assert await counts(conn) == (4, 4, 0)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (event_pb2.NewEvent(trigger_ref=""), "event.trigger_ref"),
        (event_pb2.NewEvent(trigger_ref="Core.Webhook"), "event.trigger_ref"),
        (event_pb2.NewEvent(trigger_ref="nodot"), "event.trigger_ref"),
        (event_pb2.NewEvent(trigger_ref="core.webhook", rule_ref="bad rule"), "event.rule_ref"),
        (event_pb2.NewEvent(trigger_ref="core.webhook", request_id="k" * 201), "event.request_id"),
    ],
    ids=["empty-trigger", "upper-trigger", "nodot-trigger", "bad-rule-ref", "long-request-id"],
)
async def test_create_event_with_bad_field_is_invalid_argument_naming_it(
    stubs: Stubs, conn: asyncpg.Connection, event: event_pb2.NewEvent, field: str
) -> None:
    await setup(stubs, "core.webhook")
    await add_rule(stubs, rule("demo.a", "core.webhook"))
    err = await rpc_error(create(stubs, event), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in field_violations(err)
    assert await counts(conn) == (0, 0, 0)


async def test_create_event_without_event_is_invalid_argument(stubs: Stubs, conn: asyncpg.Connection) -> None:
    err = await rpc_error(stubs.events.CreateEvent(event_pb2.CreateEventRequest()), grpc.StatusCode.INVALID_ARGUMENT)
    assert "event" in field_violations(err)
    assert await counts(conn) == (0, 0, 0)


async def test_create_event_retry_with_request_id_is_replayed_with_same_ids(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, "core.webhook")
    await add_rule(stubs, rule("demo.a", "core.webhook"))
    await add_rule(stubs, rule("demo.b", "core.webhook"))
    first = await create(stubs, new_event("core.webhook", {"a": 1}, request_id="req-1"))
    again = await create(stubs, new_event("core.webhook", {"a": 1}, request_id="req-1"))
    assert first.replayed is False and again.replayed is True
    assert again.event == first.event
    assert sorted(e.id for e in again.enforcements) == sorted(e.id for e in first.enforcements)
    assert len(first.enforcements) == 2
    assert await counts(conn) == (1, 2, 1)


async def test_create_event_reusing_request_id_for_another_event_is_invalid_argument(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, "core.webhook")
    await create(stubs, new_event("core.webhook", {"a": 1}, request_id="req-1"))
    err = await rpc_error(
        create(stubs, new_event("core.webhook", {"a": 2}, request_id="req-1")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "event.request_id" in field_violations(err)
    assert await counts(conn) == (1, 0, 1)


# --- CreateEvents ---------------------------------------------------------------------------


async def test_create_events_stores_each_in_request_order(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs, "core.webhook", "core.timer")
    await add_rule(stubs, rule("demo.a", "core.webhook", conditions=[("n", EQUALS, 2)]))
    await add_rule(stubs, rule("demo.t", "core.timer"))
    resp = await stubs.events.CreateEvents(
        event_pb2.CreateEventsRequest(
            events=[
                new_event("core.webhook", {"n": 1}),
                new_event("core.webhook", {"n": 2}),
                new_event("core.timer", {"n": 3}),
            ]
        )
    )
    receipts = resp.receipts
    stored = await conn.fetch(
        "SELECT (payload->>'n')::int AS n FROM event WHERE id = ANY($1) ORDER BY id", [r.event_id for r in receipts]
    )
    assert [r["n"] for r in stored] == [1, 2, 3]
    assert [r.event_id for r in receipts] == sorted(r.event_id for r in receipts)
    assert [list(r.rule_refs) for r in receipts] == [[], ["demo.a"], ["demo.t"]]
    for r in receipts[1:]:
        (enf_id,) = r.enforcement_ids
        assert await conn.fetchval("SELECT event FROM enforcement WHERE id = $1", enf_id) == r.event_id
    assert len({r.event_id for r in receipts}) == 3
    assert await counts(conn) == (3, 2, 0)


async def test_create_events_accepts_a_batch_of_1000(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs, "core.webhook")
    await add_rule(stubs, rule("demo.a", "core.webhook"))
    resp = await stubs.events.CreateEvents(
        event_pb2.CreateEventsRequest(events=[new_event("core.webhook", {"i": i}) for i in range(1000)])
    )
    assert len(resp.receipts) == 1000
    stored = {r["id"]: r["i"] for r in await conn.fetch("SELECT id, (payload->>'i')::int AS i FROM event")}
    assert [stored[r.event_id] for r in resp.receipts] == list(range(1000))
    assert all(len(r.enforcement_ids) == 1 for r in resp.receipts)
    assert await counts(conn) == (1000, 1000, 0)


@pytest.mark.parametrize("size", [0, 1001])
async def test_create_events_with_0_or_1001_events_is_invalid_argument(
    stubs: Stubs, conn: asyncpg.Connection, size: int
) -> None:
    await setup(stubs, "core.webhook")
    err = await rpc_error(
        stubs.events.CreateEvents(event_pb2.CreateEventsRequest(events=[new_event("core.webhook")] * size)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "events" in field_violations(err)
    assert await counts(conn) == (0, 0, 0)


async def test_create_events_with_one_invalid_item_writes_nothing_and_names_the_item(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, "core.webhook")
    await add_rule(stubs, rule("demo.a", "core.webhook"))
    err = await rpc_error(
        stubs.events.CreateEvents(
            event_pb2.CreateEventsRequest(
                events=[
                    new_event("core.webhook", request_id="a"),
                    new_event("BAD"),
                    new_event("core.webhook", request_id="c"),
                ]
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(field_violations(err)) == ["events[1].trigger_ref"]
    assert await counts(conn) == (0, 0, 0)


async def test_create_events_with_one_unknown_trigger_writes_nothing_at_all(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, "core.webhook")
    await add_rule(stubs, rule("demo.a", "core.webhook"))
    err = await rpc_error(
        stubs.events.CreateEvents(
            event_pb2.CreateEventsRequest(
                events=[
                    new_event("core.webhook", request_id="a"),
                    new_event("core.webhook"),
                    new_event("core.missing"),
                ]
            )
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "events[2]" in (err.details() or "")
    assert await counts(conn) == (0, 0, 0)


async def test_create_events_replays_known_request_ids_and_stores_the_rest(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, "core.webhook")
    await add_rule(stubs, rule("demo.a", "core.webhook"))
    first = await create(stubs, new_event("core.webhook", {"k": 1}, request_id="k1"))
    resp = await stubs.events.CreateEvents(
        event_pb2.CreateEventsRequest(
            events=[
                new_event("core.webhook", {"k": 1}, request_id="k1"),
                new_event("core.webhook", {"k": 2}, request_id="k2"),
                new_event("core.webhook", {"k": 2}, request_id="k2"),
            ]
        )
    )
    assert [r.replayed for r in resp.receipts] == [True, False, True]
    assert resp.receipts[0].event_id == first.event.id
    assert list(resp.receipts[0].enforcement_ids) == [e.id for e in first.enforcements]
    assert resp.receipts[2].event_id == resp.receipts[1].event_id
    assert await counts(conn) == (2, 2, 2)


async def test_create_events_with_one_key_for_two_different_events_is_invalid_argument(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await setup(stubs, "core.webhook")
    err = await rpc_error(
        stubs.events.CreateEvents(
            event_pb2.CreateEventsRequest(
                events=[
                    new_event("core.webhook", {"k": 1}, request_id="same"),
                    new_event("core.webhook", {"k": 2}),
                    new_event("core.webhook", {"k": 3}, request_id="same"),
                ]
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "events[2].request_id" in field_violations(err)
    assert await counts(conn) == (0, 0, 0)


# --- GetEvent -------------------------------------------------------------------------------


async def test_get_event_returns_the_stored_event(stubs: Stubs) -> None:
    await setup(stubs, "core.webhook")
    created = await create(stubs, new_event("core.webhook", {"a": [1, 2]}, source_ref="s.x"))
    got = await stubs.events.GetEvent(event_pb2.GetEventRequest(id=created.event.id))
    assert got == created.event


async def test_get_missing_event_is_not_found(stubs: Stubs) -> None:
    err = await rpc_error(stubs.events.GetEvent(event_pb2.GetEventRequest(id=424242)), grpc.StatusCode.NOT_FOUND)
    assert "424242" in (err.details() or "")


@pytest.mark.parametrize("id_", [0, -1])
async def test_get_event_with_non_positive_id_is_invalid_argument(stubs: Stubs, id_: int) -> None:
    err = await rpc_error(stubs.events.GetEvent(event_pb2.GetEventRequest(id=id_)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "id" in field_violations(err)


# --- ListEvents -----------------------------------------------------------------------------


async def list_ids(stubs: Stubs, **kw: Any) -> list[int]:
    page = await stubs.events.ListEvents(event_pb2.ListEventsRequest(**kw))
    assert page.next_page_token == ""
    return [e.id for e in page.events]


async def test_list_events_filters_combine(stubs: Stubs) -> None:
    await setup(stubs, "core.webhook", "core.timer")
    await add_rule(stubs, rule("demo.a", "core.webhook"))
    await add_rule(stubs, rule("demo.t", "core.timer"))
    specs: list[dict[str, Any]] = [
        {"trigger_ref": "core.webhook", "source_ref": "s.one"},
        {"trigger_ref": "core.webhook", "source_ref": "s.two", "rule_ref": "demo.a"},
        {"trigger_ref": "core.timer", "source_ref": "s.one"},
        {"trigger_ref": "core.timer", "source_ref": "s.one", "rule_ref": "demo.t"},
        {"trigger_ref": "core.webhook"},
        {"trigger_ref": "core.webhook", "source_ref": "s.one", "rule_ref": "demo.a"},
    ]
    ids = [(await create(stubs, event_pb2.NewEvent(**s))).event.id for s in specs]

    assert await list_ids(stubs) == ids[::-1]
    assert await list_ids(stubs, trigger_ref="core.timer") == [ids[3], ids[2]]
    assert await list_ids(stubs, source_ref="s.one") == [ids[5], ids[3], ids[2], ids[0]]
    assert await list_ids(stubs, rule_ref="demo.a") == [ids[5], ids[1]]
    assert await list_ids(stubs, trigger_ref="core.webhook", source_ref="s.one") == [ids[5], ids[0]]
    assert await list_ids(stubs, trigger_ref="core.webhook", source_ref="s.one", rule_ref="demo.a") == [ids[5]]
    assert await list_ids(stubs, trigger_ref="core.timer", rule_ref="demo.a") == []


async def test_list_events_filters_by_created_range_combined_with_others(stubs: Stubs) -> None:
    await setup(stubs, "core.webhook", "core.timer")
    events = [
        (await create(stubs, new_event(trigger, {"i": i}))).event
        for i, trigger in enumerate(["core.webhook", "core.timer", "core.webhook", "core.webhook", "core.timer"])
    ]
    assert all(a.created.ToDatetime() < b.created.ToDatetime() for a, b in itertools.pairwise(events))
    ids = [e.id for e in events]

    between = common_pb2.TimeRange(start=ts(events[1].created), end=ts(events[4].created))
    assert await list_ids(stubs, created=between) == [ids[3], ids[2], ids[1]]
    assert await list_ids(stubs, created=between, trigger_ref="core.webhook") == [ids[3], ids[2]]
    from_only = common_pb2.TimeRange(start=ts(events[3].created))
    assert await list_ids(stubs, created=from_only) == [ids[4], ids[3]]
    to_only = common_pb2.TimeRange(end=ts(events[1].created))
    assert await list_ids(stubs, created=to_only) == [ids[0]]
    assert await list_ids(stubs, created=to_only, trigger_ref="core.timer") == []


async def test_list_events_pages_through_all_events_without_duplicates(stubs: Stubs) -> None:
    await setup(stubs, "core.webhook")
    # A batch shares one `created` (ties broken by id) and single events follow it.
    batch = await stubs.events.CreateEvents(
        event_pb2.CreateEventsRequest(events=[new_event("core.webhook", {"i": i}) for i in range(4)])
    )
    singles = [(await create(stubs, new_event("core.webhook", {"i": 4 + i}))).event.id for i in range(4)]
    expected = (singles[::-1]) + [r.event_id for r in reversed(batch.receipts)]

    seen: list[int] = []
    token = ""
    sizes: list[int] = []
    while True:
        page = await stubs.events.ListEvents(event_pb2.ListEventsRequest(page_size=3, page_token=token))
        sizes.append(len(page.events))
        seen.extend(e.id for e in page.events)
        token = page.next_page_token
        if not token:
            break
    assert sizes == [3, 3, 2]  # full pages, then the rest
    assert seen == expected
    assert len(set(seen)) == 8


async def test_list_events_paging_keeps_the_filters(stubs: Stubs) -> None:
    await setup(stubs, "core.webhook", "core.timer")
    wanted = []
    for i in range(7):
        resp = await create(stubs, new_event("core.webhook" if i % 2 == 0 else "core.timer", source_ref="s.a"))
        if i % 2 == 0:
            wanted.append(resp.event.id)
    seen: list[int] = []
    token = ""
    while True:
        page = await stubs.events.ListEvents(
            event_pb2.ListEventsRequest(page_size=1, page_token=token, trigger_ref="core.webhook")
        )
        seen.extend(e.id for e in page.events)
        token = page.next_page_token
        if not token:
            break
    assert seen == wanted[::-1]


async def test_list_events_with_negative_page_size_is_invalid_argument(stubs: Stubs) -> None:
    err = await rpc_error(
        stubs.events.ListEvents(event_pb2.ListEventsRequest(page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "page_size" in field_violations(err)


@pytest.mark.parametrize("token", ["garbage!", "bm90LWEtdG9rZW4", "MTIz"])
async def test_list_events_with_garbage_page_token_is_invalid_argument(stubs: Stubs, token: str) -> None:
    err = await rpc_error(
        stubs.events.ListEvents(event_pb2.ListEventsRequest(page_token=token)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "page_token" in field_violations(err)


@pytest.mark.parametrize("later", [0, -1])
async def test_list_events_with_start_not_before_end_is_invalid_argument(stubs: Stubs, later: int) -> None:
    start = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    end = timestamp_pb2.Timestamp(seconds=1_700_000_000 + later)
    err = await rpc_error(
        stubs.events.ListEvents(event_pb2.ListEventsRequest(created=common_pb2.TimeRange(start=start, end=end))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "created" in field_violations(err)


@pytest.mark.parametrize(
    ("bound", "stamp"),
    [
        ("start", timestamp_pb2.Timestamp(seconds=253_402_300_800)),
        ("end", timestamp_pb2.Timestamp(seconds=-62_135_596_801)),
        ("start", timestamp_pb2.Timestamp(seconds=0, nanos=2_000_000_000)),
    ],
    ids=["after-9999", "before-year-1", "bad-nanos"],
)
async def test_list_events_with_unrepresentable_timestamp_is_invalid_argument_naming_the_bound(
    stubs: Stubs, bound: str, stamp: timestamp_pb2.Timestamp
) -> None:
    created = common_pb2.TimeRange()
    getattr(created, bound).CopyFrom(stamp)
    err = await rpc_error(
        stubs.events.ListEvents(event_pb2.ListEventsRequest(created=created)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert f"created.{bound}" in field_violations(err)
