"""The trigger and rule repository on a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from services.api.store import Rule, Store
from shared.errors import AlreadyExists, InvalidArgument, NotFound


async def make_rule(store: Store, ref: str, trigger_ref: str = "core.webhook", **kw: Any) -> Rule:
    args: dict[str, Any] = {
        "label": "",
        "description": "",
        "action_ref": "core.echo",
        "action_params": {},
        "conditions": [],
        "condition": "all",
        "enabled": True,
    }
    args.update(kw)
    return await store.rules.create_rule(ref=ref, trigger_ref=trigger_ref, **args)


@pytest.fixture
async def hook(store: Store) -> int:
    return (await store.rules.create_trigger("core.webhook", "Webhook", "HTTP calls", None, None)).id


# ---- triggers -----------------------------------------------------------------------------------


async def test_create_and_get_trigger_by_id_and_ref(store: Store) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    t = await store.rules.create_trigger("git.push", "Push", "a push", schema, {"type": "object"})
    assert (t.ref, t.pack_ref, t.label, t.description) == ("git.push", "git", "Push", "a push")
    assert (t.param_schema, t.out_schema) == (schema, {"type": "object"})
    assert await store.rules.get_trigger(t.id) == t
    assert await store.rules.get_trigger("git.push") == t


async def test_duplicate_trigger_ref_already_exists(store: Store, hook: int) -> None:
    with pytest.raises(AlreadyExists, match=r"trigger core\.webhook already exists"):
        await store.rules.create_trigger("core.webhook", "", "", None, None)


async def test_badly_formed_trigger_ref_is_invalid(store: Store, conn: asyncpg.Connection) -> None:
    with pytest.raises(InvalidArgument):
        await store.rules.create_trigger("NoDot", "", "", None, None)
    assert await conn.fetchval("SELECT count(*) FROM trigger") == 0


async def test_unknown_trigger_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="trigger 999 not found"):
        await store.rules.get_trigger(999)
    with pytest.raises(NotFound, match=r"trigger no\.such not found"):
        await store.rules.get_trigger("no.such")
    with pytest.raises(NotFound):
        await store.rules.delete_trigger("no.such")
    with pytest.raises(NotFound):
        await store.rules.delete_trigger(999)


async def test_list_triggers_by_pack_with_paging(store: Store) -> None:
    refs = ["core.a", "git.push", "core.b", "core.c"]
    made = [await store.rules.create_trigger(r, "", "", None, None) for r in refs]
    everything = await store.rules.list_triggers(100, "")
    assert [t.ref for t in everything.items] == sorted(
        refs, key=lambda r: next((t.created, t.id) for t in made if t.ref == r), reverse=True
    )
    first = await store.rules.list_triggers(2, "", pack_ref="core")
    second = await store.rules.list_triggers(2, first.next_token, pack_ref="core")
    assert [t.ref for t in [*first.items, *second.items]] == ["core.c", "core.b", "core.a"]
    assert second.next_token == ""
    assert (await store.rules.list_triggers(10, "", pack_ref="none")).items == []


async def test_delete_trigger_by_id_and_ref_keeps_rules_with_a_null_reference(store: Store, hook: int) -> None:
    rule = await make_rule(store, "demo.r")
    assert rule.trigger == hook
    await store.rules.delete_trigger("core.webhook")
    kept = await store.rules.get_rule(rule.id)
    assert (kept.trigger, kept.trigger_ref) == (None, "core.webhook")
    other = await store.rules.create_trigger("core.timer", "", "", None, None)
    await store.rules.delete_trigger(other.id)
    with pytest.raises(NotFound):
        await store.rules.get_trigger(other.id)


# ---- rules --------------------------------------------------------------------------------------


async def test_create_and_get_rule_by_id_and_ref(store: Store, hook: int) -> None:
    conditions = [{"field": "a", "operator": "equals", "value": 1}]
    rule = await make_rule(
        store,
        "demo.full",
        label="Full",
        description="every field",
        action_params={"x": "{{ event.id }}"},
        conditions=conditions,
        condition="any",
        enabled=False,
    )
    assert (rule.ref, rule.pack_ref, rule.label, rule.description) == ("demo.full", "demo", "Full", "every field")
    assert (rule.trigger, rule.trigger_ref, rule.action_ref) == (hook, "core.webhook", "core.echo")
    assert (rule.action_params, rule.conditions, rule.condition, rule.enabled) == (
        {"x": "{{ event.id }}"},
        conditions,
        "any",
        False,
    )
    assert await store.rules.get_rule(rule.id) == rule
    assert await store.rules.get_rule("demo.full") == rule


async def test_rule_without_action(store: Store, hook: int) -> None:
    rule = await make_rule(store, "demo.none", action_ref=None)
    assert (await store.rules.get_rule(rule.id)).action_ref is None


async def test_duplicate_rule_ref_already_exists(store: Store, hook: int, conn: asyncpg.Connection) -> None:
    await make_rule(store, "demo.r")
    with pytest.raises(AlreadyExists, match=r"rule demo\.r already exists"):
        await make_rule(store, "demo.r")
    assert await conn.fetchval("SELECT count(*) FROM rule") == 1


async def test_rule_on_unknown_trigger_is_not_found(store: Store, conn: asyncpg.Connection) -> None:
    with pytest.raises(NotFound, match=r"trigger core\.nothing not found"):
        await make_rule(store, "demo.r", "core.nothing")
    assert await conn.fetchval("SELECT count(*) FROM rule") == 0


async def test_unknown_rule_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="rule 77 not found"):
        await store.rules.get_rule(77)
    with pytest.raises(NotFound, match=r"rule demo\.x not found"):
        await store.rules.get_rule("demo.x")
    with pytest.raises(NotFound, match=r"rule demo\.x not found"):
        await store.rules.update_rule("demo.x", {"enabled": False})
    with pytest.raises(NotFound):
        await store.rules.delete_rule("demo.x")
    with pytest.raises(NotFound):
        await store.rules.delete_rule(77)


async def test_list_rules_filters_and_paging(store: Store, hook: int) -> None:
    await store.rules.create_trigger("core.timer", "", "", None, None)
    a = await make_rule(store, "demo.a")
    b = await make_rule(store, "demo.b", "core.timer", enabled=False)
    c = await make_rule(store, "ops.c", action_ref="ops.page")
    d = await make_rule(store, "ops.d", "core.timer")

    async def refs(**filters: Any) -> list[str]:
        return [r.ref for r in (await store.rules.list_rules(100, "", **filters)).items]

    assert await refs() == [d.ref, c.ref, b.ref, a.ref]
    assert await refs(pack_ref="demo") == [b.ref, a.ref]
    assert await refs(trigger_ref="core.timer") == [d.ref, b.ref]
    assert await refs(action_ref="ops.page") == [c.ref]
    assert await refs(enabled=False) == [b.ref]
    assert await refs(enabled=True, trigger_ref="core.timer") == [d.ref]
    assert await refs(pack_ref="ops", action_ref="core.echo") == [d.ref]
    first = await store.rules.list_rules(3, "")
    second = await store.rules.list_rules(3, first.next_token)
    assert [r.ref for r in first.items] == [d.ref, c.ref, b.ref]
    assert ([r.ref for r in second.items], second.next_token) == ([a.ref], "")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("label", "New label"),
        ("description", "New description"),
        ("action_ref", "ops.page"),
        ("action_ref", None),
        ("action_params", {"k": [1, {"v": None}]}),
        ("conditions", [{"field": "x", "operator": "contains", "value": "y"}]),
        ("condition", "any"),
        ("enabled", False),
    ],
)
async def test_update_rule_changes_one_column(store: Store, hook: int, column: str, value: Any) -> None:
    rule = await make_rule(store, "demo.r")
    updated = await store.rules.update_rule("demo.r", {column: value})
    assert getattr(updated, column) == value
    assert updated.updated >= rule.updated
    unchanged = {f: getattr(rule, f) for f in ("ref", "label", "description", "action_ref", "enabled") if f != column}
    assert {f: getattr(updated, f) for f in unchanged} == unchanged
    assert await store.rules.get_rule(rule.id) == updated


async def test_update_rule_by_id_with_several_columns(store: Store, hook: int) -> None:
    rule = await make_rule(store, "demo.r")
    updated = await store.rules.update_rule(rule.id, {"enabled": False, "label": "off", "condition": "any"})
    assert (updated.enabled, updated.label, updated.condition) == (False, "off", "any")


async def test_update_rule_with_bad_value_is_invalid_and_changes_nothing(store: Store, hook: int) -> None:
    rule = await make_rule(store, "demo.r")
    with pytest.raises(InvalidArgument):
        await store.rules.update_rule("demo.r", {"action_params": [1, 2], "label": "x"})
    assert await store.rules.get_rule(rule.id) == rule


async def test_delete_rule_by_id_and_ref(store: Store, hook: int) -> None:
    a = await make_rule(store, "demo.a")
    await make_rule(store, "demo.b")
    await store.rules.delete_rule(a.id)
    await store.rules.delete_rule("demo.b")
    assert (await store.rules.list_rules(10, "")).items == []
