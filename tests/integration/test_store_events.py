"""The event repository on a real PostgreSQL: storing, reading, matching, idempotency."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.api.store import NewEvent, Rule, Store
from shared.errors import InvalidArgument, NotFound

HOOK = "core.webhook"
TIMER = "core.timer"


async def make_rule(
    store: Store,
    ref: str,
    trigger_ref: str = HOOK,
    *,
    conditions: list[dict[str, Any]] | None = None,
    condition: str = "all",
    enabled: bool = True,
    params: dict[str, Any] | None = None,
    action_ref: str | None = "core.echo",
) -> Rule:
    return await store.rules.create_rule(
        ref=ref,
        label="",
        description="",
        trigger_ref=trigger_ref,
        action_ref=action_ref,
        action_params=params or {},
        conditions=conditions or [],
        condition=condition,
        enabled=enabled,
    )


@pytest.fixture
async def triggers(store: Store) -> None:
    await store.rules.create_trigger(HOOK, "Webhook", "", None, None)
    await store.rules.create_trigger(TIMER, "Timer", "", None, None)


def cond(field: str, operator: str, value: Any) -> dict[str, Any]:
    return {"field": field, "operator": operator, "value": value}


async def one(store: Store, event: NewEvent) -> Any:
    [created] = await store.events.create_many([event])
    return created


async def count(conn: asyncpg.Connection, table: str) -> int:
    value = await conn.fetchval(f"SELECT count(*) FROM {table}")
    assert isinstance(value, int)
    return value


# ---- create / get -------------------------------------------------------------------------------


@pytest.mark.usefixtures("triggers")
async def test_create_event_with_required_fields_only(store: Store) -> None:
    created = await one(store, NewEvent(HOOK, {"a": 1}))
    ev = created.event
    trigger = await store.rules.get_trigger(HOOK)
    assert (ev.trigger, ev.trigger_ref, ev.payload) == (trigger.id, HOOK, {"a": 1})
    assert (ev.config, ev.source, ev.source_ref, ev.rule, ev.rule_ref) == (None, None, None, None, None)
    assert created.enforcements == [] and created.replayed is False
    assert await store.events.get(ev.id) == ev


@pytest.mark.usefixtures("triggers")
async def test_create_event_with_every_optional_field(store: Store) -> None:
    rule = await make_rule(store, "demo.target")
    new = NewEvent(
        HOOK,
        {"nested": {"list": [1, "two", None, True]}},
        config={"k": "v", "n": 2},
        source=17,
        source_ref="sensor.github",
        rule_ref="demo.target",
        request_id="req-all-fields",
    )
    ev = (await one(store, new)).event
    assert ev.config == {"k": "v", "n": 2}
    assert (ev.source, ev.source_ref) == (17, "sensor.github")
    assert (ev.rule, ev.rule_ref) == (rule.id, "demo.target")
    assert ev.payload == {"nested": {"list": [1, "two", None, True]}}
    assert await store.events.get(ev.id) == ev


@pytest.mark.usefixtures("triggers")
async def test_event_created_timestamp_auto_set(store: Store, conn: asyncpg.Connection) -> None:
    before = await conn.fetchval("SELECT now()")
    ev = (await one(store, NewEvent(HOOK, {}))).event
    after = await conn.fetchval("SELECT now()")
    assert ev.created.tzinfo is not None
    assert before <= ev.created <= after
    assert await conn.fetchval("SELECT created FROM event WHERE id = $1", ev.id) == ev.created


@pytest.mark.usefixtures("triggers")
async def test_create_many_stores_a_batch_with_its_enforcements(store: Store, conn: asyncpg.Connection) -> None:
    await make_rule(store, "demo.hook")
    await make_rule(store, "demo.timer", TIMER)
    results = await store.events.create_many(
        [NewEvent(HOOK, {"i": 0}), NewEvent(TIMER, {"i": 1}), NewEvent(HOOK, {"i": 2})], many=True
    )
    ids = [r.event.id for r in results]
    assert len(set(ids)) == 3 and ids == sorted(ids)
    assert [r.event.payload["i"] for r in results] == [0, 1, 2]
    assert [[e.rule_ref for e in r.enforcements] for r in results] == [["demo.hook"], ["demo.timer"], ["demo.hook"]]
    assert all(e.event == r.event.id for r in results for e in r.enforcements)
    assert await count(conn, "event") == 3
    assert await count(conn, "enforcement") == 3


@pytest.mark.usefixtures("triggers")
async def test_batch_with_an_unknown_trigger_stores_nothing(store: Store, conn: asyncpg.Connection) -> None:
    await make_rule(store, "demo.hook")
    with pytest.raises(NotFound, match=r"events\[1\]\.trigger_ref: trigger nope\.missing not found"):
        await store.events.create_many([NewEvent(HOOK, {}), NewEvent("nope.missing", {})], many=True)
    assert await count(conn, "event") == 0
    assert await count(conn, "enforcement") == 0


async def test_get_unknown_event_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="event 12345 not found"):
        await store.events.get(12345)


# ---- list ---------------------------------------------------------------------------------------


async def _raw_event(
    conn: asyncpg.Connection,
    trigger_ref: str,
    created: datetime,
    source_ref: str | None = None,
    rule_ref: str | None = None,
) -> int:
    value = await conn.fetchval(
        "INSERT INTO event (trigger_ref, source_ref, rule_ref, created) VALUES ($1, $2, $3, $4) RETURNING id",
        trigger_ref,
        source_ref,
        rule_ref,
        created,
    )
    assert isinstance(value, int)
    return value


T0 = datetime(2024, 3, 1, tzinfo=UTC)


async def test_list_filters_alone_and_combined(store: Store, conn: asyncpg.Connection) -> None:
    a = await _raw_event(conn, HOOK, T0, source_ref="s.one", rule_ref="r.one")
    b = await _raw_event(conn, HOOK, T0 + timedelta(hours=1), source_ref="s.two")
    c = await _raw_event(conn, TIMER, T0 + timedelta(hours=2), source_ref="s.one", rule_ref="r.one")
    d = await _raw_event(conn, TIMER, T0 + timedelta(hours=3))

    async def ids(**filters: Any) -> list[int]:
        return [e.id for e in (await store.events.list(100, "", **filters)).items]

    assert await ids() == [d, c, b, a]
    assert await ids(trigger_ref=HOOK) == [b, a]
    assert await ids(source_ref="s.one") == [c, a]
    assert await ids(rule_ref="r.one") == [c, a]
    assert await ids(created_from=T0 + timedelta(hours=1)) == [d, c, b]
    assert await ids(created_to=T0 + timedelta(hours=2)) == [b, a]
    assert await ids(created_from=T0 + timedelta(hours=1), created_to=T0 + timedelta(hours=3)) == [c, b]
    assert await ids(trigger_ref=TIMER, source_ref="s.one") == [c]
    assert await ids(trigger_ref=HOOK, rule_ref="r.one", created_from=T0 + timedelta(minutes=1)) == []
    assert await ids(trigger_ref="no.such") == []


async def _pages(store: Store, size: int, **filters: Any) -> list[list[int]]:
    pages: list[list[int]] = []
    token = ""
    while True:
        page = await store.events.list(size, token, **filters)
        pages.append([e.id for e in page.items])
        if not page.next_token:
            return pages
        token = page.next_token


async def test_keyset_paging_has_no_duplicates_or_gaps(store: Store, conn: asyncpg.Connection) -> None:
    ids = [await _raw_event(conn, HOOK, T0 + timedelta(minutes=i)) for i in range(7)]
    pages = await _pages(store, 3)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == list(reversed(ids))


@pytest.mark.usefixtures("triggers")
async def test_keyset_paging_over_events_sharing_one_timestamp(store: Store) -> None:
    results = await store.events.create_many([NewEvent(HOOK, {"i": i}) for i in range(5)], many=True)
    assert len({r.event.created for r in results}) == 1
    pages = await _pages(store, 2, trigger_ref=HOOK)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == sorted((r.event.id for r in results), reverse=True)


async def test_exact_multiple_of_page_size_ends_with_empty_token(store: Store, conn: asyncpg.Connection) -> None:
    for i in range(4):
        await _raw_event(conn, HOOK, T0 + timedelta(minutes=i))
    first = await store.events.list(2, "")
    second = await store.events.list(2, first.next_token)
    assert first.next_token != "" and len(second.items) == 2
    # One row more is fetched than shown, so the last full page already knows it is the last.
    assert second.next_token == ""


@pytest.mark.usefixtures("triggers")
async def test_page_size_zero_means_default(store: Store) -> None:
    from services.api.store._paging import DEFAULT_PAGE_SIZE, page_size

    await store.events.create_many([NewEvent(HOOK, {}) for _ in range(DEFAULT_PAGE_SIZE + 1)], many=True)
    page = await store.events.list(page_size(0), "")
    assert len(page.items) == DEFAULT_PAGE_SIZE and page.next_token != ""
    rest = await store.events.list(page_size(0), page.next_token)
    assert len(rest.items) == 1 and rest.next_token == ""


def test_negative_page_size_is_invalid_argument() -> None:
    from services.api.store._paging import page_size

    with pytest.raises(InvalidArgument, match="page_size"):
        page_size(-3)


async def test_bad_page_token_is_invalid_argument(store: Store) -> None:
    with pytest.raises(InvalidArgument) as info:
        await store.events.list(10, "garbage!")
    assert info.value.violations[0][0] == "page_token"


# ---- matching -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("triggers")
async def test_only_enabled_rules_of_the_event_trigger_fire(store: Store) -> None:
    await make_rule(store, "demo.on")
    await make_rule(store, "demo.off", enabled=False)
    await make_rule(store, "demo.timer", TIMER)
    created = await one(store, NewEvent(HOOK, {}))
    assert [e.rule_ref for e in created.enforcements] == ["demo.on"]
    enf = created.enforcements[0]
    assert (enf.status, enf.resolved_at, enf.trigger_ref, enf.event) == ("created", None, HOOK, created.event.id)


@pytest.mark.usefixtures("triggers")
async def test_all_and_any_conditions(store: Store) -> None:
    both = [cond("a", "equals", 1), cond("b", "equals", 2)]
    await make_rule(store, "demo.all", conditions=both, condition="all")
    await make_rule(store, "demo.any", conditions=both, condition="any")

    async def fired(payload: dict[str, Any]) -> list[str]:
        return sorted(e.rule_ref for e in (await one(store, NewEvent(HOOK, payload))).enforcements)

    assert await fired({"a": 1, "b": 2}) == ["demo.all", "demo.any"]
    assert await fired({"a": 1, "b": 0}) == ["demo.any"]
    assert await fired({"a": 0, "b": 0}) == []


@pytest.mark.usefixtures("triggers")
@pytest.mark.parametrize(
    ("condition", "payload", "fires"),
    [
        (cond("body.action", "equals", "push"), {"body": {"action": "push"}}, True),
        (cond("body.action", "equals", "push"), {"body": {"action": "pull"}}, False),
        (cond("n", "equals", 1), {"n": True}, False),
        (cond("body.action", "not_equals", "push"), {"body": {"action": "pull"}}, True),
        (cond("body.action", "not_equals", "push"), {"body": {"action": "push"}}, False),
        (cond("body.action", "not_equals", "push"), {}, True),
        (cond("ref", "contains", "heads/"), {"ref": "refs/heads/main"}, True),
        (cond("ref", "contains", "tags/"), {"ref": "refs/heads/main"}, False),
        (cond("labels", "contains", "bug"), {"labels": ["bug", "ui"]}, True),
        (cond("labels", "contains", "doc"), {"labels": ["bug", "ui"]}, False),
        (cond("headers", "contains", "X-Sig"), {"headers": {"X-Sig": "abc"}}, True),
        (cond("headers", "contains", "abc"), {"headers": {"X-Sig": "abc"}}, False),
        (cond("items.1.id", "equals", 7), {"items": [{"id": 1}, {"id": 7}]}, True),
    ],
)
async def test_condition_operators(
    store: Store, condition: dict[str, Any], payload: dict[str, Any], fires: bool
) -> None:
    await make_rule(store, "demo.cond", conditions=[condition])
    created = await one(store, NewEvent(HOOK, payload))
    assert [e.rule_ref for e in created.enforcements] == (["demo.cond"] if fires else [])


@pytest.mark.usefixtures("triggers")
async def test_targeted_rule_is_the_only_one_evaluated(store: Store) -> None:
    target = await make_rule(store, "demo.target", conditions=[cond("x", "equals", 1)])
    await make_rule(store, "demo.other")
    created = await one(store, NewEvent(HOOK, {"x": 1}, rule_ref="demo.target"))
    assert [(e.rule, e.rule_ref) for e in created.enforcements] == [(target.id, "demo.target")]
    # Its conditions still apply.
    miss = await one(store, NewEvent(HOOK, {"x": 2}, rule_ref="demo.target"))
    assert miss.enforcements == []


@pytest.mark.usefixtures("triggers")
async def test_disabled_targeted_rule_produces_no_enforcement(store: Store, conn: asyncpg.Connection) -> None:
    await make_rule(store, "demo.target", enabled=False)
    await make_rule(store, "demo.other")
    created = await one(store, NewEvent(HOOK, {}, rule_ref="demo.target"))
    assert created.enforcements == []
    assert created.event.rule_ref == "demo.target"
    assert await count(conn, "enforcement") == 0
    assert await count(conn, "event") == 1


async def test_unknown_trigger_is_not_found(store: Store, conn: asyncpg.Connection) -> None:
    with pytest.raises(NotFound, match=r"trigger core\.nothing not found"):
        await one(store, NewEvent("core.nothing", {}))
    assert await count(conn, "event") == 0


@pytest.mark.usefixtures("triggers")
async def test_unknown_targeted_rule_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match=r"rule demo\.ghost not found"):
        await one(store, NewEvent(HOOK, {}, rule_ref="demo.ghost"))


@pytest.mark.usefixtures("triggers")
async def test_targeted_rule_of_another_trigger_is_invalid(store: Store, conn: asyncpg.Connection) -> None:
    await make_rule(store, "demo.timer", TIMER)
    with pytest.raises(InvalidArgument) as info:
        await one(store, NewEvent(HOOK, {}, rule_ref="demo.timer"))
    assert info.value.violations == [("event.rule_ref", f"rule demo.timer watches {TIMER}, not {HOOK}")]
    assert await count(conn, "event") == 0


# ---- templates ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("triggers")
async def test_action_params_are_rendered_into_the_enforcement_config(store: Store) -> None:
    params = {
        "count": "{{ event.payload.n }}",
        "obj": "{{ event.payload.obj }}",
        "msg": "n={{ event.payload.n }} by {{ event.payload.who }}",
        "missing_whole": "{{ event.payload.gone }}",
        "missing_mixed": "[{{ event.payload.gone }}]",
        "event_id": "{{ event.id }}",
        "created": "{{ event.created }}",
        "trigger": "{{ event.trigger }}",
        "rule": "{{ rule.ref }}",
        "nested": {"list": ["{{ event.payload.flag }}", "static"]},
    }
    await make_rule(store, "demo.tpl", params=params)
    created = await one(store, NewEvent(HOOK, {"n": 3, "obj": {"k": [1]}, "who": "ann", "flag": False}))
    [enf] = created.enforcements
    ev = created.event
    assert enf.config == {
        "count": 3,
        "obj": {"k": [1]},
        "msg": "n=3 by ann",
        "missing_whole": None,
        "missing_mixed": "[]",
        "event_id": ev.id,
        "created": ev.created.isoformat(),
        "trigger": HOOK,
        "rule": "demo.tpl",
        "nested": {"list": [False, "static"]},
    }
    assert datetime.fromisoformat(enf.config["created"]) == ev.created
    assert (await store.enforcements.get(enf.id)).config == enf.config


# ---- idempotency --------------------------------------------------------------------------------


@pytest.mark.usefixtures("triggers")
async def test_same_request_id_replays_the_stored_result(store: Store, conn: asyncpg.Connection) -> None:
    await make_rule(store, "demo.a")
    await make_rule(store, "demo.b")
    first = await one(store, NewEvent(HOOK, {"x": 1}, request_id="req-1"))
    again = await one(store, NewEvent(HOOK, {"x": 1}, request_id="req-1"))
    assert first.replayed is False and again.replayed is True
    assert again.event == first.event
    assert sorted(e.id for e in again.enforcements) == sorted(e.id for e in first.enforcements)
    assert len(first.enforcements) == 2
    assert await count(conn, "event") == 1
    assert await count(conn, "enforcement") == 2
    assert await count(conn, "ingest_request") == 1


@pytest.mark.usefixtures("triggers")
async def test_same_request_id_with_a_different_payload_is_refused(store: Store, conn: asyncpg.Connection) -> None:
    await one(store, NewEvent(HOOK, {"x": 1}, request_id="req-1"))
    with pytest.raises(InvalidArgument) as info:
        await one(store, NewEvent(HOOK, {"x": 2}, request_id="req-1"))
    assert info.value.violations[0][0] == "event.request_id"
    assert "already used for a different event" in info.value.violations[0][1]
    assert await count(conn, "event") == 1


@pytest.mark.usefixtures("triggers")
async def test_request_id_repeated_inside_one_batch(store: Store, conn: asyncpg.Connection) -> None:
    results = await store.events.create_many(
        [NewEvent(HOOK, {"x": 1}, request_id="k"), NewEvent(HOOK, {"x": 1}, request_id="k")], many=True
    )
    assert results[0].event == results[1].event
    assert (results[0].replayed, results[1].replayed) == (False, True)
    assert await count(conn, "event") == 1
    with pytest.raises(InvalidArgument) as info:
        await store.events.create_many(
            [NewEvent(HOOK, {"x": 1}, request_id="j"), NewEvent(HOOK, {"x": 2}, request_id="j")], many=True
        )
    assert info.value.violations[0][0] == "events[1].request_id"
    assert await count(conn, "event") == 1


@pytest.mark.usefixtures("triggers")
async def test_a_batch_whose_replay_is_gone_stores_nothing(store: Store, conn: asyncpg.Connection) -> None:
    """A key whose event retention has since removed fails its batch before anything is
    written: the api stores the events of separate CreateEvent calls in one batch and, when
    it fails, each again on its own, so an event written by the failed batch would be stored
    twice and answered once."""
    gone = (await one(store, NewEvent(HOOK, {"x": 1}, request_id="old"))).event
    await conn.execute("DELETE FROM event WHERE id = $1", gone.id)
    with pytest.raises(NotFound, match=f"event {gone.id} of request old no longer exists"):
        await store.events.create_many(
            [NewEvent(HOOK, {"fresh": True}), NewEvent(HOOK, {"x": 1}, request_id="old")], many=True
        )
    assert await count(conn, "event") == 0


@pytest.mark.usefixtures("triggers")
async def test_concurrent_requests_with_one_request_id_store_one_event(store: Store, conn: asyncpg.Connection) -> None:
    await make_rule(store, "demo.a")
    results = await asyncio.gather(*(one(store, NewEvent(HOOK, {"x": 1}, request_id="same")) for _ in range(8)))
    assert len({r.event.id for r in results}) == 1
    assert [r.replayed for r in results].count(False) == 1
    assert {tuple(e.id for e in r.enforcements) for r in results} == {(results[0].enforcements[0].id,)}
    assert await count(conn, "event") == 1
    assert await count(conn, "enforcement") == 1


# ---- immutability and soft references -----------------------------------------------------------


@pytest.mark.usefixtures("triggers")
async def test_updating_an_event_is_refused_by_the_database(store: Store, conn: asyncpg.Connection) -> None:
    ev = (await one(store, NewEvent(HOOK, {"x": 1}))).event
    with pytest.raises(asyncpg.RestrictViolationError, match="immutable"):
        await conn.execute("UPDATE event SET payload = '{\"x\": 2}' WHERE id = $1", ev.id)
    with pytest.raises(asyncpg.RestrictViolationError):
        await conn.execute("UPDATE event SET trigger_ref = 'core.timer' WHERE id = $1", ev.id)
    with pytest.raises(asyncpg.RestrictViolationError):
        await conn.execute("UPDATE event SET trigger = trigger + 1000 WHERE id = $1", ev.id)
    assert await store.events.get(ev.id) == ev


@pytest.mark.usefixtures("triggers")
async def test_deleting_a_trigger_or_rule_unsets_the_event_reference(store: Store, conn: asyncpg.Connection) -> None:
    await make_rule(store, "demo.target")
    ev = (await one(store, NewEvent(HOOK, {}, rule_ref="demo.target"))).event
    assert ev.trigger is not None and ev.rule is not None
    await store.rules.delete_rule("demo.target")
    await store.rules.delete_trigger(HOOK)
    stored = await store.events.get(ev.id)
    assert (stored.trigger, stored.rule) == (None, None)
    assert (stored.trigger_ref, stored.rule_ref, stored.payload) == (HOOK, "demo.target", {})


@pytest.mark.usefixtures("triggers")
async def test_deleting_an_event_keeps_its_enforcements(store: Store, conn: asyncpg.Connection) -> None:
    await make_rule(store, "demo.a")
    created = await one(store, NewEvent(HOOK, {}))
    [enf] = created.enforcements
    await conn.execute("DELETE FROM event WHERE id = $1", created.event.id)
    with pytest.raises(NotFound):
        await store.events.get(created.event.id)
    kept = await store.enforcements.get(enf.id)
    assert kept.event == created.event.id


@pytest.mark.usefixtures("triggers")
async def test_event_creation_notifies_listeners(store: Store, conn: asyncpg.Connection) -> None:
    received: list[str] = []
    await conn.add_listener("event_created", lambda *args: received.append(args[3]))
    ev = (await one(store, NewEvent(HOOK, {}))).event

    async def got() -> bool:
        return any(f'"id" : {ev.id}' in r for r in received)

    from tests.helpers import eventually

    await eventually(got, what="event_created notification")
    assert f'"trigger_ref" : "{HOOK}"' in received[0]


@pytest.mark.usefixtures("triggers")
async def test_list_pages_read_back_what_get_reads(store: Store) -> None:
    """List pages decode their JSON columns from text, a page at a time; reads by id go through
    the connection's codec. Both must give the same rows, column for column."""
    await make_rule(store, "demo.echo", conditions=[cond("n", "greaterthan", 0)], params={"n": "{{ event.payload.n }}"})
    payloads: list[dict[str, Any]] = [
        {"n": 1, "text": 'quote " backslash \\ newline \n tab \t', "unicode": "é 中文 🚀 \u2028"},
        {"n": 2, "nested": {"list": [1, "two", None, True, 2.5, [], {}], "deep": {"a": {"b": [{"c": None}]}}}},
        {"n": 3, "big": 2**53 + 1, "neg": -1.5e-7, "tiny": 5e-324, "empty": ""},
        {},
    ]
    configs: list[dict[str, Any] | None] = [None, {"k": "v", "n": [1, 2]}, {}, None]
    for payload, config in zip(payloads, configs, strict=True):
        await one(store, NewEvent(HOOK, payload, config=config))

    events = (await store.events.list(100, "")).items
    assert len(events) == 4
    assert events == [await store.events.get(e.id) for e in events]
    assert [e.payload for e in reversed(events)] == payloads
    assert [e.config for e in reversed(events)] == configs

    enforcements = (await store.enforcements.list(100, "")).items
    assert len(enforcements) == 3  # payload.n > 0
    assert enforcements == [await store.enforcements.get(e.id) for e in enforcements]
    assert all(e.conditions == [cond("n", "greaterthan", 0)] for e in enforcements)
    assert [e.config for e in reversed(enforcements)] == [{"n": 1}, {"n": 2}, {"n": 3}]
