"""The enforcement repository and dispatch leases on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.api.store import Enforcement, NewEvent, Resolution, Rule, Store
from shared.errors import FailedPrecondition, InvalidArgument, NotFound

HOOK = "core.webhook"
TIMER = "core.timer"


async def make_rule(
    store: Store,
    ref: str,
    trigger_ref: str = HOOK,
    *,
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
        conditions=[],
        condition="all",
        enabled=enabled,
    )


@pytest.fixture
async def rule(store: Store) -> Rule:
    await store.rules.create_trigger(HOOK, "", "", None, None)
    await store.rules.create_trigger(TIMER, "", "", None, None)
    return await make_rule(store, "demo.rule", params={"who": "{{ event.payload.who }}", "fixed": 1})


async def pending(store: Store, payload: dict[str, Any] | None = None) -> Enforcement:
    """One pending enforcement of demo.rule, made through an event."""
    [created] = await store.events.create_many([NewEvent(HOOK, payload or {"who": "ann"})])
    [enf] = created.enforcements
    return enf


async def count(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    value = await conn.fetchval(sql, *args)
    assert isinstance(value, int)
    return value


# ---- create / get / list ------------------------------------------------------------------------


async def test_create_enforcement_renders_the_rule_params(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    [created] = await store.events.create_many([NewEvent(HOOK, {"who": "bob"})])
    # A caller that matched the rule itself (here: for an event whose rule fired already).
    await conn.execute("DELETE FROM enforcement")
    enf, replayed = await store.enforcements.create(
        rule_ref="demo.rule", event=created.event.id, payload={"who": "bob"}, config=None, request_id=None
    )
    assert replayed is False
    assert (enf.rule, enf.rule_ref, enf.trigger_ref, enf.event) == (rule.id, "demo.rule", HOOK, created.event.id)
    assert enf.config == {"who": "bob", "fixed": 1}
    assert (enf.status, enf.resolved_at, enf.payload, enf.condition, enf.conditions) == (
        "created",
        None,
        {"who": "bob"},
        "all",
        [],
    )
    assert await store.enforcements.get(enf.id) == enf


async def test_create_enforcement_with_explicit_config_stores_it_as_given(store: Store, rule: Rule) -> None:
    enf, _ = await store.enforcements.create(
        rule_ref="demo.rule", event=None, payload={}, config={"raw": "{{ event.payload.who }}"}, request_id=None
    )
    assert enf.config == {"raw": "{{ event.payload.who }}"}
    assert enf.event is None


async def test_create_enforcement_for_unknown_rule_is_not_found(store: Store, rule: Rule) -> None:
    with pytest.raises(NotFound, match=r"rule demo\.ghost not found"):
        await store.enforcements.create(rule_ref="demo.ghost", event=None, payload={}, config=None, request_id=None)


async def test_create_enforcement_with_nonexistent_event_succeeds(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf, replayed = await store.enforcements.create(
        rule_ref="demo.rule", event=987654, payload={"who": "x"}, config=None, request_id=None
    )
    assert replayed is False and enf.event == 987654
    assert await count(conn, "SELECT count(*) FROM event") == 0
    assert (await store.enforcements.get(enf.id)).event == 987654


async def test_delete_event_enforcement_retains_event_id(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    enf = await pending(store)
    assert enf.event is not None
    await conn.execute("DELETE FROM event WHERE id = $1", enf.event)
    assert await count(conn, "SELECT count(*) FROM event") == 0
    assert (await store.enforcements.get(enf.id)).event == enf.event


async def test_second_enforcement_for_same_rule_and_event_is_a_replay(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = await pending(store)
    again, replayed = await store.enforcements.create(
        rule_ref="demo.rule", event=enf.event, payload={"who": "ann"}, config=None, request_id=None
    )
    assert replayed is True and again == enf
    assert await count(conn, "SELECT count(*) FROM enforcement WHERE event = $1", enf.event) == 1


async def test_replay_by_rule_and_event_remembers_the_request_id(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = await pending(store)
    await store.enforcements.create(
        rule_ref="demo.rule", event=enf.event, payload={"who": "ann"}, config=None, request_id="key-1"
    )
    stored = await conn.fetchrow("SELECT entity_id FROM ingest_request WHERE request_id = 'key-1'")
    assert stored is not None and stored["entity_id"] == enf.id


async def test_concurrent_creates_for_same_rule_and_event_store_one(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    results = await asyncio.gather(
        *(
            store.enforcements.create(rule_ref="demo.rule", event=555, payload={}, config=None, request_id=None)
            for _ in range(6)
        )
    )
    assert len({e.id for e, _ in results}) == 1
    assert [r for _, r in results].count(False) == 1
    assert await count(conn, "SELECT count(*) FROM enforcement WHERE event = 555") == 1


async def test_create_enforcement_request_id_replays_and_refuses_reuse(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    first, r1 = await store.enforcements.create(
        rule_ref="demo.rule", event=None, payload={"a": 1}, config=None, request_id="enf-1"
    )
    again, r2 = await store.enforcements.create(
        rule_ref="demo.rule", event=None, payload={"a": 1}, config=None, request_id="enf-1"
    )
    assert (r1, r2) == (False, True) and again == first
    with pytest.raises(InvalidArgument) as info:
        await store.enforcements.create(
            rule_ref="demo.rule", event=None, payload={"a": 2}, config=None, request_id="enf-1"
        )
    assert info.value.violations[0][0] == "request_id"
    assert await count(conn, "SELECT count(*) FROM enforcement") == 1


async def test_get_unknown_enforcement_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="enforcement 424242 not found"):
        await store.enforcements.get(424242)


async def test_list_enforcements_with_filters_and_paging(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    await make_rule(store, "demo.timer", TIMER)
    t0 = datetime(2024, 2, 1, tzinfo=UTC)
    rows = [
        ("demo.rule", HOOK, 1, "created", None, t0),
        ("demo.rule", HOOK, 2, "processed", t0, t0 + timedelta(hours=1)),
        ("demo.timer", TIMER, 3, "disabled", t0, t0 + timedelta(hours=2)),
        ("demo.timer", TIMER, 1, "created", None, t0 + timedelta(hours=3)),
    ]
    ids = [
        await count(
            conn,
            "INSERT INTO enforcement (rule_ref, trigger_ref, event, status, resolved_at, created) "
            "VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            *r,
        )
        for r in rows
    ]
    a, b, c, d = ids

    async def listed(**filters: Any) -> list[int]:
        return [e.id for e in (await store.enforcements.list(100, "", **filters)).items]

    assert await listed() == [d, c, b, a]
    assert await listed(rule_ref="demo.rule") == [b, a]
    assert await listed(trigger_ref=TIMER) == [d, c]
    assert await listed(event=1) == [d, a]
    assert await listed(status="created") == [d, a]
    assert await listed(status="processed") == [b]
    assert await listed(created_from=t0 + timedelta(hours=1), created_to=t0 + timedelta(hours=3)) == [c, b]
    assert await listed(rule_ref="demo.timer", status="created", event=1) == [d]
    first = await store.enforcements.list(3, "")
    second = await store.enforcements.list(3, first.next_token)
    assert [e.id for e in first.items] == [d, c, b] and [e.id for e in second.items] == [a]
    assert second.next_token == ""


# ---- the resolved_at rule ------------------------------------------------------------------------


async def test_check_refuses_a_resolution_without_resolved_at(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = await pending(store)
    with pytest.raises(asyncpg.CheckViolationError, match="enforcement_resolved_at_iff_resolved"):
        await conn.execute("UPDATE enforcement SET status = 'processed' WHERE id = $1", enf.id)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("UPDATE enforcement SET resolved_at = now() WHERE id = $1", enf.id)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO enforcement (rule_ref, trigger_ref, status) VALUES ('a.b', 'c.d', 'disabled')")
    assert (await store.enforcements.get(enf.id)).status == "created"


async def test_enforcement_resolved_at_lifecycle(store: Store, rule: Rule) -> None:
    enf = await pending(store)
    assert enf.status == "created" and enf.resolved_at is None
    resolution = await store.enforcements.resolve(enf.id, "processed")
    resolved = resolution.enforcement
    assert resolved.status == "processed"
    assert resolved.resolved_at is not None and resolved.resolved_at >= resolved.created
    assert resolved.created == enf.created
    assert await store.enforcements.get(enf.id) == resolved


async def test_a_resolved_enforcement_cannot_change_status_again(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = await pending(store)
    await store.enforcements.resolve(enf.id, "disabled")
    with pytest.raises(asyncpg.RestrictViolationError, match="already disabled"):
        await conn.execute("UPDATE enforcement SET status = 'processed', resolved_at = now() WHERE id = $1", enf.id)


# ---- resolve ------------------------------------------------------------------------------------


async def test_resolve_processed_creates_one_execution(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    enf = await pending(store, {"who": "cy"})
    resolution = await store.enforcements.resolve(enf.id, "processed")
    assert resolution.replayed is False
    x = resolution.execution
    assert x is not None
    assert (x.action_ref, x.config, x.enforcement, x.status) == (
        "core.echo",
        {"who": "cy", "fixed": 1},
        enf.id,
        "requested",
    )
    assert await count(conn, "SELECT count(*) FROM execution WHERE enforcement = $1", enf.id) == 1
    assert await store.executions.get(x.id) == x


async def test_resolve_disabled_creates_no_execution(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    enf = await pending(store)
    resolution = await store.enforcements.resolve(enf.id, "disabled")
    assert resolution.execution is None and resolution.replayed is False
    assert resolution.enforcement.status == "disabled" and resolution.enforcement.resolved_at is not None
    assert await count(conn, "SELECT count(*) FROM execution") == 0


@pytest.mark.parametrize("status", ["processed", "disabled"])
async def test_retrying_the_same_resolution_replays_it(
    store: Store, rule: Rule, conn: asyncpg.Connection, status: str
) -> None:
    enf = await pending(store)
    first = await store.enforcements.resolve(enf.id, status)
    again = await store.enforcements.resolve(enf.id, status)
    assert again.replayed is True
    assert again.enforcement == first.enforcement
    assert again.execution == first.execution
    assert await count(conn, "SELECT count(*) FROM execution") == (1 if status == "processed" else 0)


@pytest.mark.parametrize(("first", "second"), [("processed", "disabled"), ("disabled", "processed")])
async def test_a_different_resolution_after_is_already_resolved(
    store: Store, rule: Rule, conn: asyncpg.Connection, first: str, second: str
) -> None:
    enf = await pending(store)
    await store.enforcements.resolve(enf.id, first)
    with pytest.raises(FailedPrecondition) as info:
        await store.enforcements.resolve(enf.id, second)
    assert info.value.reason == "ALREADY_RESOLVED"
    assert f"already {first}" in info.value.message
    assert (await store.enforcements.get(enf.id)).status == first
    assert await count(conn, "SELECT count(*) FROM execution") == (1 if first == "processed" else 0)


async def test_resolve_processed_of_a_disabled_rule_is_refused(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = await pending(store)
    await store.rules.update_rule("demo.rule", {"enabled": False})
    with pytest.raises(FailedPrecondition, match=r"demo\.rule is disabled") as info:
        await store.enforcements.resolve(enf.id, "processed")
    assert info.value.reason == "RULE_NOT_ENABLED"
    stored = await store.enforcements.get(enf.id)
    assert (stored.status, stored.resolved_at) == ("created", None)
    assert await count(conn, "SELECT count(*) FROM execution") == 0
    assert await count(conn, "SELECT count(*) FROM enforcement_dispatch WHERE enforcement = $1", enf.id) == 1
    assert (await store.enforcements.resolve(enf.id, "disabled")).enforcement.status == "disabled"


async def test_resolve_processed_of_a_deleted_rule_is_refused(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = await pending(store)
    await store.rules.delete_rule("demo.rule")
    assert (await store.enforcements.get(enf.id)).rule is None
    with pytest.raises(FailedPrecondition, match=r"demo\.rule was deleted") as info:
        await store.enforcements.resolve(enf.id, "processed")
    assert info.value.reason == "RULE_NOT_ENABLED"
    assert (await store.enforcements.get(enf.id)).status == "created"
    assert await count(conn, "SELECT count(*) FROM execution") == 0


async def test_resolve_processed_of_a_rule_without_action_is_refused(store: Store, rule: Rule) -> None:
    await make_rule(store, "demo.noaction", action_ref=None)
    [created] = await store.events.create_many([NewEvent(HOOK, {"who": "z"})])
    enf = next(e for e in created.enforcements if e.rule_ref == "demo.noaction")
    with pytest.raises(FailedPrecondition, match="has no action") as info:
        await store.enforcements.resolve(enf.id, "processed")
    assert info.value.reason == "RULE_NOT_ENABLED"


async def test_resolve_unknown_enforcement_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="enforcement 31337 not found"):
        await store.enforcements.resolve(31337, "processed")


async def test_concurrent_resolutions_have_exactly_one_winner(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = await pending(store)
    statuses = ["processed", "disabled"] * 5

    async def attempt(status: str) -> Resolution | FailedPrecondition:
        try:
            return await store.enforcements.resolve(enf.id, status)
        except FailedPrecondition as exc:
            return exc

    outcomes = await asyncio.gather(*(attempt(s) for s in statuses))
    winners = [o for o in outcomes if isinstance(o, Resolution) and not o.replayed]
    assert len(winners) == 1
    final = (await store.enforcements.get(enf.id)).status
    assert winners[0].enforcement.status == final
    for status, outcome in zip(statuses, outcomes, strict=True):
        if status == final:
            assert isinstance(outcome, Resolution)
        else:
            assert isinstance(outcome, FailedPrecondition) and outcome.reason == "ALREADY_RESOLVED"
    executions = await count(conn, "SELECT count(*) FROM execution WHERE enforcement = $1", enf.id)
    assert executions == (1 if final == "processed" else 0)


async def test_concurrent_processed_resolutions_make_one_execution(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = await pending(store)
    outcomes = await asyncio.gather(*(store.enforcements.resolve(enf.id, "processed") for _ in range(10)))
    assert [o.replayed for o in outcomes].count(False) == 1
    assert len({o.execution.id for o in outcomes if o.execution is not None}) == 1
    assert all(o.execution is not None for o in outcomes)
    assert await count(conn, "SELECT count(*) FROM execution") == 1


async def test_resolution_notifies_with_resolved_at(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    from tests.helpers import eventually

    received: list[str] = []
    await conn.add_listener("enforcement_resolved", lambda *args: received.append(args[3]))
    enf = await pending(store)
    await store.enforcements.resolve(enf.id, "disabled")

    async def got() -> bool:
        return bool(received)

    await eventually(got, what="enforcement_resolved notification")
    assert f'"id" : {enf.id}' in received[0]
    assert '"status" : "disabled"' in received[0]
    assert '"resolved_at" : "' in received[0] and "updated" not in received[0]


# ---- dispatch -----------------------------------------------------------------------------------


async def dispatch_row(conn: asyncpg.Connection, enforcement: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM enforcement_dispatch WHERE enforcement = $1", enforcement)


async def test_dispatch_row_exists_exactly_while_pending(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    enf = await pending(store)
    row = await dispatch_row(conn, enf.id)
    assert row is not None
    assert (row["enforcement_created"], row["rule_ref"], row["trigger_ref"], row["attempts"]) == (
        enf.created,
        "demo.rule",
        HOOK,
        0,
    )
    await store.enforcements.resolve(enf.id, "processed")
    assert await dispatch_row(conn, enf.id) is None
    # A raw insert of a resolved enforcement gets no dispatch row.
    done = await count(
        conn,
        "INSERT INTO enforcement (rule_ref, trigger_ref, status, resolved_at) "
        "VALUES ('demo.rule', 'core.webhook', 'disabled', now()) RETURNING id",
    )
    assert await dispatch_row(conn, done) is None


async def claim(store: Store, executor: str, token: str, limit: int = 10, **kw: Any) -> list[int]:
    deliveries = await store.dispatch.claim(
        executor_id=executor,
        token=token,
        limit=limit,
        lease_s=kw.pop("lease_s", 60.0),
        max_attempts=kw.pop("max_attempts", 5),
        **kw,
    )
    return [d.enforcement.id for d in deliveries]


async def expire_leases(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "UPDATE enforcement_dispatch SET lease_expires_at = now() - interval '1 second' WHERE leased_by IS NOT NULL"
    )


async def test_claim_hands_out_oldest_first_with_a_lease(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    ids = [(await pending(store)).id for _ in range(3)]
    deliveries = await store.dispatch.claim(executor_id="ex-a", token="tok-a", limit=2, lease_s=30, max_attempts=5)
    assert [d.enforcement.id for d in deliveries] == ids[:2]
    assert [d.attempt for d in deliveries] == [1, 1]
    assert all(d.enforcement.status == "created" for d in deliveries)
    db_now = await conn.fetchval("SELECT now()")
    assert all(d.lease_expires_at > db_now for d in deliveries)
    row = await dispatch_row(conn, ids[0])
    assert row is not None and (row["leased_by"], row["lease_token"], row["attempts"]) == ("ex-a", "tok-a", 1)
    # Leased rows are not handed out again while the lease lives.
    assert await claim(store, "ex-b", "tok-b") == [ids[2]]
    assert await claim(store, "ex-c", "tok-c") == []


async def test_concurrent_claims_never_share_an_enforcement(store: Store, rule: Rule) -> None:
    ids = {(await pending(store)).id for _ in range(12)}
    results = await asyncio.gather(*(claim(store, f"ex-{i}", f"tok-{i}", limit=5) for i in range(4)))
    claimed = [i for r in results for i in r]
    assert len(claimed) == len(set(claimed))
    assert set(claimed) == ids


async def test_claim_filters_by_rule_and_trigger(store: Store, rule: Rule) -> None:
    await make_rule(store, "demo.timer", TIMER)
    hook = await pending(store)
    [timer_event] = await store.events.create_many([NewEvent(TIMER, {})])
    timer = timer_event.enforcements[0].id
    assert await claim(store, "ex", "t1", rule_refs=["demo.timer"]) == [timer]
    assert await claim(store, "ex", "t2", trigger_refs=[TIMER]) == []
    assert await claim(store, "ex", "t3", trigger_refs=[HOOK], rule_refs=["demo.rule"]) == [hook.id]


async def test_renew_extends_only_the_leases_of_the_stream(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    a = (await pending(store)).id
    b = (await pending(store)).id
    assert await claim(store, "ex-a", "tok-a", limit=1) == [a]
    assert await claim(store, "ex-b", "tok-b", limit=1) == [b]
    await expire_leases(conn)
    assert await store.dispatch.renew("tok-a", 60) == {a}
    assert await store.dispatch.renew("tok-unknown", 60) == set()
    # b's lease lapsed and was not renewed: another stream gets it.
    assert await claim(store, "ex-c", "tok-c") == [b]
    row = await dispatch_row(conn, b)
    assert row is not None and row["attempts"] == 2 and row["last_error"] == "lease of ex-b expired"


async def test_release_stream_returns_everything_at_once(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    ids = [(await pending(store)).id for _ in range(2)]
    assert await claim(store, "ex-a", "tok-a") == ids
    await store.dispatch.release_stream("tok-a", "stream closed")
    row = await dispatch_row(conn, ids[0])
    assert row is not None
    assert (row["leased_by"], row["lease_token"], row["lease_expires_at"], row["last_error"]) == (
        None,
        None,
        None,
        "stream closed",
    )
    assert await claim(store, "ex-b", "tok-b") == ids


async def test_release_one_requires_the_holder(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    enf = (await pending(store)).id
    assert await claim(store, "ex-a", "tok-a") == [enf]
    assert await store.dispatch.release(enf, "ex-b", "not mine") is False
    assert await claim(store, "ex-b", "tok-b") == []
    assert await store.dispatch.release(enf, "ex-a", "could not decide") is True
    row = await dispatch_row(conn, enf)
    assert row is not None and row["last_error"] == "could not decide" and row["leased_by"] is None
    assert await claim(store, "ex-b", "tok-b") == [enf]


async def test_out_of_attempts_is_exhausted_and_retry_resets(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = (await pending(store)).id
    for n in range(2):
        assert await claim(store, f"ex-{n}", f"tok-{n}", max_attempts=2) == [enf]
        await expire_leases(conn)
    assert await claim(store, "ex-x", "tok-x", max_attempts=2) == []
    assert await store.dispatch.exhaust(2) == [enf]
    assert await store.dispatch.exhaust(2) == []
    state = await store.dispatch.state(10)
    assert (state.pending, state.waiting, state.exhausted_count) == (1, 0, 1)
    [ex] = state.exhausted
    assert (ex.id, ex.rule_ref, ex.attempts, ex.last_error) == (enf, "demo.rule", 2, "lease of ex-1 expired")
    # Exhausted rows are not offered even with more attempts allowed.
    assert await claim(store, "ex-y", "tok-y", max_attempts=10) == []
    await store.dispatch.retry(enf)
    row = await dispatch_row(conn, enf)
    assert row is not None and (row["attempts"], row["exhausted_at"]) == (0, None)
    assert await claim(store, "ex-z", "tok-z", max_attempts=2) == [enf]


async def test_exhaust_leaves_live_leases_alone(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    enf = (await pending(store)).id
    assert await claim(store, "ex-a", "tok-a", max_attempts=1) == [enf]
    assert await store.dispatch.exhaust(1) == []
    await expire_leases(conn)
    assert await store.dispatch.exhaust(1) == [enf]


async def test_retry_of_a_pending_or_unknown_enforcement(store: Store, rule: Rule) -> None:
    enf = await pending(store)
    with pytest.raises(FailedPrecondition) as info:
        await store.dispatch.retry(enf.id)
    assert info.value.reason == "NOT_EXHAUSTED"
    await store.enforcements.resolve(enf.id, "disabled")
    with pytest.raises(NotFound, match="not pending"):
        await store.dispatch.retry(enf.id)


async def test_dispatch_state_counts_leases_and_waiting(store: Store, rule: Rule) -> None:
    ids = [(await pending(store)).id for _ in range(4)]
    first = await store.enforcements.get(ids[0])
    assert await claim(store, "ex-a", "tok-a", limit=2) == ids[:2]
    assert await claim(store, "ex-b", "tok-b", limit=1) == ids[2:3]
    state = await store.dispatch.state(10)
    assert (state.pending, state.waiting, state.exhausted_count, state.exhausted) == (4, 1, 0, [])
    assert state.leases == [("ex-a", 2), ("ex-b", 1)]
    assert state.oldest_pending_created == first.created


async def test_resolving_a_leased_enforcement_removes_its_dispatch_row(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = (await pending(store)).id
    assert await claim(store, "ex-a", "tok-a") == [enf]
    await store.enforcements.resolve(enf, "processed")
    assert await dispatch_row(conn, enf) is None
    assert await store.dispatch.renew("tok-a", 30) == set()


async def test_purge_requests_forgets_only_old_keys(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    await store.events.create_many([NewEvent(HOOK, {}, request_id="fresh")])
    await conn.execute(
        "INSERT INTO ingest_request (kind, request_id, fingerprint, entity_id, entity_created, created) "
        "VALUES ('event', 'old', 'f', 1, now(), now() - interval '49 hours')"
    )
    assert await store.dispatch.purge_requests(48) == 1
    assert [r["request_id"] for r in await conn.fetch("SELECT request_id FROM ingest_request")] == ["fresh"]


async def test_deleting_a_pending_enforcement_removes_its_dispatch_row(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    enf = (await pending(store)).id
    await conn.execute("DELETE FROM enforcement WHERE id = $1", enf)
    assert await dispatch_row(conn, enf) is None
    assert (await store.dispatch.state(10)).pending == 0


async def test_dispatch_rows_of_enforcements_dropped_without_triggers_are_purged(
    store: Store, rule: Rule, conn: asyncpg.Connection
) -> None:
    old = await pending(store)
    recent = await pending(store)
    # What retention's drop_chunks does: remove the rows without firing DELETE triggers (as a
    # replica session: TimescaleDB refuses DISABLE TRIGGER on a hypertable).
    await conn.execute(
        "UPDATE enforcement_dispatch SET enforcement_created = now() - interval '100 days' WHERE enforcement = $1",
        old.id,
    )
    await conn.execute("SET session_replication_role = replica")
    await conn.execute("DELETE FROM enforcement WHERE id = $1", old.id)
    await conn.execute("RESET session_replication_role")
    assert await store.dispatch.purge_orphans() == [old.id]
    remaining = await conn.fetch("SELECT enforcement FROM enforcement_dispatch ORDER BY 1")
    assert [r["enforcement"] for r in remaining] == [recent.id]


async def test_the_dispatch_table_is_vacuumed_on_demand(store: Store, rule: Rule, conn: asyncpg.Connection) -> None:
    enforcement, _ = await store.enforcements.create(
        rule_ref=rule.ref, event=None, payload={}, config=None, request_id=None
    )
    await store.enforcements.resolve(enforcement.id, "disabled")
    count_sql = "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'enforcement_dispatch'"
    before = await conn.fetchval(count_sql)
    await store.dispatch.vacuum()
    assert await conn.fetchval(count_sql) == before + 1
