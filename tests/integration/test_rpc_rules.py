"""RuleService over a real channel to a real api on a real PostgreSQL: triggers and rules."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from shared.gen.automation.v1 import common_pb2, condition_pb2, enforcement_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import count, field_violations, new_event, rpc_error, rule, struct

EQUALS = condition_pb2.CONDITION_OPERATOR_EQUALS


async def make_trigger(stubs: Stubs, ref: str, **kw: Any) -> rule_pb2.Trigger:
    return await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=ref, **kw)))


async def make_rule(stubs: Stubs, msg: rule_pb2.Rule) -> rule_pb2.Rule:
    return await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=msg))


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


# --- triggers -------------------------------------------------------------------------------


async def test_create_trigger_returns_stored_trigger_with_pack_and_schemas(stubs: Stubs) -> None:
    t = await make_trigger(
        stubs,
        "core.webhook",
        label="Webhook",
        description="an HTTP call",
        param_schema=struct({"type": "object"}),
    )
    assert t.id > 0
    assert (t.ref, t.pack_ref, t.label, t.description) == ("core.webhook", "core", "Webhook", "an HTTP call")
    assert t.HasField("param_schema") and dict(t.param_schema) == {"type": "object"}
    assert not t.HasField("out_schema")
    assert t.created.seconds > 0 and t.updated.seconds > 0


@pytest.mark.parametrize("ref", ["", "nodot", "Core.Webhook", "core.web hook", ".webhook"])
async def test_create_trigger_with_bad_ref_is_invalid_argument_naming_trigger_ref(
    stubs: Stubs, conn: asyncpg.Connection, ref: str
) -> None:
    err = await rpc_error(make_trigger(stubs, ref), grpc.StatusCode.INVALID_ARGUMENT)
    assert "trigger.ref" in field_violations(err)
    assert await count(conn, "trigger") == 0


async def test_create_duplicate_trigger_is_already_exists(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs, "core.webhook")
    err = await rpc_error(make_trigger(stubs, "core.webhook", label="again"), grpc.StatusCode.ALREADY_EXISTS)
    assert "core.webhook" in (err.details() or "")
    assert await count(conn, "trigger") == 1


async def test_get_trigger_by_id_and_by_ref(stubs: Stubs) -> None:
    t = await make_trigger(stubs, "core.webhook", label="Webhook")
    by_id = await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(id=t.id))
    by_ref = await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref="core.webhook"))
    assert by_id == t
    assert by_ref == t


async def test_get_missing_trigger_is_not_found(stubs: Stubs) -> None:
    await rpc_error(stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(id=12345)), grpc.StatusCode.NOT_FOUND)
    await rpc_error(stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref="core.nope")), grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (rule_pb2.GetTriggerRequest(), "key"),
        (rule_pb2.GetTriggerRequest(id=0), "id"),
        (rule_pb2.GetTriggerRequest(id=-3), "id"),
        (rule_pb2.GetTriggerRequest(ref="Not A Ref"), "ref"),
    ],
    ids=["no-key", "zero-id", "negative-id", "bad-ref"],
)
async def test_get_trigger_with_bad_key_is_invalid_argument_naming_it(
    stubs: Stubs, request_: rule_pb2.GetTriggerRequest, field: str
) -> None:
    err = await rpc_error(stubs.rules.GetTrigger(request_), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in field_violations(err)


async def test_list_triggers_pages_newest_first_without_duplicates(stubs: Stubs) -> None:
    made = [await make_trigger(stubs, f"pack{i % 2}.t{i}") for i in range(5)]
    seen: list[rule_pb2.Trigger] = []
    token = ""
    pages = 0
    while True:
        page = await stubs.rules.ListTriggers(rule_pb2.ListTriggersRequest(page_size=2, page_token=token))
        pages += 1
        assert len(page.triggers) <= 2
        seen.extend(page.triggers)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert [t.id for t in seen] == [t.id for t in reversed(made)]


async def test_list_triggers_filters_by_pack_ref(stubs: Stubs) -> None:
    for ref in ["alpha.one", "beta.one", "alpha.two", "beta.two", "beta.three"]:
        await make_trigger(stubs, ref)
    alpha = await stubs.rules.ListTriggers(rule_pb2.ListTriggersRequest(pack_ref="alpha"))
    beta = await stubs.rules.ListTriggers(rule_pb2.ListTriggersRequest(pack_ref="beta", page_size=2))
    assert [t.ref for t in alpha.triggers] == ["alpha.two", "alpha.one"]
    assert alpha.next_page_token == ""
    assert [t.ref for t in beta.triggers] == ["beta.three", "beta.two"]
    rest = await stubs.rules.ListTriggers(
        rule_pb2.ListTriggersRequest(pack_ref="beta", page_size=2, page_token=beta.next_page_token)
    )
    assert [t.ref for t in rest.triggers] == ["beta.one"]
    assert rest.next_page_token == ""


async def test_list_triggers_with_bad_paging_is_invalid_argument(stubs: Stubs) -> None:
    err = await rpc_error(
        stubs.rules.ListTriggers(rule_pb2.ListTriggersRequest(page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "page_size" in field_violations(err)
    err = await rpc_error(
        stubs.rules.ListTriggers(rule_pb2.ListTriggersRequest(page_token="!!garbage!!")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in field_violations(err)


async def test_delete_trigger_keeps_trigger_ref_on_rules_and_events_and_unsets_their_trigger_id(
    stubs: Stubs,
) -> None:
    t = await make_trigger(stubs, "core.webhook")
    r = await make_rule(stubs, rule("demo.a", "core.webhook"))
    ev = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook", {"a": 1})))
    assert r.trigger == t.id and ev.event.trigger == t.id

    await stubs.rules.DeleteTrigger(rule_pb2.DeleteTriggerRequest(id=t.id))

    await rpc_error(stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(id=t.id)), grpc.StatusCode.NOT_FOUND)
    kept_rule = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.a"))
    assert kept_rule.trigger_ref == "core.webhook"
    assert not kept_rule.HasField("trigger")
    kept_event = await stubs.events.GetEvent(event_pb2.GetEventRequest(id=ev.event.id))
    assert kept_event.trigger_ref == "core.webhook"
    assert not kept_event.HasField("trigger")
    assert kept_event.payload == ev.event.payload


async def test_delete_trigger_by_ref_then_again_is_not_found(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs, "core.webhook")
    await make_trigger(stubs, "core.other")
    await stubs.rules.DeleteTrigger(rule_pb2.DeleteTriggerRequest(ref="core.webhook"))
    assert await conn.fetchval("SELECT array_agg(ref) FROM trigger") == ["core.other"]
    await rpc_error(
        stubs.rules.DeleteTrigger(rule_pb2.DeleteTriggerRequest(ref="core.webhook")), grpc.StatusCode.NOT_FOUND
    )
    err = await rpc_error(stubs.rules.DeleteTrigger(rule_pb2.DeleteTriggerRequest()), grpc.StatusCode.INVALID_ARGUMENT)
    assert "key" in field_violations(err)
    assert await count(conn, "trigger") == 1


# --- rules: create and read -----------------------------------------------------------------


async def test_create_rule_defaults_to_enabled_and_condition_all(stubs: Stubs) -> None:
    t = await make_trigger(stubs, "core.webhook")
    r = await make_rule(stubs, rule_pb2.Rule(ref="demo.a", trigger_ref="core.webhook", action_ref="core.echo"))
    assert r.id > 0
    assert r.HasField("enabled") and r.enabled is True
    assert r.condition == common_pb2.ENFORCEMENT_CONDITION_ALL
    assert (r.ref, r.pack_ref, r.trigger_ref, r.action_ref) == ("demo.a", "demo", "core.webhook", "core.echo")
    assert r.trigger == t.id
    assert list(r.conditions) == []


async def test_create_rule_stores_conditions_params_and_any(stubs: Stubs) -> None:
    await make_trigger(stubs, "core.webhook")
    msg = rule(
        "demo.a",
        "core.webhook",
        params={"to": "{{ event.payload.user }}", "n": 3},
        conditions=[("body.action", EQUALS, "push"), ("tags", condition_pb2.CONDITION_OPERATOR_CONTAINS, "x")],
        any_of=True,
        enabled=False,
    )
    msg.label, msg.description = "A", "does a"
    r = await make_rule(stubs, msg)
    assert r.enabled is False
    assert r.condition == common_pb2.ENFORCEMENT_CONDITION_ANY
    assert [(c.field, c.operator, c.value.string_value) for c in r.conditions] == [
        ("body.action", EQUALS, "push"),
        ("tags", condition_pb2.CONDITION_OPERATOR_CONTAINS, "x"),
    ]
    assert dict(r.action_params) == {"to": "{{ event.payload.user }}", "n": 3}
    assert (r.label, r.description) == ("A", "does a")
    assert await stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=r.id)) == r


async def test_create_rule_with_malformed_conditions_names_each_bad_part(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await make_trigger(stubs, "core.webhook")
    msg = rule_pb2.Rule(ref="demo.a", trigger_ref="core.webhook", action_ref="core.echo")
    no_operator = msg.conditions.add(field="a")
    no_operator.value.string_value = "x"
    bad_field = msg.conditions.add(field="a..b", operator=EQUALS)
    bad_field.value.string_value = "x"
    msg.conditions.add(field="c", operator=EQUALS)  # no value
    err = await rpc_error(make_rule(stubs, msg), grpc.StatusCode.INVALID_ARGUMENT)
    violations = field_violations(err)
    assert "rule.conditions[0].operator" in violations
    assert "rule.conditions[1].field" in violations
    assert "rule.conditions[2].value" in violations
    assert "rule.conditions[0].field" not in violations
    assert await count(conn, "rule") == 0


@pytest.mark.parametrize("field", ["", "a.", ".a", "a b"])
async def test_create_rule_with_bad_condition_field_names_it(
    stubs: Stubs, conn: asyncpg.Connection, field: str
) -> None:
    await make_trigger(stubs, "core.webhook")
    msg = rule("demo.a", "core.webhook", conditions=[("ok", EQUALS, 1), (field, EQUALS, 1)])
    err = await rpc_error(make_rule(stubs, msg), grpc.StatusCode.INVALID_ARGUMENT)
    assert list(field_violations(err)) == ["rule.conditions[1].field"]
    assert await count(conn, "rule") == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ref": "Bad"}, "rule.ref"),
        ({"ref": ""}, "rule.ref"),
        ({"trigger_ref": "nodot"}, "rule.trigger_ref"),
        ({"action_ref": "no dot"}, "rule.action_ref"),
        ({"condition": 7}, "rule.condition"),
    ],
)
async def test_create_rule_with_bad_field_is_invalid_argument_naming_it(
    stubs: Stubs, conn: asyncpg.Connection, change: dict[str, Any], field: str
) -> None:
    await make_trigger(stubs, "core.webhook")
    msg = rule_pb2.Rule(ref="demo.a", trigger_ref="core.webhook", action_ref="core.echo")
    for name, value in change.items():
        setattr(msg, name, value)
    err = await rpc_error(make_rule(stubs, msg), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in field_violations(err)
    assert await count(conn, "rule") == 0


async def test_create_rule_on_unknown_trigger_is_not_found(stubs: Stubs, conn: asyncpg.Connection) -> None:
    err = await rpc_error(make_rule(stubs, rule("demo.a", "core.missing")), grpc.StatusCode.NOT_FOUND)
    assert "core.missing" in (err.details() or "")
    assert await count(conn, "rule") == 0


async def test_create_duplicate_rule_is_already_exists(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs, "core.webhook")
    await make_rule(stubs, rule("demo.a", "core.webhook"))
    await rpc_error(make_rule(stubs, rule("demo.a", "core.webhook", "core.other")), grpc.StatusCode.ALREADY_EXISTS)
    assert await conn.fetchval("SELECT array_agg(action_ref) FROM rule") == ["core.echo"]


async def test_create_rule_without_action_stores_no_action(stubs: Stubs) -> None:
    await make_trigger(stubs, "core.webhook")
    r = await make_rule(stubs, rule_pb2.Rule(ref="demo.a", trigger_ref="core.webhook"))
    assert r.action_ref == ""


async def test_get_rule_by_id_and_ref_and_missing(stubs: Stubs) -> None:
    await make_trigger(stubs, "core.webhook")
    r = await make_rule(stubs, rule("demo.a", "core.webhook"))
    assert await stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=r.id)) == r
    assert await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.a")) == r
    await rpc_error(stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=r.id + 100)), grpc.StatusCode.NOT_FOUND)
    await rpc_error(stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.zzz")), grpc.StatusCode.NOT_FOUND)
    err = await rpc_error(stubs.rules.GetRule(rule_pb2.GetRuleRequest()), grpc.StatusCode.INVALID_ARGUMENT)
    assert "key" in field_violations(err)


async def test_list_rules_filters_combine(stubs: Stubs) -> None:
    await make_trigger(stubs, "core.webhook")
    await make_trigger(stubs, "core.timer")
    specs = [
        ("p1.a", "core.webhook", "core.echo", True),
        ("p1.b", "core.timer", "core.echo", True),
        ("p1.c", "core.webhook", "core.mail", False),
        ("p2.a", "core.webhook", "core.echo", False),
        ("p2.b", "core.timer", "core.mail", True),
        ("p2.c", "core.webhook", "core.echo", True),
    ]
    for ref, trig, action, enabled in specs:
        await make_rule(stubs, rule(ref, trig, action, enabled=enabled))

    async def refs(**kw: Any) -> list[str]:
        page = await stubs.rules.ListRules(rule_pb2.ListRulesRequest(**kw))
        return [r.ref for r in page.rules]

    assert await refs() == ["p2.c", "p2.b", "p2.a", "p1.c", "p1.b", "p1.a"]
    assert await refs(pack_ref="p1") == ["p1.c", "p1.b", "p1.a"]
    assert await refs(trigger_ref="core.timer") == ["p2.b", "p1.b"]
    assert await refs(action_ref="core.mail") == ["p2.b", "p1.c"]
    assert await refs(enabled=False) == ["p2.a", "p1.c"]
    assert await refs(enabled=True) == ["p2.c", "p2.b", "p1.b", "p1.a"]
    assert await refs(pack_ref="p2", trigger_ref="core.webhook") == ["p2.c", "p2.a"]
    assert await refs(pack_ref="p2", trigger_ref="core.webhook", enabled=True) == ["p2.c"]
    assert await refs(pack_ref="p1", action_ref="core.echo", enabled=True) == ["p1.b", "p1.a"]
    assert await refs(trigger_ref="core.webhook", action_ref="core.echo", enabled=False) == ["p2.a"]
    assert await refs(pack_ref="p1", trigger_ref="core.timer", action_ref="core.mail") == []


async def test_list_rules_pages_without_duplicates(stubs: Stubs) -> None:
    await make_trigger(stubs, "core.webhook")
    for i in range(7):
        await make_rule(stubs, rule(f"demo.r{i}", "core.webhook"))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stubs.rules.ListRules(
            rule_pb2.ListRulesRequest(page_size=3, page_token=token, trigger_ref="core.webhook")
        )
        pages += 1
        seen.extend(r.ref for r in page.rules)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [f"demo.r{i}" for i in reversed(range(7))]


# --- rules: update and delete ---------------------------------------------------------------


async def test_update_rule_disables_and_enables_and_matching_follows(stubs: Stubs) -> None:
    await make_trigger(stubs, "core.webhook")
    r = await make_rule(stubs, rule("demo.a", "core.webhook"))

    def create_event() -> Awaitable[event_pb2.CreateEventResponse]:
        return stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook")))

    off = await stubs.rules.UpdateRule(
        rule_pb2.UpdateRuleRequest(rule=rule_pb2.Rule(id=r.id, enabled=False), update_mask=mask("enabled"))
    )
    assert off.enabled is False
    assert off.action_ref == "core.echo"  # fields outside the mask are kept
    assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=r.id))).enabled is False
    assert len((await create_event()).enforcements) == 0

    on = await stubs.rules.UpdateRule(
        rule_pb2.UpdateRuleRequest(rule=rule_pb2.Rule(ref="demo.a", enabled=True), update_mask=mask("enabled"))
    )
    assert on.enabled is True
    assert len((await create_event()).enforcements) == 1


async def test_update_rule_changes_action_params_and_conditions(stubs: Stubs) -> None:
    await make_trigger(stubs, "core.webhook")
    r = await make_rule(stubs, rule("demo.a", "core.webhook", params={"old": 1}))
    new = rule("demo.a", "core.webhook", params={"msg": "{{ event.payload.m }}"}, conditions=[("kind", EQUALS, "b")])
    new.id = r.id
    new.label = "not in the mask"
    updated = await stubs.rules.UpdateRule(
        rule_pb2.UpdateRuleRequest(rule=new, update_mask=mask("action_params", "conditions"))
    )
    assert dict(updated.action_params) == {"msg": "{{ event.payload.m }}"}
    assert [(c.field, c.value.string_value) for c in updated.conditions] == [("kind", "b")]
    assert updated.label == ""
    assert await stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=r.id)) == updated

    miss = await stubs.events.CreateEvent(
        event_pb2.CreateEventRequest(event=new_event("core.webhook", {"kind": "a", "m": "x"}))
    )
    hit = await stubs.events.CreateEvent(
        event_pb2.CreateEventRequest(event=new_event("core.webhook", {"kind": "b", "m": "y"}))
    )
    assert len(miss.enforcements) == 0
    assert [dict(e.config) for e in hit.enforcements] == [{"msg": "y"}]


async def test_update_rule_changes_label_action_and_condition(stubs: Stubs) -> None:
    await make_trigger(stubs, "core.webhook")
    r = await make_rule(stubs, rule("demo.a", "core.webhook"))
    new = rule_pb2.Rule(
        id=r.id,
        label="L",
        description="D",
        action_ref="core.mail",
        condition=common_pb2.ENFORCEMENT_CONDITION_ANY,
    )
    updated = await stubs.rules.UpdateRule(
        rule_pb2.UpdateRuleRequest(rule=new, update_mask=mask("label", "description", "action_ref", "condition"))
    )
    assert (updated.label, updated.description, updated.action_ref) == ("L", "D", "core.mail")
    assert updated.condition == common_pb2.ENFORCEMENT_CONDITION_ANY
    assert updated.enabled is True


@pytest.mark.parametrize("paths", [[], ["ref"], ["enabled", "trigger_ref"], ["id"]], ids=str)
async def test_update_rule_with_empty_or_unknown_mask_is_invalid_argument_and_changes_nothing(
    stubs: Stubs, paths: list[str]
) -> None:
    await make_trigger(stubs, "core.webhook")
    r = await make_rule(stubs, rule("demo.a", "core.webhook"))
    err = await rpc_error(
        stubs.rules.UpdateRule(
            rule_pb2.UpdateRuleRequest(
                rule=rule_pb2.Rule(id=r.id, ref="demo.zz", trigger_ref="core.other", enabled=False),
                update_mask=mask(*paths),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "update_mask" in field_violations(err)
    assert await stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=r.id)) == r


async def test_update_rule_with_bad_values_names_the_field_and_changes_nothing(stubs: Stubs) -> None:
    await make_trigger(stubs, "core.webhook")
    r = await make_rule(stubs, rule("demo.a", "core.webhook"))
    bad = rule_pb2.Rule(id=r.id, action_ref="Bad Ref")
    bad.conditions.add(field="x")  # no operator, no value
    err = await rpc_error(
        stubs.rules.UpdateRule(
            rule_pb2.UpdateRuleRequest(rule=bad, update_mask=mask("action_ref", "conditions", "enabled"))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    violations = field_violations(err)
    assert {"rule.action_ref", "rule.conditions[0].operator", "rule.conditions[0].value", "rule.enabled"} <= set(
        violations
    )
    assert await stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=r.id)) == r


async def test_update_rule_without_key_is_invalid_and_unknown_rule_is_not_found(stubs: Stubs) -> None:
    err = await rpc_error(
        stubs.rules.UpdateRule(
            rule_pb2.UpdateRuleRequest(rule=rule_pb2.Rule(enabled=False), update_mask=mask("enabled"))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "rule" in field_violations(err)
    await rpc_error(
        stubs.rules.UpdateRule(
            rule_pb2.UpdateRuleRequest(rule=rule_pb2.Rule(id=999, enabled=False), update_mask=mask("enabled"))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await rpc_error(
        stubs.rules.UpdateRule(
            rule_pb2.UpdateRuleRequest(rule=rule_pb2.Rule(ref="demo.none", enabled=False), update_mask=mask("enabled"))
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_delete_rule_removes_it_and_its_enforcements_keep_rule_ref(stubs: Stubs) -> None:
    await make_trigger(stubs, "core.webhook")
    r = await make_rule(stubs, rule("demo.a", "core.webhook"))
    keep = await make_rule(stubs, rule("demo.b", "core.webhook"))
    created = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook")))
    enf = next(e for e in created.enforcements if e.rule_ref == "demo.a")

    await stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(id=r.id))

    await rpc_error(stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=r.id)), grpc.StatusCode.NOT_FOUND)
    assert await stubs.rules.GetRule(rule_pb2.GetRuleRequest(id=keep.id)) == keep
    stored = await stubs.enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=enf.id))
    assert stored.rule_ref == "demo.a" and not stored.HasField("rule")
    await rpc_error(stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(id=r.id)), grpc.StatusCode.NOT_FOUND)


async def test_delete_rule_by_ref_and_bad_key(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await make_trigger(stubs, "core.webhook")
    await make_rule(stubs, rule("demo.a", "core.webhook"))
    err = await rpc_error(
        stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(ref="BAD")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "ref" in field_violations(err)
    assert await count(conn, "rule") == 1
    await stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(ref="demo.a"))
    assert await count(conn, "rule") == 0
    await rpc_error(stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(ref="demo.a")), grpc.StatusCode.NOT_FOUND)
