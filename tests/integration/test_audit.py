"""The audit trail: every change through the api is recorded with its principal, RPC and change,
in the same transaction as the change; ListAuditRecords filters and pages it; rules and triggers
name who changed them last."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format

from services.api import convert
from services.api.server import ApiServer
from services.api.store import Actor, NewEvent, Store
from shared.errors import AlreadyExists, FailedPrecondition, NotFound
from shared.gen.automation.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    condition_pb2,
    enforcement_pb2,
    event_pb2,
    rule_pb2,
)
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel, field_violations, new_event, rpc_error, rule, struct

OPERATOR = "test-operator"
"""The principal of the tests' channels (tests/helpers.py stores a token per role)."""
RULES = "automation.v1.RuleService/"
HOOK = "demo.hook"
EQUALS = condition_pb2.CONDITION_OPERATOR_EQUALS


@pytest.fixture
def audit(stubs: Stubs) -> audit_pb2_grpc.AuditServiceAsyncStub:
    return audit_pb2_grpc.AuditServiceStub(stubs.channel)


async def records(audit: audit_pb2_grpc.AuditServiceAsyncStub, **filters: Any) -> list[audit_pb2.AuditRecord]:
    """Every record the filters select, newest first, read page by page."""
    out: list[audit_pb2.AuditRecord] = []
    token = ""
    while True:
        page = await audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(page_token=token, **filters))
        out.extend(page.records)
        if not page.next_page_token:
            return out
        token = page.next_page_token


def summary(r: audit_pb2.AuditRecord) -> tuple[str, str, str, int | None, str, dict[str, Any]]:
    entity_id = r.entity_id if r.HasField("entity_id") else None
    return (r.principal, r.rpc, r.entity_type, entity_id, r.entity_ref, json_format.MessageToDict(r.change))


async def make_trigger(stubs: Stubs, ref: str = HOOK, **kw: Any) -> rule_pb2.Trigger:
    return await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=ref, **kw)))


async def make_rule(stubs: Stubs, msg: rule_pb2.Rule) -> rule_pb2.Rule:
    return await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=msg))


async def update_rule(stubs: Stubs, msg: rule_pb2.Rule, *paths: str) -> rule_pb2.Rule:
    return await stubs.rules.UpdateRule(
        rule_pb2.UpdateRuleRequest(rule=msg, update_mask=field_mask_pb2.FieldMask(paths=list(paths)))
    )


async def exhausted_enforcement(stubs: Stubs, conn: asyncpg.Connection) -> int:
    """A pending enforcement of the rules on HOOK, marked out of attempts."""
    created = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(HOOK, {"n": 1})))
    (enforcement,) = created.enforcements
    await conn.execute(
        "UPDATE enforcement_dispatch SET exhausted_at = now(), attempts = 3, last_error = 'backend down' "
        "WHERE enforcement = $1",
        enforcement.id,
    )
    return enforcement.id


# ---- what each audited RPC records --------------------------------------------------------------


async def test_each_audited_rpc_records_its_principal_rpc_entity_and_change(
    stubs: Stubs, audit: audit_pb2_grpc.AuditServiceAsyncStub, conn: asyncpg.Connection
) -> None:
    before = await conn.fetchval("SELECT now()")
    trigger = await make_trigger(stubs, label="Hook", param_schema=struct({"type": "object"}))
    created = await make_rule(stubs, rule("demo.a", HOOK, conditions=[("n", EQUALS, 1)]))
    changed = rule_pb2.Rule(ref="demo.a", label="A", description="", action_params=struct({"x": 1}))
    await update_rule(stubs, changed, "label", "description", "action_params")
    enforcement = await exhausted_enforcement(stubs, conn)
    await stubs.enforcements.RetryEnforcement(enforcement_pb2.RetryEnforcementRequest(id=enforcement))
    await stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(ref="demo.a"))
    await stubs.rules.DeleteTrigger(rule_pb2.DeleteTriggerRequest(id=trigger.id))

    found = await records(audit)
    assert [summary(r) for r in reversed(found)] == [
        (
            OPERATOR,
            RULES + "CreateTrigger",
            "trigger",
            trigger.id,
            HOOK,
            {
                "ref": HOOK,
                "label": "Hook",
                "description": "",
                "param_schema": {"type": "object"},
                "out_schema": None,
                "schema_mode": "off",
                "webhook_enabled": False,
                "webhook_signed": False,
            },
        ),
        (
            OPERATOR,
            RULES + "CreateRule",
            "rule",
            created.id,
            "demo.a",
            {
                "ref": "demo.a",
                "label": "",
                "description": "",
                "trigger_ref": HOOK,
                "action_ref": "core.echo",
                "action_params": {},
                "conditions": [{"field": "n", "operator": "equals", "value": 1}],
                "condition": "all",
                "enabled": True,
                "backstop": False,
            },
        ),
        # Only the fields whose value changed: description was named but given the same value.
        (
            OPERATOR,
            RULES + "UpdateRule",
            "rule",
            created.id,
            "demo.a",
            {"label": {"old": "", "new": "A"}, "action_params": {"old": {}, "new": {"x": 1}}},
        ),
        (
            OPERATOR,
            "automation.v1.EnforcementService/RetryEnforcement",
            "enforcement",
            enforcement,
            "",
            {"enforcement": enforcement, "rule_ref": "demo.a", "attempts": 3, "last_error": "backend down"},
        ),
        (OPERATOR, RULES + "DeleteRule", "rule", created.id, "demo.a", {"id": created.id, "ref": "demo.a"}),
        (OPERATOR, RULES + "DeleteTrigger", "trigger", trigger.id, HOOK, {"id": trigger.id, "ref": HOOK}),
    ]
    times = [convert.from_ts(r.time) for r in found]
    assert times == sorted(times, reverse=True)
    assert all(before <= t <= before + timedelta(minutes=1) for t in times)
    assert [r.id for r in found] == sorted((r.id for r in found), reverse=True)


async def test_failed_or_refused_changes_record_nothing(
    stubs: Stubs, audit: audit_pb2_grpc.AuditServiceAsyncStub, conn: asyncpg.Connection
) -> None:
    await make_trigger(stubs)
    await make_rule(stubs, rule("demo.a", HOOK))
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 2
    failing: list[tuple[Callable[[], Awaitable[Any]], grpc.StatusCode]] = [
        # Refused by validation, before the store.
        (lambda: make_rule(stubs, rule("demo.b", HOOK, action_ref="Not A Ref")), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda: update_rule(stubs, rule_pb2.Rule(ref="demo.a", label="x" * 5000), "label"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        # Refused by the store, inside the transaction that would have recorded it.
        (lambda: make_rule(stubs, rule("demo.b", "demo.missing")), grpc.StatusCode.NOT_FOUND),
        (lambda: make_rule(stubs, rule("demo.a", HOOK)), grpc.StatusCode.ALREADY_EXISTS),
        (lambda: make_trigger(stubs), grpc.StatusCode.ALREADY_EXISTS),
        (lambda: update_rule(stubs, rule_pb2.Rule(ref="demo.missing", label="x"), "label"), grpc.StatusCode.NOT_FOUND),
        (
            lambda: update_rule(stubs, rule("demo.missing", HOOK, conditions=[("a", EQUALS, 1)]), "conditions"),
            grpc.StatusCode.NOT_FOUND,
        ),
        (lambda: stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(ref="demo.missing")), grpc.StatusCode.NOT_FOUND),
        (lambda: stubs.rules.DeleteTrigger(rule_pb2.DeleteTriggerRequest(id=987654)), grpc.StatusCode.NOT_FOUND),
        (
            lambda: stubs.enforcements.RetryEnforcement(enforcement_pb2.RetryEnforcementRequest(id=987654)),
            grpc.StatusCode.NOT_FOUND,
        ),
    ]
    for call, code in failing:
        await rpc_error(call(), code)
    # A pending enforcement that is not exhausted cannot be retried.
    created = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(HOOK)))
    await rpc_error(
        stubs.enforcements.RetryEnforcement(enforcement_pb2.RetryEnforcementRequest(id=created.enforcements[0].id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert [r.rpc for r in await records(audit)] == [RULES + "CreateRule", RULES + "CreateTrigger"]


async def test_rules_and_triggers_name_who_changed_them_last(stubs: Stubs, api: ApiServer) -> None:
    trigger = await make_trigger(stubs)
    assert trigger.updated_by == OPERATOR
    assert (await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=HOOK))).updated_by == OPERATOR
    created = await make_rule(stubs, rule("demo.a", HOOK))
    assert created.updated_by == OPERATOR
    # Written without an actor (not through the api): who is not known.
    assert api.store is not None
    await api.store.rules.create_rule(
        ref="demo.b",
        label="",
        description="",
        trigger_ref=HOOK,
        action_ref=None,
        action_params={},
        conditions=[],
        condition="all",
        enabled=True,
    )
    listed = await stubs.rules.ListRules(rule_pb2.ListRulesRequest())
    assert {r.ref: (r.updated_by if r.HasField("updated_by") else None) for r in listed.rules} == {
        "demo.a": OPERATOR,
        "demo.b": None,
    }
    updated = await update_rule(stubs, rule_pb2.Rule(ref="demo.b", enabled=False), "enabled")
    assert updated.HasField("updated_by") and updated.updated_by == OPERATOR
    assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.b"))).updated_by == OPERATOR


# ---- listing ---------------------------------------------------------------------------------


T0 = datetime.fromisoformat("2030-01-01T00:00:00+00:00")


@pytest.fixture
async def trail(conn: asyncpg.Connection) -> list[int]:
    """Eight records, one minute apart from T0 (ids in time order)."""
    rows = [
        ("alice", RULES + "CreateTrigger", "trigger", 1, HOOK),
        ("alice", RULES + "CreateRule", "rule", 1, "demo.a"),
        ("bob", RULES + "UpdateRule", "rule", 1, "demo.a"),
        ("bob", RULES + "CreateRule", "rule", 2, "demo.b"),
        ("alice", "automation.v1.EnforcementService/RetryEnforcement", "enforcement", 7, None),
        ("carol", "automation.v1.TokenService/CreateToken", "token", 3, "ci-bot"),
        ("bob", RULES + "DeleteRule", "rule", 1, "demo.a"),
        ("alice", RULES + "UpdateRule", "rule", 2, "demo.b"),
    ]
    ids = []
    for i, (principal, rpc, entity_type, entity_id, entity_ref) in enumerate(rows):
        ids.append(
            await conn.fetchval(
                "INSERT INTO audit_log (time, principal, rpc, entity_type, entity_id, entity_ref, change) "
                "VALUES ($1, $2, $3, $4, $5, $6, '{}') RETURNING id",
                T0 + timedelta(minutes=i),
                principal,
                rpc,
                entity_type,
                entity_id,
                entity_ref,
            )
        )
    return ids


def time_range(start: int | None = None, end: int | None = None) -> common_pb2.TimeRange:
    """Minutes after T0."""
    r = common_pb2.TimeRange()
    if start is not None:
        r.start.CopyFrom(convert.ts(T0 + timedelta(minutes=start)))
    if end is not None:
        r.end.CopyFrom(convert.ts(T0 + timedelta(minutes=end)))
    return r


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, [7, 6, 5, 4, 3, 2, 1, 0]),
        ({"entity_type": "rule"}, [7, 6, 3, 2, 1]),
        ({"entity_type": "rule", "entity_ref": "demo.a"}, [6, 2, 1]),
        ({"entity_type": "rule", "entity_id": 2}, [7, 3]),
        ({"entity_type": "enforcement", "entity_id": 7}, [4]),
        ({"entity_type": "token", "entity_ref": "ci-bot"}, [5]),
        ({"principal": "bob"}, [6, 3, 2]),
        ({"principal": "alice", "entity_type": "rule"}, [7, 1]),
        ({"rpc": RULES + "UpdateRule"}, [7, 2]),
        ({"rpc": RULES + "UpdateRule", "principal": "bob"}, [2]),
        ({"time": time_range(2, 5)}, [4, 3, 2]),
        ({"time": time_range(start=6)}, [7, 6]),
        ({"time": time_range(end=1)}, [0]),
        ({"principal": "alice", "time": time_range(1, 7)}, [4, 1]),
        ({"principal": "nobody"}, []),
        ({"entity_type": "trigger", "entity_ref": "demo.a"}, []),
    ],
)
async def test_list_filters_combine(
    audit: audit_pb2_grpc.AuditServiceAsyncStub, trail: list[int], filters: dict[str, Any], expected: list[int]
) -> None:
    assert [r.id for r in await records(audit, **filters)] == [trail[i] for i in expected]
    # The same, two at a time.
    assert [r.id for r in await records(audit, page_size=2, **filters)] == [trail[i] for i in expected]
    # The count covers every page, whatever the page size.
    counted = await audit.ListAuditRecords(
        audit_pb2.ListAuditRecordsRequest(page_size=1, count_matching=True, **filters)
    )
    assert (counted.matching_count, counted.matching_count_more, counted.matching_count_stopped) == (
        len(expected),
        False,
        False,
    )


async def test_list_pages_newest_first_with_tokens_bound_to_their_filters(
    audit: audit_pb2_grpc.AuditServiceAsyncStub, trail: list[int]
) -> None:
    first = await audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(page_size=2, entity_type="rule"))
    assert [r.id for r in first.records] == [trail[7], trail[6]]
    assert first.next_page_token
    second = await audit.ListAuditRecords(
        audit_pb2.ListAuditRecordsRequest(page_size=2, entity_type="rule", page_token=first.next_page_token)
    )
    assert [r.id for r in second.records] == [trail[3], trail[2]]
    for other in (
        audit_pb2.ListAuditRecordsRequest(page_size=2, page_token=first.next_page_token),
        audit_pb2.ListAuditRecordsRequest(page_size=2, entity_type="trigger", page_token=first.next_page_token),
        audit_pb2.ListAuditRecordsRequest(
            page_size=2, entity_type="rule", principal="bob", page_token=first.next_page_token
        ),
    ):
        err = await rpc_error(audit.ListAuditRecords(other), grpc.StatusCode.INVALID_ARGUMENT)
        assert "was not issued by this list with these filters" in field_violations(err)["page_token"]
    err = await rpc_error(
        audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(entity_type="rule", page_token="x" + "A" * 54)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in field_violations(err)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"entity_type": "worker"}, "entity_type"),
        ({"entity_ref": "a\x00b"}, "entity_ref"),
        ({"principal": "p" * 256}, "principal"),
        ({"rpc": "\x00"}, "rpc"),
        ({"entity_id": 0}, "entity_id"),
        ({"page_size": -1}, "page_size"),
        ({"time": time_range(5, 5)}, "time"),
    ],
)
async def test_list_with_bad_filters_is_invalid_argument_naming_them(
    audit: audit_pb2_grpc.AuditServiceAsyncStub, request_fields: dict[str, Any], field: str
) -> None:
    err = await rpc_error(
        audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(**request_fields)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert field in field_violations(err)


async def test_only_operators_may_read_the_trail(stubs: Stubs) -> None:
    async with channel(stubs.target, TOKENS["viewer"]) as ch:
        viewer = audit_pb2_grpc.AuditServiceStub(ch)
        await rpc_error(viewer.ListAuditRecords(audit_pb2.ListAuditRecordsRequest()), grpc.StatusCode.PERMISSION_DENIED)


# ---- the store: a change and its record commit together -------------------------------------------


ACTOR = Actor("alice", "automation.v1.Test/Change")


@pytest.fixture
async def seeded(store: Store, conn: asyncpg.Connection) -> int:
    """A trigger, a rule with a condition, and an exhausted enforcement of it; its id."""
    await store.rules.create_trigger(HOOK, "", "", None, None)
    await store.rules.create_trigger("demo.other", "", "", None, None)
    await store.rules.create_rule(
        ref="demo.a",
        label="",
        description="",
        trigger_ref=HOOK,
        action_ref="core.echo",
        action_params={},
        conditions=[{"field": "n", "operator": "equals", "value": 1}],
        condition="all",
        enabled=True,
    )
    [created] = await store.events.create_many([NewEvent(HOOK, {"n": 1})])
    [enforcement] = created.enforcements
    await conn.execute(
        "UPDATE enforcement_dispatch SET exhausted_at = now(), attempts = 3 WHERE enforcement = $1", enforcement.id
    )
    return enforcement.id


Change = Callable[[Store, int], Awaitable[object]]
CHANGES: dict[str, Change] = {
    "create_trigger": lambda s, _: s.rules.create_trigger("demo.new", "", "", None, None, actor=ACTOR),
    "delete_trigger": lambda s, _: s.rules.delete_trigger("demo.other", ACTOR),
    "create_rule": lambda s, _: s.rules.create_rule(
        ref="demo.b",
        label="",
        description="",
        trigger_ref=HOOK,
        action_ref=None,
        action_params={},
        conditions=[],
        condition="any",
        enabled=False,
        actor=ACTOR,
    ),
    "update_rule": lambda s, _: s.rules.update_rule("demo.a", {"label": "changed", "enabled": False}, ACTOR),
    "update_rule_conditions": lambda s, _: s.rules.update_rule("demo.a", {"conditions": []}, ACTOR),
    "delete_rule": lambda s, _: s.rules.delete_rule("demo.a", ACTOR),
    "retry": lambda s, enforcement: s.dispatch.retry(enforcement, ACTOR),
}


async def snapshot(conn: asyncpg.Connection) -> list[list[asyncpg.Record]]:
    return [
        await conn.fetch("SELECT * FROM trigger ORDER BY id"),
        await conn.fetch("SELECT * FROM rule ORDER BY id"),
        await conn.fetch("SELECT * FROM enforcement_dispatch ORDER BY enforcement"),
        await conn.fetch("SELECT * FROM audit_log ORDER BY id"),
    ]


@pytest.fixture
async def failing_audit(conn: asyncpg.Connection) -> AsyncIterator[Callable[[str], Awaitable[None]]]:
    """Makes every audit insert fail: at once (``IMMEDIATE``) or at commit (``DEFERRED``), when
    the change and its record have both been written."""
    await conn.execute(
        "CREATE FUNCTION test_refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION 'audit refused'; END $$"
    )

    async def install(when: str) -> None:
        await conn.execute(
            "CREATE CONSTRAINT TRIGGER test_refuse_audit AFTER INSERT ON audit_log "
            f"DEFERRABLE INITIALLY {when} FOR EACH ROW EXECUTE FUNCTION test_refuse_audit()"
        )

    yield install


@pytest.mark.parametrize("when", ["IMMEDIATE", "DEFERRED"])
@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_change_whose_audit_record_fails_is_not_made(
    store: Store,
    conn: asyncpg.Connection,
    seeded: int,
    failing_audit: Callable[[str], Awaitable[None]],
    change: str,
    when: str,
) -> None:
    before = await snapshot(conn)
    await failing_audit(when)
    with pytest.raises(asyncpg.RaiseError, match="audit refused"):
        await CHANGES[change](store, seeded)
    assert await snapshot(conn) == before


@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_change_with_an_actor_commits_with_its_record(
    store: Store, conn: asyncpg.Connection, seeded: int, change: str
) -> None:
    await CHANGES[change](store, seeded)
    rows = await conn.fetch("SELECT principal, rpc FROM audit_log")
    assert [(r["principal"], r["rpc"]) for r in rows] == [(ACTOR.principal, ACTOR.rpc)]
    written = {
        "create_trigger": ("trigger", "demo.new"),
        "create_rule": ("rule", "demo.b"),
        "update_rule": ("rule", "demo.a"),
        "update_rule_conditions": ("rule", "demo.a"),
    }
    if change in written:
        table, ref = written[change]
        assert await conn.fetchval(f"SELECT updated_by FROM {table} WHERE ref = $1", ref) == "alice"


async def test_without_an_actor_nothing_is_recorded_and_who_is_unknown(
    store: Store, conn: asyncpg.Connection, seeded: int
) -> None:
    await store.rules.update_rule("demo.a", {"label": "by alice"}, ACTOR)
    assert (await store.rules.get_rule("demo.a")).updated_by == "alice"
    updated = await store.rules.update_rule("demo.a", {"label": "by someone"})
    # The last change was not made by alice: no one is named rather than the wrong one.
    assert updated.updated_by is None
    await store.dispatch.retry(seeded)
    await store.rules.delete_rule("demo.a")
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1


async def test_failed_store_changes_record_nothing(store: Store, conn: asyncpg.Connection, seeded: int) -> None:
    with pytest.raises(AlreadyExists):
        await store.rules.create_trigger(HOOK, "", "", None, None, actor=ACTOR)
    with pytest.raises(NotFound):
        await store.rules.update_rule("demo.missing", {"label": "x"}, ACTOR)
    with pytest.raises(NotFound):
        await store.rules.delete_trigger(987654, ACTOR)
    await store.dispatch.retry(seeded)
    with pytest.raises(NotFound):
        await store.dispatch.retry(987654, ACTOR)
    with pytest.raises(FailedPrecondition):
        await store.dispatch.retry(seeded, ACTOR)  # offered again: no longer exhausted
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_force_release_frees_any_holders_lease_and_records_who_held_it(
    store: Store, conn: asyncpg.Connection, seeded: int
) -> None:
    await store.dispatch.retry(seeded)
    [delivery] = await store.dispatch.claim(
        executor_id="exec-a", token="tok-a", principal="test-executor", limit=1, lease_s=60, max_attempts=5
    )
    assert delivery.enforcement.id == seeded
    assert await store.dispatch.force_release(seeded, ACTOR, "executor host lost") is True
    row = await conn.fetchrow("SELECT * FROM enforcement_dispatch WHERE enforcement = $1", seeded)
    assert row is not None
    assert (row["leased_by"], row["lease_token"], row["lease_principal"], row["last_error"]) == (
        None,
        None,
        None,
        "executor host lost",
    )
    [record] = (await store.audit.list(10, "")).items
    assert (record.principal, record.rpc, record.entity_type, record.entity_id, record.entity_ref) == (
        "alice",
        ACTOR.rpc,
        "enforcement",
        seeded,
        None,
    )
    assert {k: v for k, v in record.change.items() if k != "lease_expires_at"} == {
        "enforcement": seeded,
        "rule_ref": "demo.a",
        "reason": "executor host lost",
        "executor_id": "exec-a",
        "lease_principal": "test-executor",
    }
    assert datetime.fromisoformat(record.change["lease_expires_at"]) == delivery.lease_expires_at
    # Nothing left to release: nothing changes and nothing is recorded.
    assert await store.dispatch.force_release(seeded, ACTOR, "again") is False
    assert len((await store.audit.list(10, "")).items) == 1


async def test_record_writes_on_the_given_connection_in_its_transaction(store: Store, conn: asyncpg.Connection) -> None:
    async with store.pool.acquire() as c:
        tx = c.transaction()
        await tx.start()
        await store.audit.record(c, ACTOR, "token", 5, "ci-bot", {"roles": ["viewer"]})
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 0  # not committed yet
        await tx.rollback()
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 0
    await store.audit.record(store.pool, ACTOR, "token", 5, "ci-bot", {"roles": ["viewer"]})
    [record] = (await store.audit.list(10, "", entity_type="token", entity_ref="ci-bot")).items
    assert (record.entity_id, record.change) == (5, {"roles": ["viewer"]})
    with pytest.raises(ValueError, match="not 'worker'"):
        await store.audit.record(store.pool, ACTOR, "worker", 1, None, {})
