"""The rule language over real channels to real apis on a real PostgreSQL.

Condition trees (all/any/not groups, search items, every operator family) from CreateRule to
the enforcements they produce; legacy flat rules; refusal of bad trees, naming the node;
RE2's linear time on a pattern that is catastrophic for backtracking engines; backstop
rules; the per-trigger cache of compiled rules, across replicas and SQL; TestRule,
ReplayRule (with and without fire, paging) and ReemitEvent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format, struct_pb2, timestamp_pb2

from services.api.server import ApiServer
from shared import limits
from shared.config import ApiConfig
from shared.gen.automation.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    condition_pb2,
    enforcement_pb2,
    event_pb2,
    event_pb2_grpc,
    rule_pb2,
    rule_pb2_grpc,
)
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel, count, field_violations, new_event, rpc_error, rule, struct

Node = condition_pb2.RuleCondition
TRIGGER = "demo.hook"
_UNSET = object()


# --- building trees ----------------------------------------------------------------------------


def op(name: str) -> condition_pb2.ConditionOperator.ValueType:
    return condition_pb2.ConditionOperator.Value("CONDITION_OPERATOR_" + name.upper())


def value(v: Any) -> struct_pb2.Value:
    return json_format.ParseDict(v, struct_pb2.Value())


def leaf(field: str, operator: str, v: Any = _UNSET, item: Node | None = None) -> Node:
    """A test node; ``v`` left out for exists/nexists (or to leave the value unset)."""
    node = Node(field=field, operator=op(operator))
    if v is not _UNSET:
        node.value.CopyFrom(value(v))
    if item is not None:
        node.item.CopyFrom(item)
    return node


def all_(*nodes: Node) -> Node:
    return Node(all=nodes)


def any_(*nodes: Node) -> Node:
    return Node(any=nodes)


def not_(node: Node) -> Node:
    out = Node()
    getattr(out, "not").CopyFrom(node)  # `not` is a Python keyword
    return out


def tree_rule(
    ref: str,
    *nodes: Node,
    trigger_ref: str = TRIGGER,
    params: dict[str, Any] | None = None,
    any_of: bool = False,
    backstop: bool = False,
    enabled: bool = True,
) -> rule_pb2.Rule:
    msg = rule(ref, trigger_ref, params=params, any_of=any_of, enabled=enabled)
    msg.conditions.extend(nodes)
    msg.backstop = backstop
    return msg


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def operator_names(nodes: Sequence[Node]) -> list[Any]:
    """The trees as JSON with enum names, as a client reading them sees them."""
    return [json_format.MessageToDict(n) for n in nodes]


# --- calls ---------------------------------------------------------------------------------------


async def make_trigger(stubs: Stubs, ref: str = TRIGGER) -> rule_pb2.Trigger:
    return await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=ref)))


async def make_rule(stubs: Stubs, msg: rule_pb2.Rule) -> rule_pb2.Rule:
    return await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=msg))


async def update_rule(stubs: Stubs, msg: rule_pb2.Rule, *paths: str) -> rule_pb2.Rule:
    return await stubs.rules.UpdateRule(rule_pb2.UpdateRuleRequest(rule=msg, update_mask=mask(*paths)))


async def emit(
    events: event_pb2_grpc.EventServiceAsyncStub, payload: dict[str, Any], trigger_ref: str = TRIGGER, **kw: Any
) -> event_pb2.CreateEventResponse:
    return await events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(trigger_ref, payload, **kw)))


def fired(resp: event_pb2.CreateEventResponse) -> list[str]:
    return sorted(e.rule_ref for e in resp.enforcements)


async def fires(events: event_pb2_grpc.EventServiceAsyncStub, payload: dict[str, Any]) -> list[str]:
    """The refs of the rules an event with ``payload`` fires (the event is stored)."""
    return fired(await emit(events, payload))


async def store_batch(stubs: Stubs, payloads: Sequence[dict[str, Any]]) -> list[event_pb2.EventReceipt]:
    resp = await stubs.events.CreateEvents(
        event_pb2.CreateEventsRequest(events=[new_event(TRIGGER, p) for p in payloads])
    )
    return list(resp.receipts)


async def replay(
    stub: rule_pb2_grpc.RuleServiceAsyncStub, **request: Any
) -> tuple[list[rule_pb2.ReplayMatch], rule_pb2.ReplaySummary]:
    """Every match of a ReplayRule stream and its summary, which must come last and once."""
    matches: list[rule_pb2.ReplayMatch] = []
    summary: rule_pb2.ReplaySummary | None = None
    async for msg in stub.ReplayRule(rule_pb2.ReplayRuleRequest(**request)):
        assert summary is None, "a message after the summary"
        if msg.WhichOneof("item") == "match":
            matches.append(msg.match)
        else:
            assert msg.WhichOneof("item") == "summary"
            summary = msg.summary
    assert summary is not None, "the stream ended without a summary"
    return matches, summary


@pytest.fixture
async def replica(api_config: ApiConfig, api: ApiServer) -> AsyncIterator[ApiServer]:
    """A second api on the same database (another port, its own pool and rule cache)."""
    server = ApiServer(api_config)
    await server.start()
    assert server.port != api.port
    yield server
    await server.stop()


# --- 1. trees round-trip, match, and are copied into enforcements -------------------------------

NESTED = [
    leaf("repo.name", "regex", r"^svc-[a-z]+$"),
    any_(
        leaf("actor", "istartswith", "BOT-"),
        all_(leaf("prio", "greaterthan_or_equal", 3), not_(leaf("labels", "contains", "wip"))),
    ),
    leaf(
        "commits",
        "search",
        "any",
        item=all_(leaf("item.author", "iequals", "alice"), leaf("item.files", "exists")),
    ),
    not_(leaf("draft", "equals", True)),
]
NESTED_MATCH = {
    "repo": {"name": "svc-api"},
    "actor": "bot-ci",
    "prio": 1,
    "labels": ["wip"],
    "commits": [{"author": "Bob", "files": ["x"]}, {"author": "ALICE", "files": ["a"]}],
    "draft": False,
}


async def test_nested_tree_round_trips_and_its_enforcement_carries_it(stubs: Stubs) -> None:
    await make_trigger(stubs)
    sent = tree_rule("demo.nested", *NESTED, params={"who": "{{ event.payload.actor }}"})
    created = await make_rule(stubs, sent)
    got = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=created.id))
    assert list(created.conditions) == list(sent.conditions)
    assert list(got.conditions) == list(sent.conditions)
    assert operator_names(got.conditions) == operator_names(NESTED)
    assert operator_names(got.conditions)[2]["item"]["all"][1] == {
        "field": "item.files",
        "operator": "CONDITION_OPERATOR_EXISTS",
    }
    listed = await stubs.rules.ListRules(rule_pb2.ListRulesRequest(trigger_ref=TRIGGER))
    assert list(listed.rules[0].conditions) == list(sent.conditions)

    matched = await emit(stubs.events, NESTED_MATCH)
    assert fired(matched) == ["demo.nested"]
    (enf,) = matched.enforcements
    assert list(enf.conditions) == list(got.conditions)
    assert operator_names(enf.conditions) == operator_names(got.conditions)
    assert enf.condition == common_pb2.ENFORCEMENT_CONDITION_ALL
    assert dict(enf.config) == {"who": "bot-ci"}
    stored = await stubs.enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=enf.id))
    assert list(stored.conditions) == list(got.conditions)

    # The second branch of the any group instead of the first.
    assert await fires(stubs.events, {**NESTED_MATCH, "actor": "human", "prio": 3, "labels": ["ok"]}) == ["demo.nested"]
    misses = [
        {**NESTED_MATCH, "repo": {"name": "svc-API"}},  # regex is case-sensitive
        {**NESTED_MATCH, "actor": "human", "prio": 3},  # labels contain wip: the not fails
        {**NESTED_MATCH, "actor": "human", "prio": "9"},  # a string is not ordered against 3
        {**NESTED_MATCH, "commits": [{"author": "alice"}]},  # the item lacks files
        {**NESTED_MATCH, "commits": {"author": "alice", "files": []}},  # not a list
        {**NESTED_MATCH, "draft": True},
        {},
    ]
    for payload in misses:
        resp = await emit(stubs.events, payload)
        assert fired(resp) == [], payload
        assert resp.event.id > 0


# One rule per operator family, each guarded by its own `case` so that exactly one can fire:
# (case, condition, payloads that match, payloads that do not).
FAMILIES: list[tuple[str, Node, list[dict[str, Any]], list[dict[str, Any]]]] = [
    (
        "text",
        leaf("title", "istartswith", "HeLLo"),
        [{"title": "hello world"}, {"title": "HELLO"}],
        [{"title": "say hello"}, {"title": 5}, {}],
    ),
    (
        "regex",
        leaf("path", "regex", r"/v\d+/users$"),
        [{"path": "/api/v2/users"}],
        [{"path": "/api/v2/users/7"}, {"path": "/api/vx/users"}, {"path": ["/api/v2/users"]}],
    ),
    (
        "order",
        all_(
            leaf("at", "lessthan", "2024-01-01T00:00:00Z"),
            leaf("at", "greaterthan_or_equal", "2023-12-31T00:00:00+00:00"),
        ),
        [{"at": "2023-12-31T23:59:59Z"}, {"at": "2023-12-31T20:00:00-02:00"}, {"at": "2023-12-31"}],
        [{"at": "2023-12-31T23:00:00-02:00"}, {"at": "2023-12-30T23:59:59Z"}, {"at": "soon"}, {"at": 1}],
    ),
    (
        "exists",
        all_(leaf("ticket", "exists"), leaf("closed", "nexists")),
        [{"ticket": None}, {"ticket": {"id": 3}}],
        [{"ticket": 1, "closed": False}, {"closed": None}],
    ),
    (
        "inside",
        leaf("env", "inside", ["prod", "staging", 3]),
        [{"env": "prod"}, {"env": 3}, {"env": 3.0}],
        [{"env": "dev"}, {"env": "pro"}, {"env": "3"}, {}],
    ),
    (
        "search_any",
        leaf("items", "search", "any", item=leaf("item.qty", "greaterthan", 10)),
        [{"items": [{"qty": 1}, {"qty": 11}]}],
        [{"items": [{"qty": 1}, {"qty": 10}]}, {"items": []}, {"items": "many"}],
    ),
    (
        "search_all",
        leaf("tags", "search", "all", item=leaf("item", "istartswith", "ok")),
        [{"tags": ["OK1", "ok2"]}, {"tags": []}],
        [{"tags": ["ok", "bad"]}, {"tags": [1]}, {}],
    ),
    (
        "null",
        leaf("x", "equals", None),
        [{"x": None}],
        [{}, {"x": 0}, {"x": False}, {"x": "null"}, {"x": []}],
    ),
    (
        "not",
        not_(any_(leaf("user", "equals", "root"), leaf("user", "endswith", "-admin"))),
        [{"user": "alice"}, {}],
        [{"user": "root"}, {"user": "bob-admin"}],
    ),
]


async def test_each_operator_family_matches_end_to_end(stubs: Stubs) -> None:
    await make_trigger(stubs)
    for case, condition, _, _ in FAMILIES:
        await make_rule(stubs, tree_rule(f"demo.{case}", leaf("case", "equals", case), condition))
    for case, _, hits, misses in FAMILIES:
        for payload in hits:
            assert await fires(stubs.events, {"case": case, **payload}) == [f"demo.{case}"], (case, payload)
        for payload in misses:
            assert await fires(stubs.events, {"case": case, **payload}) == [], (case, payload)


# --- 2. legacy rules --------------------------------------------------------------------------------


async def test_not_equals_is_read_back_as_nequals_and_matches_as_before(stubs: Stubs) -> None:
    await make_trigger(stubs)
    assert condition_pb2.CONDITION_OPERATOR_NOT_EQUALS == condition_pb2.CONDITION_OPERATOR_NEQUALS
    created = await make_rule(
        stubs, rule("demo.legacy", TRIGGER, conditions=[("kind", condition_pb2.CONDITION_OPERATOR_NOT_EQUALS, "a")])
    )
    got = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.legacy"))
    for r in (created, got):
        assert r.conditions[0].operator == condition_pb2.CONDITION_OPERATOR_NEQUALS
        assert operator_names(r.conditions) == [
            {"field": "kind", "operator": "CONDITION_OPERATOR_NEQUALS", "value": "a"}
        ]
    assert await fires(stubs.events, {"kind": "b"}) == ["demo.legacy"]
    assert await fires(stubs.events, {}) == ["demo.legacy"]  # a missing field differs from everything
    assert await fires(stubs.events, {"kind": "a"}) == []


async def test_rule_stored_with_the_old_operator_name_still_reads_and_matches(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    """Rules stored before the rule language hold `not_equals` in their JSON."""
    await make_trigger(stubs)
    await make_rule(stubs, rule("demo.old", TRIGGER, conditions=[("kind", op("equals"), "zzz")]))
    assert await fires(stubs.events, {"kind": "b"}) == []  # compiled and cached
    await conn.execute(
        "UPDATE rule SET conditions = $1::text::jsonb WHERE ref = 'demo.old'",
        json.dumps([{"field": "kind", "operator": "not_equals", "value": "a"}]),
    )
    got = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.old"))
    assert operator_names(got.conditions) == [{"field": "kind", "operator": "CONDITION_OPERATOR_NEQUALS", "value": "a"}]
    resp = await emit(stubs.events, {"kind": "b"})
    assert fired(resp) == ["demo.old"]
    assert operator_names(resp.enforcements[0].conditions) == operator_names(got.conditions)
    assert await fires(stubs.events, {"kind": "a"}) == []


async def test_flat_list_with_any_matches_when_one_condition_holds(stubs: Stubs) -> None:
    await make_trigger(stubs)
    eq = condition_pb2.CONDITION_OPERATOR_EQUALS
    created = await make_rule(
        stubs, rule("demo.flat", TRIGGER, conditions=[("kind", eq, "x"), ("level", eq, "high")], any_of=True)
    )
    assert created.condition == common_pb2.ENFORCEMENT_CONDITION_ANY
    assert await fires(stubs.events, {"kind": "x"}) == ["demo.flat"]
    assert await fires(stubs.events, {"level": "high"}) == ["demo.flat"]
    assert await fires(stubs.events, {"kind": "x", "level": "high"}) == ["demo.flat"]
    resp = await emit(stubs.events, {"kind": "y", "level": "low"})
    assert fired(resp) == []
    ok = await emit(stubs.events, {"kind": "x"})
    assert ok.enforcements[0].condition == common_pb2.ENFORCEMENT_CONDITION_ANY


# --- 3. bad trees are refused, naming the node --------------------------------------------------


def _nested_not(levels: int) -> Node:
    node = leaf("x", "equals", 1)
    for _ in range(levels):
        node = not_(node)
    return node


BAD_TREES: list[tuple[str, list[Node], str]] = [
    (
        "bad-re2",
        [leaf("a", "equals", 1), any_(leaf("b", "regex", "(unclosed"), leaf("c", "exists"))],
        "conditions[1].any[0].value",
    ),
    ("perl-lookahead", [leaf("b", "iregex", "a(?=b)")], "conditions[0].value"),
    ("lessthan-not-timestamp", [leaf("t", "lessthan", "yesterday")], "conditions[0].value"),
    ("search-without-item", [all_(leaf("xs", "search", "any"))], "conditions[0].all[0].item"),
    (
        "item-path-not-item",
        [leaf("xs", "search", "all", item=leaf("name", "equals", "a"))],
        "conditions[0].item.field",
    ),
    ("search-bad-mode", [leaf("xs", "search", "some", item=leaf("item", "exists"))], "conditions[0].value"),
    (
        "test-and-group",
        [leaf("ok", "exists"), Node(field="x", operator=op("equals"), value=value(1), any=[leaf("y", "exists")])],
        "conditions[1]",
    ),
    ("missing-value", [leaf("x", "equals")], "conditions[0].value"),
    ("too-deep", [_nested_not(16)], "conditions[0]" + ".not" * 16),
    ("too-many", [any_(*[leaf(f"f{i}", "equals", i) for i in range(64)])], "conditions"),
]


@pytest.mark.parametrize(("trees", "where"), [(t, w) for _, t, w in BAD_TREES], ids=[i for i, _, _ in BAD_TREES])
async def test_bad_tree_is_invalid_argument_naming_the_node_and_stores_nothing(
    stubs: Stubs, conn: asyncpg.Connection, trees: list[Node], where: str
) -> None:
    await make_trigger(stubs)
    err = await rpc_error(make_rule(stubs, tree_rule("demo.bad", *trees)), grpc.StatusCode.INVALID_ARGUMENT)
    assert list(field_violations(err)) == [f"rule.{where}"], err.details()
    # TestRule checks an inline rule as CreateRule does, under its own field.
    err = await rpc_error(
        stubs.rules.TestRule(
            rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(inline=tree_rule("", *trees)), payload=struct({}))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(field_violations(err)) == [f"rule.inline.{where}"], err.details()
    # UpdateRule refuses the same tree and keeps the rule as it was.
    kept = await make_rule(stubs, tree_rule("demo.kept", leaf("k", "exists")))
    err = await rpc_error(
        update_rule(stubs, tree_rule("demo.kept", *trees), "conditions"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert list(field_violations(err)) == [f"rule.{where}"], err.details()
    listed = await stubs.rules.ListRules(rule_pb2.ListRulesRequest(trigger_ref=TRIGGER))
    assert [r.ref for r in listed.rules] == ["demo.kept"]
    assert list(listed.rules[0].conditions) == list(kept.conditions)
    assert await count(conn, "rule") == 1


async def test_the_largest_tree_within_the_bounds_is_accepted(stubs: Stubs) -> None:
    await make_trigger(stubs)
    deep = await make_rule(stubs, tree_rule("demo.deep", _nested_not(15)))  # 16 levels
    wide = await make_rule(stubs, tree_rule("demo.wide", any_(*[leaf(f"f{i}", "equals", i) for i in range(63)])))
    assert list(deep.conditions) == [_nested_not(15)]
    assert len(wide.conditions[0].any) == 63  # 64 nodes with the group
    assert await fires(stubs.events, {"f62": 62}) == ["demo.deep", "demo.wide"]  # not^15 of x==1: x missing


async def test_bad_trees_leave_no_rule_behind(stubs: Stubs) -> None:
    await make_trigger(stubs)
    for _, trees, _ in BAD_TREES:
        await rpc_error(make_rule(stubs, tree_rule("demo.bad", *trees)), grpc.StatusCode.INVALID_ARGUMENT)
    listed = await stubs.rules.ListRules(rule_pb2.ListRulesRequest())
    assert list(listed.rules) == []


# --- 4. RE2: no catastrophic backtracking -------------------------------------------------------------


async def test_catastrophic_pattern_for_backtracking_runs_in_linear_time(stubs: Stubs) -> None:
    await make_trigger(stubs)
    await make_rule(stubs, tree_rule("demo.redos", leaf("s", "regex", "(a+)+$")))
    evil = "a" * 50_000 + "b"
    miss = await emit(stubs.events, {"s": evil})
    assert fired(miss) == []
    hit = await emit(stubs.events, {"s": "a" * 50_000})
    assert fired(hit) == ["demo.redos"]
    tested = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(ref="demo.redos"), event_id=miss.event.id)
    )
    assert not tested.matched
    # The value found is over 4 KiB: not echoed, and said so.
    assert not tested.results[1].HasField("found") and "not shown" in tested.results[1].note


# --- 5. backstop rules ----------------------------------------------------------------------------------


async def test_backstop_fires_only_when_no_standard_rule_matched(stubs: Stubs) -> None:
    await make_trigger(stubs)
    std = await make_rule(stubs, tree_rule("demo.std", leaf("kind", "equals", "a")))
    bs = await make_rule(stubs, tree_rule("demo.bs", backstop=True))
    assert bs.backstop and not std.backstop
    assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=bs.id))).backstop

    assert await fires(stubs.events, {"kind": "a"}) == ["demo.std"]
    assert await fires(stubs.events, {"kind": "b"}) == ["demo.bs"]
    receipts = await store_batch(stubs, [{"kind": "a"}, {"kind": "b"}])
    assert [list(r.rule_refs) for r in receipts] == [["demo.std"], ["demo.bs"]]

    # A disabled standard rule takes nothing.
    await update_rule(stubs, rule_pb2.Rule(id=std.id, enabled=False), "enabled")
    assert await fires(stubs.events, {"kind": "a"}) == ["demo.bs"]
    await update_rule(stubs, rule_pb2.Rule(id=std.id, enabled=True), "enabled")
    assert await fires(stubs.events, {"kind": "a"}) == ["demo.std"]

    # Cleared: an ordinary rule that fires beside the others.
    cleared = await update_rule(stubs, rule_pb2.Rule(ref="demo.bs", backstop=False), "backstop")
    assert not cleared.backstop
    assert not (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=bs.id))).backstop
    assert await fires(stubs.events, {"kind": "a"}) == ["demo.bs", "demo.std"]
    assert await fires(stubs.events, {"kind": "b"}) == ["demo.bs"]

    # Set again through UpdateRule, on the standard rule too: two backstops, no standard rule.
    await update_rule(stubs, rule_pb2.Rule(id=bs.id, backstop=True), "backstop")
    assert await fires(stubs.events, {"kind": "a"}) == ["demo.std"]
    await update_rule(stubs, rule_pb2.Rule(id=std.id, backstop=True), "backstop")
    assert await fires(stubs.events, {"kind": "a"}) == ["demo.bs", "demo.std"]
    assert await fires(stubs.events, {"kind": "b"}) == ["demo.bs"]


async def test_backstop_of_one_trigger_ignores_the_rules_of_another(stubs: Stubs) -> None:
    await make_trigger(stubs)
    await make_trigger(stubs, "demo.other")
    await make_rule(stubs, tree_rule("demo.elsewhere", trigger_ref="demo.other"))
    await make_rule(stubs, tree_rule("demo.bs", backstop=True))
    assert await fires(stubs.events, {"kind": "a"}) == ["demo.bs"]


# --- 6. the rule cache follows every change -----------------------------------------------------------


async def test_update_rule_is_used_by_the_very_next_event(stubs: Stubs) -> None:
    await make_trigger(stubs)
    r = await make_rule(stubs, tree_rule("demo.r", leaf("kind", "equals", "a")))
    assert await fires(stubs.events, {"kind": "a"}) == ["demo.r"]
    assert await fires(stubs.events, {"kind": "b"}) == []
    changed = rule_pb2.Rule(id=r.id)
    changed.conditions.append(leaf("kind", "equals", "b"))
    await update_rule(stubs, changed, "conditions")
    assert await fires(stubs.events, {"kind": "a"}) == []
    assert await fires(stubs.events, {"kind": "b"}) == ["demo.r"]
    await update_rule(stubs, rule_pb2.Rule(id=r.id, condition=common_pb2.ENFORCEMENT_CONDITION_ANY), "condition")
    resp = await emit(stubs.events, {"kind": "b"})
    assert resp.enforcements[0].condition == common_pb2.ENFORCEMENT_CONDITION_ANY
    await stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(id=r.id))
    assert await fires(stubs.events, {"kind": "b"}) == []


async def test_a_change_through_one_replica_is_used_by_another_at_once(stubs: Stubs, replica: ApiServer) -> None:
    await make_trigger(stubs)
    async with channel(f"127.0.0.1:{replica.port}") as ch:
        events_b = event_pb2_grpc.EventServiceStub(ch)
        rules_b = rule_pb2_grpc.RuleServiceStub(ch)
        # B compiles the trigger's rules (none yet), then A creates one.
        assert await fires(events_b, {"kind": "a"}) == []
        r = await make_rule(stubs, tree_rule("demo.r", leaf("kind", "equals", "a")))
        assert await fires(events_b, {"kind": "a"}) == ["demo.r"]
        # A changes its conditions; B, which has the old ones compiled, uses the new ones.
        changed = rule_pb2.Rule(id=r.id)
        changed.conditions.append(leaf("kind", "istartswith", "B"))
        await update_rule(stubs, changed, "conditions")
        assert await fires(events_b, {"kind": "a"}) == []
        assert await fires(events_b, {"kind": "bee"}) == ["demo.r"]
        # And the other way round: B disables it, A sees that.
        assert await fires(stubs.events, {"kind": "bee"}) == ["demo.r"]
        await rules_b.UpdateRule(
            rule_pb2.UpdateRuleRequest(rule=rule_pb2.Rule(id=r.id, enabled=False), update_mask=mask("enabled"))
        )
        assert await fires(stubs.events, {"kind": "bee"}) == []
        # A deletes it; B stops firing it.
        await update_rule(stubs, rule_pb2.Rule(id=r.id, enabled=True), "enabled")
        assert await fires(events_b, {"kind": "bee"}) == ["demo.r"]
        await stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(id=r.id))
        assert await fires(events_b, {"kind": "bee"}) == []


async def test_a_change_made_in_sql_is_seen_by_the_next_event(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs)
    await make_rule(stubs, tree_rule("demo.r", leaf("kind", "equals", "a")))
    assert await fires(stubs.events, {"kind": "a"}) == ["demo.r"]
    await conn.execute(
        "UPDATE rule SET conditions = $1::text::jsonb WHERE ref = 'demo.r'",
        json.dumps([{"field": "kind", "operator": "equals", "value": "b"}]),
    )
    assert await fires(stubs.events, {"kind": "a"}) == []
    assert await fires(stubs.events, {"kind": "b"}) == ["demo.r"]
    await conn.execute("UPDATE rule SET enabled = false WHERE ref = 'demo.r'")
    assert await fires(stubs.events, {"kind": "b"}) == []
    await conn.execute("UPDATE rule SET enabled = true WHERE ref = 'demo.r'")
    assert await fires(stubs.events, {"kind": "b"}) == ["demo.r"]
    await conn.execute("DELETE FROM rule WHERE ref = 'demo.r'")
    assert await fires(stubs.events, {"kind": "b"}) == []


async def test_a_rule_row_that_cannot_compile_never_fires_and_spares_its_neighbours(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    """Only SQL written around the api can store such a row; the trigger's other rules go on."""
    await make_trigger(stubs)
    await make_rule(stubs, tree_rule("demo.good", leaf("kind", "equals", "a")))
    await make_rule(stubs, tree_rule("demo.bad", leaf("kind", "exists")))
    await conn.execute(
        "UPDATE rule SET conditions = $1::text::jsonb WHERE ref = 'demo.bad'",
        json.dumps([{"field": "kind", "operator": "regex", "value": "(unclosed"}]),
    )
    assert await fires(stubs.events, {"kind": "a"}) == ["demo.good"]
    assert await fires(stubs.events, {"kind": "b"}) == []


async def test_an_event_whose_lists_would_cost_too_many_search_tests_is_refused(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    """The rules of a trigger may search an event's lists, but not without bound: past
    MAX_SEARCH_ITEM_TESTS item tests the event is INVALID_ARGUMENT and nothing is stored."""
    await make_trigger(stubs)
    for n in range(5):
        await make_rule(stubs, tree_rule(f"demo.s{n}", leaf("l", "search", "any", item=leaf("item", "equals", -1))))
    before = await count(conn, "event")
    # Nulls: the longest list a payload can carry (4 bytes an item); 5 searches of it pass the budget.
    long_list = [None] * (limits.MAX_SEARCH_ITEM_TESTS // 5 + 1)
    err = await rpc_error(emit(stubs.events, {"l": long_list}), grpc.StatusCode.INVALID_ARGUMENT)
    assert "search" in field_violations(err)["event.payload"]
    assert await count(conn, "event") == before
    assert await fires(stubs.events, {"l": [0] * 1000 + [-1]}) == [f"demo.s{n}" for n in range(5)]


# --- 7. TestRule -------------------------------------------------------------------------------------------

TESTED = [
    leaf("kind", "equals", "a"),
    any_(leaf("ticket", "exists"), not_(leaf("level", "greaterthan", 3))),
]


async def test_testrule_explains_every_node_of_a_stored_rule(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs)
    await make_rule(stubs, tree_rule("demo.t", *TESTED, params={"msg": "{{ event.payload.x }}", "n": 1}))
    before = await count(conn, "event"), await count(conn, "enforcement"), await count(conn, "audit_log")

    miss = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(ref="demo.t"), payload=struct({"kind": "b", "level": 7}))
    )
    assert (miss.matched, miss.would_fire, miss.trigger_ref) == (False, False, TRIGGER)
    assert not miss.HasField("config")
    assert [(r.node, r.holds, r.kind) for r in miss.results] == [
        ("conditions", False, "all"),
        ("conditions[0]", False, "equals"),
        ("conditions[1]", False, "any"),
        ("conditions[1].any[0]", False, "exists"),
        ("conditions[1].any[1]", False, "not"),
        ("conditions[1].any[1].not", True, "greaterthan"),
    ]
    top, kind, group, ticket, negation, level = miss.results
    assert top.note == "0 of 2 hold"
    assert (kind.field, kind.expected.string_value, kind.found.string_value, kind.missing) == ("kind", "a", "b", False)
    assert (ticket.field, ticket.missing, ticket.HasField("found"), ticket.HasField("expected")) == (
        "ticket",
        True,
        False,
        False,
    )
    assert ticket.note == "the field is missing"
    assert group.note == "0 of 2 hold"
    assert not negation.field and not negation.HasField("found") and not negation.missing
    assert (level.found.number_value, level.expected.number_value) == (7, 3)

    # A type mismatch is a note, not an error.
    odd = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(ref="demo.t"), payload=struct({"kind": 1, "level": "x"}))
    )
    assert "never equal" in odd.results[1].note
    assert "needs a number" in odd.results[5].note

    hit = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(ref="demo.t"), payload=struct({"kind": "a", "x": "hi"}))
    )
    assert (hit.matched, hit.would_fire) == (True, True)
    assert json_format.MessageToDict(hit.config) == {"msg": "hi", "n": 1}
    assert [r.holds for r in hit.results] == [True, True, True, False, True, False]
    assert hit.results[3].missing and hit.results[5].missing

    assert (await count(conn, "event"), await count(conn, "enforcement"), await count(conn, "audit_log")) == before


async def test_testrule_by_stored_event(stubs: Stubs) -> None:
    await make_trigger(stubs)
    await make_trigger(stubs, "demo.other")
    r = await make_rule(stubs, tree_rule("demo.t", leaf("kind", "equals", "a"), params={"id": "{{ event.id }}"}))
    ev = (await emit(stubs.events, {"kind": "a"})).event
    out = await stubs.rules.TestRule(rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(id=r.id), event_id=ev.id))
    assert out.matched and out.would_fire
    assert json_format.MessageToDict(out.config) == {"id": ev.id}
    assert out.results[1].found.string_value == "a"

    other = (await emit(stubs.events, {"kind": "a"}, trigger_ref="demo.other")).event
    err = await rpc_error(
        stubs.rules.TestRule(rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(id=r.id), event_id=other.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "demo.other" in (err.details() or "")
    await rpc_error(
        stubs.rules.TestRule(rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(id=r.id), event_id=other.id + 1000)),
        grpc.StatusCode.NOT_FOUND,
    )
    await rpc_error(
        stubs.rules.TestRule(rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(ref="demo.none"), payload=struct({}))),
        grpc.StatusCode.NOT_FOUND,
    )
    err = await rpc_error(
        stubs.rules.TestRule(rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(id=r.id))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "event" in field_violations(err)


async def test_testrule_with_an_inline_rule_writes_nothing(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs)
    inline = tree_rule("", leaf("path", "regex", "^/api/"), params={"p": "{{ event.payload.path }}"})
    out = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(inline=inline), payload=struct({"path": "/api/x"}))
    )
    assert out.matched and out.would_fire
    assert json_format.MessageToDict(out.config) == {"p": "/api/x"}
    disabled = tree_rule("demo.would", leaf("path", "exists"), enabled=False)
    out = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(inline=disabled), payload=struct({"path": 1}))
    )
    assert out.matched and not out.would_fire
    assert await count(conn, "rule") == 0
    assert await count(conn, "audit_log") == 1  # the trigger's creation only
    await rpc_error(
        stubs.rules.TestRule(
            rule_pb2.TestRuleRequest(
                rule=rule_pb2.RuleSource(inline=tree_rule("", trigger_ref="demo.none")), payload=struct({})
            )
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_testrule_of_a_backstop_names_the_standard_rules_that_take_the_event(stubs: Stubs) -> None:
    await make_trigger(stubs)
    await make_rule(stubs, tree_rule("demo.std", leaf("kind", "equals", "a")))
    await make_rule(stubs, tree_rule("demo.std2", leaf("kind", "istartswith", "A")))
    await make_rule(stubs, tree_rule("demo.off", leaf("kind", "exists"), enabled=False))
    bs = await make_rule(stubs, tree_rule("demo.bs", backstop=True))
    taken = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(id=bs.id), payload=struct({"kind": "a"}))
    )
    assert taken.matched and not taken.would_fire
    assert sorted(taken.taken_by) == ["demo.std", "demo.std2"]
    assert [r.node for r in taken.results] == ["conditions"]
    free = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(id=bs.id), payload=struct({"kind": "b"}))
    )
    assert free.matched and free.would_fire and list(free.taken_by) == []
    # A standard rule is never taken.
    std = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(ref="demo.std"), payload=struct({"kind": "a"}))
    )
    assert std.would_fire and list(std.taken_by) == []


async def test_testrule_is_for_viewers_not_sensors(stubs: Stubs) -> None:
    await make_trigger(stubs)
    await make_rule(stubs, tree_rule("demo.t", leaf("kind", "equals", "a")))
    request = rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(ref="demo.t"), payload=struct({"kind": "a"}))
    async with channel(stubs.target, token=TOKENS["viewer"]) as ch:
        assert (await rule_pb2_grpc.RuleServiceStub(ch).TestRule(request)).matched
    async with channel(stubs.target, token=TOKENS["sensor"]) as ch:
        await rpc_error(rule_pb2_grpc.RuleServiceStub(ch).TestRule(request), grpc.StatusCode.PERMISSION_DENIED)


# --- 8. ReplayRule -------------------------------------------------------------------------------------------


def _ts(t: timestamp_pb2.Timestamp, delta_us: int = 0) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t.ToDatetime() + timedelta(microseconds=delta_us))
    return out


async def test_replay_streams_matches_newest_first_then_a_summary(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs)
    await make_trigger(stubs, "demo.other")
    first = await store_batch(stubs, [{"n": i, "kind": "a" if i % 3 == 0 else "b"} for i in range(15)])
    second = await store_batch(stubs, [{"n": i, "kind": "a" if i % 3 == 0 else "b"} for i in range(15, 30)])
    await emit(stubs.events, {"kind": "a"}, trigger_ref="demo.other")
    await make_rule(
        stubs,
        tree_rule("demo.r", leaf("kind", "equals", "a"), params={"n": "{{ event.payload.n }}", "e": "{{ event.id }}"}),
    )
    assert second[0].created.ToDatetime() > first[0].created.ToDatetime()
    receipts = first + second
    expected = [r.event_id for i, r in reversed(list(enumerate(receipts))) if i % 3 == 0]
    before = await count(conn, "enforcement")

    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.r"))
    assert [m.event_id for m in matches] == expected
    assert (summary.scanned, summary.matched, summary.fired, summary.truncated) == (30, 10, 0, False)
    by_id = {r.event_id: (i, r) for i, r in enumerate(receipts)}
    for m in matches:
        i, receipt = by_id[m.event_id]
        assert json_format.MessageToDict(m.config) == {"n": i, "e": m.event_id}
        assert m.created == receipt.created
        assert not m.HasField("enforcement_id") and not m.existed
    assert await count(conn, "enforcement") == before

    # limit: the newest matches only.
    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.r"), limit=4)
    assert [m.event_id for m in matches] == expected[:4]
    # The scan stops at the 4th match, the 12th event from the newest.
    assert (summary.scanned, summary.matched, summary.truncated) == (12, 4, True)
    # A limit the matches just reach, at the end of the range, truncates nothing.
    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.r"), limit=10)
    assert [m.event_id for m in matches] == expected
    assert (summary.scanned, summary.matched, summary.truncated) == (30, 10, False)

    # created: only the second batch, then only the first.
    late = common_pb2.TimeRange(start=second[0].created)
    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.r"), created=late)
    assert [m.event_id for m in matches] == expected[:5]
    assert (summary.scanned, summary.matched) == (15, 5)
    early = common_pb2.TimeRange(end=second[0].created)
    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.r"), created=early)
    assert [m.event_id for m in matches] == expected[5:]
    assert (summary.scanned, summary.matched) == (15, 5)
    nothing = common_pb2.TimeRange(start=_ts(second[0].created, 1))
    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.r"), created=nothing)
    assert (matches, summary.scanned, summary.matched, summary.truncated) == ([], 0, 0, False)

    # An inline rule replays too (without fire), and the viewer may replay.
    inline = tree_rule("", leaf("n", "lessthan", 3))
    async with channel(stubs.target, token=TOKENS["viewer"]) as ch:
        matches, summary = await replay(rule_pb2_grpc.RuleServiceStub(ch), rule=rule_pb2.RuleSource(inline=inline))
    assert [m.event_id for m in matches] == [receipts[2].event_id, receipts[1].event_id, receipts[0].event_id]
    assert (summary.scanned, summary.matched) == (30, 3)

    err = await rpc_error(
        replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.r"), limit=-1), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "limit" in field_violations(err)
    backwards = common_pb2.TimeRange(start=second[0].created, end=first[0].created)
    err = await rpc_error(
        replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.r"), created=backwards),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "created" in field_violations(err)


async def test_replay_fire_creates_missing_enforcements_once(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs)
    r = await make_rule(stubs, tree_rule("demo.r", leaf("kind", "equals", "a"), params={"n": "{{ event.payload.n }}"}))
    # Matched at ingest: these have their enforcement already.
    early = await store_batch(stubs, [{"n": i, "kind": "a" if i % 2 == 0 else "b"} for i in range(10)])
    ingest = {rc.event_id: rc.enforcement_ids[0] for rc in early if rc.enforcement_ids}
    assert len(ingest) == 5
    await update_rule(stubs, rule_pb2.Rule(id=r.id, enabled=False), "enabled")
    late = await store_batch(stubs, [{"n": i, "kind": "a" if i % 2 == 0 else "b"} for i in range(10, 30)])
    assert all(not rc.enforcement_ids for rc in late)

    # Disabled: nothing to fire.
    await rpc_error(
        replay(stubs.rules, rule=rule_pb2.RuleSource(id=r.id), fire=True), grpc.StatusCode.FAILED_PRECONDITION
    )
    await update_rule(stubs, rule_pb2.Rule(id=r.id, enabled=True), "enabled")

    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(id=r.id), fire=True)
    assert (summary.scanned, summary.matched, summary.fired, summary.truncated) == (30, 15, 10, False)
    late_hits = {rc.event_id for i, rc in enumerate(late) if (i + 10) % 2 == 0}
    made: dict[int, int] = {}
    for m in matches:
        assert m.HasField("enforcement_id")
        if m.event_id in ingest:
            assert (m.enforcement_id, m.existed) == (ingest[m.event_id], True)
        else:
            assert m.event_id in late_hits and not m.existed
            made[m.event_id] = m.enforcement_id
    assert set(made) == late_hits
    for event_id, enforcement_id in made.items():
        enf = await stubs.enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=enforcement_id))
        assert (enf.event, enf.rule, enf.rule_ref, enf.trigger_ref) == (event_id, r.id, "demo.r", TRIGGER)
        assert enf.status == common_pb2.ENFORCEMENT_STATUS_CREATED
        assert list(enf.conditions) == list(r.conditions)
        assert json_format.MessageToDict(enf.payload)["n"] == json_format.MessageToDict(enf.config)["n"]
    assert await count(conn, "enforcement") == 15

    # Again: every enforcement exists; none is created.
    again, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.r"), fire=True)
    assert (summary.matched, summary.fired) == (15, 0)
    assert all(m.existed for m in again)
    assert {m.event_id: m.enforcement_id for m in again} == {**ingest, **made}
    assert await count(conn, "enforcement") == 15

    # One audit record, of the first replay, naming what it created.
    audit = audit_pb2_grpc.AuditServiceStub(stubs.channel)
    records = await audit.ListAuditRecords(
        audit_pb2.ListAuditRecordsRequest(entity_type="rule", rpc="automation.v1.RuleService/ReplayRule")
    )
    (record,) = records.records
    assert (record.entity_id, record.entity_ref, record.principal) == (r.id, "demo.r", "test-operator")
    change = json_format.MessageToDict(record.change)["fired"]
    assert sorted(int(e) for e in change["events"]) == sorted(made)
    assert sorted(int(e) for e in change["enforcements"]) == sorted(made.values())


async def test_concurrent_fire_replays_create_each_enforcement_once(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs)
    r = await make_rule(stubs, tree_rule("demo.r", leaf("n", "greaterthan", -1), enabled=False))
    receipts = await store_batch(stubs, [{"n": i} for i in range(40)])
    await update_rule(stubs, rule_pb2.Rule(id=r.id, enabled=True), "enabled")
    runs = await asyncio.gather(*(replay(stubs.rules, rule=rule_pb2.RuleSource(id=r.id), fire=True) for _ in range(4)))
    assert sum(summary.fired for _, summary in runs) == 40
    ids = [{m.event_id: m.enforcement_id for m in matches} for matches, _ in runs]
    assert all(one == ids[0] for one in ids) and set(ids[0]) == {rc.event_id for rc in receipts}
    assert sum(not m.existed for matches, _ in runs for m in matches) == 40
    assert await count(conn, "enforcement") == 40


async def test_replay_fire_is_refused_for_inline_rules_and_viewers(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs)
    await make_rule(stubs, tree_rule("demo.r", leaf("kind", "equals", "a")))
    await store_batch(stubs, [{"kind": "a"}])
    await update_rule(stubs, rule_pb2.Rule(ref="demo.r", enabled=False), "enabled")
    await store_batch(stubs, [{"kind": "a"}])
    await update_rule(stubs, rule_pb2.Rule(ref="demo.r", enabled=True), "enabled")
    before = await count(conn, "enforcement")
    err = await rpc_error(
        replay(stubs.rules, rule=rule_pb2.RuleSource(inline=tree_rule("", leaf("kind", "exists"))), fire=True),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "fire" in field_violations(err)
    async with channel(stubs.target, token=TOKENS["viewer"]) as ch:
        viewer = rule_pb2_grpc.RuleServiceStub(ch)
        await rpc_error(
            replay(viewer, rule=rule_pb2.RuleSource(ref="demo.r"), fire=True), grpc.StatusCode.PERMISSION_DENIED
        )
        _, summary = await replay(viewer, rule=rule_pb2.RuleSource(ref="demo.r"))
        assert (summary.matched, summary.fired) == (2, 0)
    async with channel(stubs.target, token=TOKENS["sensor"]) as ch:
        await rpc_error(
            replay(rule_pb2_grpc.RuleServiceStub(ch), rule=rule_pb2.RuleSource(ref="demo.r")),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert await count(conn, "enforcement") == before


async def test_replay_of_a_backstop_skips_events_a_standard_rule_takes(stubs: Stubs) -> None:
    await make_trigger(stubs)
    receipts = await store_batch(stubs, [{"kind": k} for k in "abab"])
    await make_rule(stubs, tree_rule("demo.std", leaf("kind", "equals", "a")))
    await make_rule(stubs, tree_rule("demo.bs", backstop=True))
    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.bs"))
    assert [m.event_id for m in matches] == [receipts[3].event_id, receipts[1].event_id]
    assert (summary.scanned, summary.matched) == (4, 2)


async def test_replay_pages_through_more_events_than_one_page(stubs: Stubs) -> None:
    await make_trigger(stubs)
    payloads = [{"n": i, "hit": i % 100 == 7} for i in range(1200)]
    receipts = await store_batch(stubs, payloads[:1000]) + await store_batch(stubs, payloads[1000:])
    await make_rule(stubs, tree_rule("demo.r", leaf("hit", "equals", True), params={"n": "{{ event.payload.n }}"}))
    # Newest first: the second batch (stored later), then the first; ids descending in each.
    newest_first = sorted(receipts, key=lambda rc: (rc.created.ToDatetime(), rc.event_id), reverse=True)
    index = {rc.event_id: i for i, rc in enumerate(receipts)}
    expected = [rc.event_id for rc in newest_first if payloads[index[rc.event_id]]["hit"]]
    assert len(expected) == 12

    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(ref="demo.r"))
    assert [m.event_id for m in matches] == expected
    assert [json_format.MessageToDict(m.config)["n"] for m in matches] == [index[e] for e in expected]
    assert (summary.scanned, summary.matched, summary.truncated) == (1200, 12, False)

    everything = tree_rule("", params={"n": "{{ event.payload.n }}"})
    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(inline=everything), limit=1200)
    assert [m.event_id for m in matches] == [rc.event_id for rc in newest_first]
    assert (summary.scanned, summary.matched, summary.truncated) == (1200, 1200, False)
    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(inline=everything), limit=700)
    assert [m.event_id for m in matches] == [rc.event_id for rc in newest_first[:700]]
    assert (summary.scanned, summary.matched, summary.truncated) == (700, 700, True)
    # The limit reached by the last event of a full page, with more pages after it.
    matches, summary = await replay(stubs.rules, rule=rule_pb2.RuleSource(inline=everything), limit=1000)
    assert (summary.scanned, summary.matched, summary.truncated) == (1000, 1000, True)


# --- 9. ReemitEvent -------------------------------------------------------------------------------------------


async def test_reemit_stores_a_new_event_matched_against_the_current_rules(stubs: Stubs) -> None:
    await make_trigger(stubs)
    r1 = await make_rule(stubs, tree_rule("demo.r1", leaf("kind", "equals", "a")))
    original = await emit(stubs.events, {"kind": "a", "n": 1}, config=struct({"c": 1}), source_ref="sensor-1")
    assert fired(original) == ["demo.r1"]
    ev = original.event

    changed = rule_pb2.Rule(id=r1.id)
    changed.conditions.append(leaf("kind", "equals", "z"))
    await update_rule(stubs, changed, "conditions")
    await make_rule(stubs, tree_rule("demo.r2", leaf("n", "inside", [1, 2])))

    again = await stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=ev.id))
    new = again.event
    assert new.id != ev.id and not again.replayed
    assert (new.trigger_ref, new.trigger, new.source_ref) == (ev.trigger_ref, ev.trigger, ev.source_ref)
    assert new.payload == ev.payload and new.config == ev.config
    assert new.reemit_of == ev.id
    assert fired(again) == ["demo.r2"]
    assert again.enforcements[0].event == new.id

    got = await stubs.events.GetEvent(event_pb2.GetEventRequest(id=new.id))
    assert got.reemit_of == ev.id and got.payload == ev.payload
    assert not (await stubs.events.GetEvent(event_pb2.GetEventRequest(id=ev.id))).HasField("reemit_of")
    listed = await stubs.events.ListEvents(event_pb2.ListEventsRequest(reemit_of=ev.id))
    assert [e.id for e in listed.events] == [new.id]
    assert list((await stubs.events.ListEvents(event_pb2.ListEventsRequest(reemit_of=new.id))).events) == []
    everything = await stubs.events.ListEvents(event_pb2.ListEventsRequest())
    assert [e.id for e in everything.events] == [new.id, ev.id]

    # A re-emission re-emitted names its own original.
    third = await stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=new.id))
    assert third.event.reemit_of == new.id and fired(third) == ["demo.r2"]


async def test_reemit_with_request_id_is_idempotent(stubs: Stubs) -> None:
    await make_trigger(stubs)
    await make_rule(stubs, tree_rule("demo.r", leaf("kind", "equals", "a")))
    ev = (await emit(stubs.events, {"kind": "a"})).event
    other = (await emit(stubs.events, {"kind": "b"})).event
    first = await stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=ev.id, request_id="re-1"))
    retry = await stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=ev.id, request_id="re-1"))
    assert not first.replayed and retry.replayed
    assert retry.event == first.event
    assert [e.id for e in retry.enforcements] == [e.id for e in first.enforcements] and len(first.enforcements) == 1
    listed = await stubs.events.ListEvents(event_pb2.ListEventsRequest(reemit_of=ev.id))
    assert [e.id for e in listed.events] == [first.event.id]
    # The key names one re-emission: of another event it is refused.
    err = await rpc_error(
        stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=other.id, request_id="re-1")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "request_id" in field_violations(err)
    # Nor is a CreateEvent of the same payload with that key a retry of the re-emission.
    await rpc_error(
        emit(stubs.events, {"kind": "a"}, request_id="re-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_reemit_of_a_targeted_event_targets_the_same_rule(stubs: Stubs) -> None:
    await make_trigger(stubs)
    await make_rule(stubs, tree_rule("demo.a", leaf("kind", "exists")))
    await make_rule(stubs, tree_rule("demo.b", leaf("kind", "exists")))
    ev = await emit(stubs.events, {"kind": "x"}, rule_ref="demo.b")
    assert fired(ev) == ["demo.b"]
    again = await stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=ev.event.id))
    assert again.event.rule_ref == "demo.b" and fired(again) == ["demo.b"]


async def test_reemit_after_the_trigger_or_targeted_rule_was_deleted_is_failed_precondition(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await make_trigger(stubs)
    await make_rule(stubs, tree_rule("demo.t", leaf("kind", "exists")))
    targeted = (await emit(stubs.events, {"kind": "a"}, rule_ref="demo.t")).event
    await stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(ref="demo.t"))
    err = await rpc_error(
        stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=targeted.id)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "demo.t" in (err.details() or "")
    await stubs.rules.DeleteTrigger(rule_pb2.DeleteTriggerRequest(ref=TRIGGER))
    err = await rpc_error(
        stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=targeted.id)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert TRIGGER in (err.details() or "")
    assert await count(conn, "event") == 1


async def test_reemit_whose_enforcement_would_be_too_large_is_failed_precondition(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    """The request is fine; the stored event cannot go through the current rules."""
    await make_trigger(stubs)
    ev = (await emit(stubs.events, {"s": "x" * 200_000})).event
    copies = {f"c{i}": "<{{ event.payload.s }}>" for i in range(6)}
    await make_rule(stubs, tree_rule("demo.big", leaf("s", "exists"), params=copies))
    err = await rpc_error(
        stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=ev.id)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "demo.big" in (err.details() or "") and field_violations(err) == {}
    assert await count(conn, "event") == 1


async def test_reemit_errors_and_roles(stubs: Stubs) -> None:
    await make_trigger(stubs)
    ev = (await emit(stubs.events, {"kind": "a"})).event
    await rpc_error(stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=ev.id + 1000)), grpc.StatusCode.NOT_FOUND)
    err = await rpc_error(
        stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=0)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "id" in field_violations(err)
    err = await rpc_error(
        stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=ev.id, request_id="x\x00")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "request_id" in field_violations(err)
    err = await rpc_error(
        stubs.events.ListEvents(event_pb2.ListEventsRequest(reemit_of=0)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "reemit_of" in field_violations(err)
    for role in ("sensor", "viewer", "executor"):
        async with channel(stubs.target, token=TOKENS[role]) as ch:
            await rpc_error(
                event_pb2_grpc.EventServiceStub(ch).ReemitEvent(event_pb2.ReemitEventRequest(id=ev.id)),
                grpc.StatusCode.PERMISSION_DENIED,
            )
    listed = await stubs.events.ListEvents(event_pb2.ListEventsRequest())
    assert [e.id for e in listed.events] == [ev.id]
