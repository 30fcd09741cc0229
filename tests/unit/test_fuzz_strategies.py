"""The fuzzer's strategies (no api): every RPC gets one, and what they draw goes on the wire."""

from __future__ import annotations

import math
from typing import Any

import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api.schemas import compile_schema
from shared import limits
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, event_pb2, rule_pb2
from shared.gen.io.cloudevents.v1 import cloudevents_pb2
from tools.fuzz import catalog
from tools.fuzz.invariants import Protected, describe
from tools.fuzz.strategies import (
    DEPTHS,
    REQUEST_BUDGET,
    SCENARIOS,
    Call,
    Pool,
    Strategies,
    cycle,
    hostile_schemas,
    json_depth,
    near_misses,
    nest,
)

METHODS = catalog.methods()
QUICK = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
# No values above the message size limit here: they are slow to build and prove nothing more.
STRATEGIES = Strategies(huge=False)


def test_the_catalog_walks_every_service_of_the_package() -> None:
    services = {m.service for m in METHODS}
    assert services >= {
        "EventService",
        "EnforcementService",
        "RuleService",
        "ExecutionService",
        "HistoryService",
        "AnalyticsService",
    }
    assert all(m.path == f"/automation.v1.{m.service}/{m.name}" for m in METHODS)
    watch = catalog.find("WatchEnforcements")
    assert watch.server_streaming and watch.kind == "unary_stream"
    assert catalog.by_path("/automation.v1.EventService/CreateEvent").request is event_pb2.CreateEventRequest


def test_every_scenario_names_a_method_of_the_contract() -> None:
    names = {m.name for m in METHODS}
    assert set(SCENARIOS) <= names


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.short)
def test_every_request_type_gets_a_strategy_whose_draws_serialize(method: catalog.Method) -> None:
    seen: set[str] = set()

    @QUICK
    @given(STRATEGIES.call(method))
    def check(call: Call) -> None:
        assert call.method is method
        seen.add(call.origin.partition(":")[0])
        if call.message is not None:
            assert isinstance(call.message, method.request)
            # What goes on the wire is the message's encoding, and the encoding decodes again
            # unless it nests deeper than any decoder accepts (which the api must refuse too).
            assert call.payload == call.message.SerializeToString()
            # Every request can be described: the run's reports and its slowest calls do.
            assert describe(call.message)
            try:
                decoded = method.request.FromString(call.payload)
            except DecodeError as exc:
                assert "MaxDepth" in str(exc), exc
            else:
                assert decoded.ByteSize() == len(call.payload)

    check()
    assert seen & {"plausible", "edge", "scenario"}, seen


@QUICK
@given(st.sampled_from(DEPTHS) | st.integers(1, 40), st.integers(0, 2**48))
def test_deep_values_reach_the_depths_asked(depth: int, bits: int) -> None:
    assert json_depth(nest(depth, "leaf", bits, "k")) == depth


@QUICK
@given(STRATEGIES.json.deep())
def test_deep_values_stay_within_the_depths_drawn(value: object) -> None:
    # deep() nests to a depth it draws from DEPTHS or 1..40, which the value does not carry:
    # the range is what can be checked of one value.
    assert 1 <= json_depth(value) <= max(40, *DEPTHS)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(STRATEGIES.json.values())
def test_json_values_go_into_a_struct(value: Any) -> None:
    s = struct_pb2.Struct()
    s.update({"v": value})
    assert s.ByteSize() >= 0


def test_edges_are_reachable() -> None:
    """The strategies can produce the values the brief names: checked by search, not luck."""
    from hypothesis import find

    quick = settings(max_examples=3000, database=None, suppress_health_check=list(HealthCheck))
    assert math.isnan(find(STRATEGIES.json.values(), lambda v: isinstance(v, float) and math.isnan(v), settings=quick))
    assert find(STRATEGIES.json.values().map(json_depth), lambda d: d >= 33, settings=quick) >= 33
    nul = find(STRATEGIES.edge.refs("trigger"), lambda r: "\x00" in r, settings=quick)
    assert "\x00" in nul
    assert find(STRATEGIES.edge.enum(common_pb2.EnforcementStatus.DESCRIPTOR), lambda n: n > 3, settings=quick) > 3
    # Big values are searched for by their size: hypothesis would print the value itself.
    assert find(STRATEGIES.edge.string("source_ref").map(len), lambda n: n > 4000, settings=quick) > 4000
    big = STRATEGIES.json.big_string().map(lambda s: len(s.encode()))
    assert find(big, lambda n: n >= limits.MAX_PAYLOAD_BYTES, settings=quick) >= limits.MAX_PAYLOAD_BYTES

    def decisions(c: Call) -> int:
        m = c.message
        return len(m.decisions) if isinstance(m, enforcement_pb2.ResolveEnforcementsRequest) else 0

    calls = STRATEGIES.call(catalog.find("ResolveEnforcements")).map(decisions)
    assert find(calls, lambda n: n > limits.MAX_BATCH, settings=quick) > limits.MAX_BATCH


def test_cycled_lists_stay_within_the_request_budget() -> None:
    events = event_pb2.CreateEventsRequest.DESCRIPTOR.fields_by_name["events"]

    def big(event: event_pb2.NewEvent) -> None:
        event.payload.update({"a": "x" * limits.MAX_MESSAGE_BYTES})

    cycled = cycle([big], limits.MAX_BATCH, events)
    # The budget is the message limit and 2 MiB: one such event passes the limit, a second would
    # pass the budget.
    assert REQUEST_BUDGET < 2 * limits.MAX_MESSAGE_BYTES
    assert len(cycled) == 1
    assert len(cycle([lambda e: None], limits.MAX_BATCH + 1, events)) == limits.MAX_BATCH + 1


def test_near_misses_are_not_the_ref() -> None:
    misses = near_misses("pack.name")
    assert "pack.name\n" in misses and "PACK.NAME" in misses
    assert "pack.name" not in misses
    assert any(len(m) == 300 for m in misses)


def test_the_pool_feeds_answers_back() -> None:
    pool = Pool()
    pool.observe(
        rule_pb2.ListRulesResponse(rules=[rule_pb2.Rule(id=7, ref="p.r", trigger_ref="p.t")], next_page_token="T")
    )
    pool.observe(event_pb2.CreateEventsResponse(receipts=[event_pb2.EventReceipt(event_id=3, enforcement_ids=[4, 5])]))
    assert pool.id("rule", 0) == 7
    assert pool.ref("rule", 0) == "p.r" and pool.ref("trigger", 0) == "p.t"
    assert pool.token(0) == "T"
    assert pool.id("event", 0) == 3 and {pool.id("enforcement", i) for i in range(2)} == {4, 5}
    strategies = Strategies(pool, huge=False)

    @QUICK
    @given(st.data())
    def draws_seen_values(data: st.DataObject) -> None:
        assert data.draw(strategies.plausible.tokens()) in ("T", "")

    draws_seen_values()


def test_protected_refs_and_ids_are_never_mutated() -> None:
    guard = Protected(refs={"ordinary.tick", "ordinary.rule"}, ids={1})
    delete = catalog.find("DeleteRule")
    update = catalog.find("UpdateRule")
    get = catalog.find("GetRule")
    assert guard.touches(delete, rule_pb2.DeleteRuleRequest(ref="ordinary.rule"))
    assert guard.touches(delete, rule_pb2.DeleteRuleRequest(ref="ORDINARY.RULE\n"))
    assert guard.touches(delete, rule_pb2.DeleteRuleRequest(id=1))
    assert guard.touches(update, rule_pb2.UpdateRuleRequest(rule=rule_pb2.Rule(ref="ordinary.rule")))
    assert not guard.touches(delete, rule_pb2.DeleteRuleRequest(id=2))
    assert not guard.touches(get, rule_pb2.GetRuleRequest(id=1)), "reads may name them"
    # Raw bytes are judged by what the api would decode them to.
    raw = rule_pb2.DeleteRuleRequest(id=1).SerializeToString()
    assert guard.touches_raw(delete, raw)
    assert not guard.touches_raw(delete, b"\xff\xff")


def test_a_cloudevent_naming_the_ordinary_trigger_is_never_published() -> None:
    guard = Protected(refs={"ordinary.tick"}, ids={1})
    one = cloudevents_pb2.CloudEvent(id="1", source="s", spec_version="1.0", type="ordinary.tick")
    assert guard.touches(catalog.find("Publish"), one)
    assert guard.touches(catalog.find("PublishBatch"), cloudevents_pb2.CloudEventBatch(events=[one]))
    other = cloudevents_pb2.CloudEvent(id="1", source="s", spec_version="1.0", type="fz.t0")
    assert not guard.touches(catalog.find("PublishBatch"), cloudevents_pb2.CloudEventBatch(events=[other]))


@QUICK
@given(hostile_schemas())
def test_hostile_schemas_are_refused_or_compiled_never_raise(schema: dict[str, Any]) -> None:
    # What the api does with each when it is stored: an answer, never an exception.
    compiled, problems = compile_schema(schema, "trigger.out_schema")
    assert (compiled is None) == bool(problems)
    assert all(where.startswith("trigger.out_schema") and len(why) <= 200 for where, why in problems)


def test_hostile_schemas_cover_what_the_issue_names() -> None:
    """Cycles, huge patterns, nesting past the depth limit and expansion past the subschema
    bound: each refused by the api's own compiler, naming why."""
    cases: dict[str, dict[str, Any]] = {
        "a $ref cycle": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        "a pattern over the compiled size": {"type": "string", "pattern": "a{1000}{1000}"},
        "a backreference": {"type": "string", "pattern": "(a)\\1"},
        "a doubling chain": {
            "$defs": {"d0": {}, **{f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i - 1}"}] * 2} for i in range(1, 13)}},
            "$ref": "#/$defs/d12",
        },
    }
    for what, schema in cases.items():
        compiled, problems = compile_schema(schema, "trigger.out_schema")
        assert compiled is None and problems, what


def test_a_request_with_a_map_is_described() -> None:
    """A CloudEvent's attributes are a map: describing it (as the run does for its slowest
    calls) once raised, which lost that call's OK answer from the ledger."""
    event = cloudevents_pb2.CloudEvent(id="1", source="s", spec_version="1.0", type="t")
    event.attributes["subject"].ce_string = "x"
    event.attributes["time"].ce_string = "2026-01-01T00:00:00Z"
    assert describe(event) == "id='1', source='s', spec_version='1.0', type='t', attributes=<2 entries>"
