"""Secret paths collected from schemas (every place a mark can sit) and masking (payloads of
any shape, and rendered text that took a secret)."""

from __future__ import annotations

from typing import Any

import pytest

from services.api import secrets
from services.api.schemas import compile_schema
from services.api.secrets import ANY, MASK, mask_payload, mask_rendered, path_text, secret_paths, secret_values

S = {"x-secret": True}


def paths(schema: dict[str, Any]) -> list[str]:
    found, problems = secret_paths(schema, "f")
    assert problems == []
    return sorted(path_text(p) for p in found)


def test_marks_are_found_under_properties_refs_combinators_and_items() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": S,
            "b": {"$ref": "#/$defs/b"},
            "c": {"allOf": [{"properties": {"d": S}}], "anyOf": [{"properties": {"e": S}}]},
            "list": {"items": {"properties": {"k": S}}},
            "tuple": {"prefixItems": [{}, S]},
            "map": {"additionalProperties": S},
            "pat": {"patternProperties": {"^x": {"properties": {"y": S}}}},
            "ifs": {"if": {}, "then": {"properties": {"t": S}}, "else": {"properties": {"u": S}}},
            "anchored": {"$ref": "#cred"},
            "off": {"x-secret": False, "properties": {"z": S}},
        },
        "$defs": {"b": {"properties": {"pw": S}}, "c": {"$anchor": "cred", "properties": {"key": S}}},
    }
    assert paths(schema) == sorted(
        [
            "a",
            "b.pw",
            "c.d",
            "c.e",
            "list[*].k",
            "tuple[1]",
            "map[*]",
            "pat[*].y",
            "ifs.t",
            "ifs.u",
            "anchored.key",
            "off.z",
        ]
    )


def test_bad_marks_are_refused_naming_the_node() -> None:
    assert secret_paths({"properties": {"a": {"x-secret": 1}}}, "f")[1] == [
        ("f.properties.a.x-secret", "must be true or false")
    ]
    assert secret_paths(S, "f")[1][0][0] == "f.x-secret"
    deep: dict[str, Any] = S
    for _ in range(secrets.MAX_PATH_SEGMENTS + 1):
        deep = {"properties": {"n": deep}}
    assert "deeper" in secret_paths(deep, "f")[1][0][1]
    many = {"properties": {f"p{i}": S for i in range(secrets.MAX_SECRET_PATHS + 1)}}
    assert secret_paths(many, "f")[1] == [("f", f"may mark at most {secrets.MAX_SECRET_PATHS} paths secret")]


def test_the_compiler_accepts_the_keyword_and_keeps_the_paths_with_the_schema() -> None:
    compiled, problems = compile_schema({"type": "object", "properties": {"a": {"type": "string", **S}}}, "f")
    assert problems == [] and compiled is not None
    assert compiled.secrets == (("a",),)
    assert compiled.problems({"a": "x"}, "event.payload") == []
    refused, problems = compile_schema({"properties": {"a": {"x-secret": "yes"}}}, "trigger.out_schema")
    assert refused is None and problems[0][0] == "trigger.out_schema.properties.a.x-secret"


@pytest.mark.parametrize(
    ("payload", "masked"),
    [
        ({"a": {"b": 1, "c": 2}}, {"a": {"b": MASK, "c": 2}}),
        ({"a": [{"b": 1}, {"b": [1, 2]}, 3, [4]]}, {"a": [{"b": MASK}, {"b": MASK}, 3, [4]]}),
        ({"a": "scalar"}, {"a": "scalar"}),
        ({"a": {"x": {"b": 1}}}, {"a": {"x": {"b": MASK}}}),
        ({}, {}),
    ],
)
def test_masking_takes_what_lies_at_the_path_whatever_the_shape(payload: Any, masked: Any) -> None:
    out, _ = mask_payload(payload, [("a", ANY, "b"), ("a", "b")])
    assert out == masked


def test_masking_copies_and_never_changes_the_stored_value() -> None:
    payload = {"a": {"b": "clear"}, "c": [1]}
    out, changed = mask_payload(payload, [("a", "b")])
    assert changed and out == {"a": {"b": MASK}, "c": [1]}
    assert payload == {"a": {"b": "clear"}, "c": [1]}
    assert out["c"] is payload["c"]  # what holds no secret is shared, not copied
    assert mask_payload(payload, [("x",)]) == (payload, False)


def test_rendered_values_holding_a_secret_are_masked() -> None:
    payload = {"token": 'to"ken', "pin": 1234, "flag": True, "obj": {"pw": "pw-1"}}
    values = secret_values(payload, [("token",), ("pin",), ("flag",), ("obj",)])
    assert values == ['to"ken', 1234, True, "pw-1"]
    rendered = {
        "whole": 'to"ken',
        "inside": 'Bearer to"ken',
        "as_json": '{"token":"to\\"ken"}',
        "pin": 1234,
        "pin_text": "pin=1234",
        "flag": True,
        "obj": {"pw": "pw-1"},
        "list": ["fine", "x pw-1 y"],
        "other": "nothing here",
        "number": 7,
    }
    masked, changed = mask_rendered(rendered, values)
    assert changed
    assert masked == {
        "whole": MASK,
        "inside": MASK,
        "as_json": MASK,
        "pin": MASK,
        "pin_text": MASK,
        "flag": MASK,
        "obj": {"pw": MASK},
        "list": ["fine", MASK],
        "other": "nothing here",
        "number": 7,
    }
    # Empty strings and nulls hide nothing: they mask nothing.
    assert secret_values({"a": "", "b": None}, [("a",), ("b",)]) == []
    assert mask_rendered({"x": "y"}, []) == ({"x": "y"}, False)


def test_condition_values_on_secret_fields_are_masked_in_groups_searches_and_by_index() -> None:
    paths = ((("token",)), ("keys", secrets.ANY, "key"), ("creds",), ("pins", 1))
    tree: list[dict[str, Any]] = [
        {"field": "token", "operator": "equals", "value": "hunter2"},
        {"field": "user", "operator": "equals", "value": "ann"},
        {"not": {"field": "creds.password", "operator": "equals", "value": "s3cr3t"}},
        {
            "any": [
                {"field": "pins.1", "operator": "equals", "value": 4321},
                {"field": "pins.0", "operator": "equals", "value": 1},
            ]
        },
        {
            "field": "keys",
            "operator": "search",
            "value": "any",
            "item": {
                "all": [
                    {"field": "item.key", "operator": "equals", "value": "k-one"},
                    {"field": "item.id", "operator": "equals", "value": 1},
                ]
            },
        },
        {"field": "token", "operator": "exists"},
    ]
    masked, changed = secrets.mask_conditions(tree, paths)
    assert changed
    assert masked == [
        {"field": "token", "operator": "equals", "value": "***"},
        {"field": "user", "operator": "equals", "value": "ann"},
        {"not": {"field": "creds.password", "operator": "equals", "value": "***"}},
        {
            "any": [
                {"field": "pins.1", "operator": "equals", "value": "***"},
                {"field": "pins.0", "operator": "equals", "value": 1},
            ]
        },
        {
            "field": "keys",
            "operator": "search",
            "value": "any",
            "item": {
                "all": [
                    {"field": "item.key", "operator": "equals", "value": "***"},
                    {"field": "item.id", "operator": "equals", "value": 1},
                ]
            },
        },
        {"field": "token", "operator": "exists"},
    ]
    assert tree[0]["value"] == "hunter2"  # the stored tree is not changed
    assert secrets.mask_conditions(tree, ()) == (tree, False)
    # A field above a secret compares a value that holds it.
    assert (
        secrets.mask_conditions([{"field": "keys", "operator": "contains", "value": {"key": "k"}}], paths)[0][0][
            "value"
        ]
        == "***"
    )
