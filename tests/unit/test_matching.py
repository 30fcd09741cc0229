"""Rule conditions and action-parameter templates (pure functions, no database)."""

from __future__ import annotations

from typing import Any

import pytest

from services.api import conditions, matching


def cond(field: str, operator: str, value: Any) -> dict[str, Any]:
    return {"field": field, "operator": operator, "value": value}


# ---- path_problem and template_violations ------------------------------------------------------


@pytest.mark.parametrize("path", ["body.action", "a.0.b", "x", "a-b.c_d", ".".join("s" * 16)])
def test_dot_paths_within_the_limits_are_accepted(path: str) -> None:
    assert matching.path_problem(path) is None


@pytest.mark.parametrize("path", ["", " ", "a..b", ".a", "a.", "a b", "a\nb"])
def test_a_field_that_is_not_a_dot_path_is_refused(path: str) -> None:
    assert matching.path_problem(path) == "must be a dot path such as body.action"


def test_long_paths_and_many_segments_are_refused() -> None:
    assert matching.path_problem("a" * 257) == "must be at most 256 characters, got 257"
    assert matching.path_problem(".".join("s" * 17)) == "may have at most 16 segments"


def test_templates_are_counted_and_their_paths_checked() -> None:
    params = {"a": "{{ event.payload.x }} and {{ event.id }}", "b": ["{{ rule.ref }}", 3], "{{ keys }}": "plain"}
    assert sorted(matching.templates(params)) == ["event.id", "event.payload.x", "rule.ref"]
    assert matching.template_violations(params, "rule.action_params") == []
    many = {f"k{i}": "{{ event.payload.x }}" for i in range(33)}
    assert matching.template_violations(many, "p") == [("p", "may hold at most 32 templates, got 33")]
    deep = {"k": "{{ " + ".".join("s" * 17) + " }}"}
    ((field, why),) = matching.template_violations(deep, "p")
    assert field == "p" and "at most 16 segments" in why


# ---- lookup -------------------------------------------------------------------------------------

DATA: dict[str, Any] = {
    "a": {"b": {"c": 3}},
    "items": [{"name": "first"}, {"name": "second"}],
    "n": None,
    "flag": False,
    "1": "key one",
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a", {"b": {"c": 3}}),
        ("a.b.c", 3),
        ("items.0.name", "first"),
        ("items.1.name", "second"),
        ("n", None),
        ("flag", False),
        ("1", "key one"),
    ],
)
def test_lookup_follows_dot_paths_and_list_indexes(path: str, expected: Any) -> None:
    assert matching.lookup(DATA, path) == expected


@pytest.mark.parametrize("path", ["missing", "a.x", "a.b.c.d", "items.2.name", "items.-1", "items.name", "n.x"])
def test_lookup_of_absent_path_is_missing_not_none(path: str) -> None:
    assert matching.lookup(DATA, path) is matching.MISSING


# ---- matches ------------------------------------------------------------------------------------


def test_empty_conditions_always_match() -> None:
    assert conditions.matches([], "all", {}) is True
    assert conditions.matches([], "any", {"x": 1}) is True


def test_all_requires_every_condition_any_requires_one() -> None:
    conds = [cond("a", "equals", 1), cond("b", "equals", 2)]
    assert conditions.matches(conds, "all", {"a": 1, "b": 2}) is True
    assert conditions.matches(conds, "all", {"a": 1, "b": 3}) is False
    assert conditions.matches(conds, "any", {"a": 1, "b": 3}) is True
    assert conditions.matches(conds, "any", {"a": 0, "b": 3}) is False


@pytest.mark.parametrize(
    ("actual", "expected", "equal"),
    [
        (1, 1, True),
        (1, 1.0, True),
        ("1", 1, False),
        (True, True, True),
        (True, 1, False),
        (1, True, False),
        (False, 0, False),
        (0, False, False),
        (None, None, True),
        ({"k": [1, 2]}, {"k": [1, 2]}, True),
        ([1, 2], [2, 1], False),
        ("push", "push", True),
        ("Push", "push", False),
    ],
)
def test_equals_and_not_equals_use_json_equality(actual: Any, expected: Any, equal: bool) -> None:
    payload = {"f": actual}
    assert conditions.matches([cond("f", "equals", expected)], "all", payload) is equal
    assert conditions.matches([cond("f", "not_equals", expected)], "all", payload) is (not equal)


def test_missing_field_equals_nothing_and_differs_from_everything() -> None:
    assert conditions.matches([cond("gone", "equals", None)], "all", {}) is False
    assert conditions.matches([cond("gone", "not_equals", None)], "all", {}) is True
    assert conditions.matches([cond("gone", "contains", "x")], "all", {}) is False


@pytest.mark.parametrize(
    ("actual", "expected", "holds"),
    [
        ("refs/heads/main", "heads", True),
        ("refs/heads/main", "tags", False),
        ("abc", 1, False),
        (["a", "b"], "b", True),
        (["a", "b"], "c", False),
        ([1, 2], 1.0, True),
        ([1, 2], True, False),
        ([True], 1, False),
        ([{"k": 1}], {"k": 1}, True),
        ({"key": 1}, "key", True),
        ({"key": 1}, "other", False),
        ({"1": 1}, 1, False),
        (5, 5, False),
        (None, None, False),
    ],
)
def test_contains_is_substring_element_or_key(actual: Any, expected: Any, holds: bool) -> None:
    assert conditions.matches([cond("f", "contains", expected)], "all", {"f": actual}) is holds


def test_conditions_on_nested_paths_and_list_indexes() -> None:
    payload = {"body": {"commits": [{"author": "ann"}, {"author": "bob"}]}}
    assert conditions.matches([cond("body.commits.1.author", "equals", "bob")], "all", payload) is True
    assert conditions.matches([cond("body.commits.2.author", "equals", "bob")], "all", payload) is False


# ---- render -------------------------------------------------------------------------------------

CONTEXT = matching.template_context(
    event_id=42,
    trigger_ref="core.webhook",
    created_iso="2024-05-01T12:00:00+00:00",
    payload={"n": 7, "flag": True, "obj": {"b": 2, "a": 1}, "list": [1, "x"], "name": "ann", "none": None},
    rule_ref="demo.rule",
    source_ref="sensor.one",
)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ event.payload.n }}", 7),
        ("{{event.payload.flag}}", True),
        ("  {{ event.payload.obj }}  ", {"b": 2, "a": 1}),
        ("{{ event.payload.list }}", [1, "x"]),
        ("{{ event.payload.none }}", None),
        ("{{ event.payload.list.1 }}", "x"),
        ("{{ event.id }}", 42),
        ("{{ event.trigger }}", "core.webhook"),
        ("{{ event.created }}", "2024-05-01T12:00:00+00:00"),
        ("{{ event.source_ref }}", "sensor.one"),
        ("{{ rule.ref }}", "demo.rule"),
        ("{{ event.payload.gone }}", None),
    ],
)
def test_whole_template_keeps_the_json_type(template: str, expected: Any) -> None:
    assert matching.render(template, CONTEXT) == expected


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("n={{ event.payload.n }}", "n=7"),
        ("{{ event.payload.name }}/{{ rule.ref }}", "ann/demo.rule"),
        ("flag {{ event.payload.flag }}", "flag true"),
        ("obj {{ event.payload.obj }}", 'obj {"a":1,"b":2}'),
        ("list {{ event.payload.list }}", 'list [1,"x"]'),
        ("[{{ event.payload.gone }}]", "[]"),
        ("[{{ event.payload.none }}]", "[]"),
        ("event {{ event.id }} of {{ event.trigger }}", "event 42 of core.webhook"),
    ],
)
def test_mixed_template_interpolates_text(template: str, expected: str) -> None:
    assert matching.render(template, CONTEXT) == expected


def test_render_walks_nested_objects_and_lists_and_leaves_other_values() -> None:
    params = {
        "who": "{{ event.payload.name }}",
        "nested": {"list": ["{{ event.payload.n }}", "plain", 3, None, False]},
        "text": "no templates here",
        "braces": "{ not a template }",
        "number": 1.5,
    }
    assert matching.render(params, CONTEXT) == {
        "who": "ann",
        "nested": {"list": [7, "plain", 3, None, False]},
        "text": "no templates here",
        "braces": "{ not a template }",
        "number": 1.5,
    }


def test_render_does_not_evaluate_expressions() -> None:
    assert matching.render("{{ event.payload.n + 1 }}", CONTEXT) == "{{ event.payload.n + 1 }}"
    assert matching.render("{{ __import__('os') }}", CONTEXT) == "{{ __import__('os') }}"


def test_template_context_names() -> None:
    ctx = matching.template_context(event_id=None, trigger_ref="a.b", created_iso=None, payload={}, rule_ref="r.x")
    assert ctx == {
        "event": {
            "id": None,
            "trigger": "a.b",
            "trigger_ref": "a.b",
            "created": None,
            "payload": {},
            "source_ref": None,
        },
        "rule": {"ref": "r.x"},
    }
