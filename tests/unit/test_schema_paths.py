"""``schemas.cannot_exist``: which condition fields a trigger's schema rules out for sure, and
that everything it cannot decide counts as allowed (a false flag would tell a person to
rewrite a rule that can match)."""

from __future__ import annotations

from typing import Any

import pytest

from services.api.schemas import cannot_exist

CLOSED: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "repo": {"type": "object", "properties": {"name": {"type": "string"}}},
        "n": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "kind": {"enum": [{"a": 1}, {"b": 2}]},
        "gone": False,
        "pair": {"type": "array", "prefixItems": [{"type": "object"}, {"type": "integer"}], "items": False},
    },
}


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("nope", "nope is not declared and the payload allows no other properties"),
        ("n.x", "n is of type integer, which has no 'x'"),
        ("repo.name.first", "repo.name is of type string"),
        ("tags.5", "tags holds at most 3 items"),
        ("tags.x", "tags is of type array, which has no 'x'"),
        ("tags.1.x", "tags.1 is of type string"),
        ("kind.c", "limited by enum"),
        ("gone", "allows no value at gone"),
        ("pair.2", "pair holds at most 2 items"),
        ("pair.1.x", "pair.1 is of type integer"),
    ],
)
def test_what_the_schema_rules_out_is_flagged_with_why(path: str, words: str) -> None:
    why = cannot_exist(CLOSED, path)
    assert why is not None and words in why


@pytest.mark.parametrize("path", ["repo", "repo.name", "repo.other", "n", "tags.2", "kind.a", "pair.0.anything"])
def test_what_the_schema_allows_is_not_flagged(path: str) -> None:
    assert cannot_exist(CLOSED, path) is None


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        # Whether a pattern matches a name is not decided: any may.
        ({"patternProperties": {"^x": {}}, "additionalProperties": False}, "a"),
        # `not`, `if`/`then` and schemas of names are taken to allow anything.
        ({"not": {"required": ["a"]}}, "a"),
        ({"if": {"type": "object"}, "then": {"additionalProperties": False}}, "a"),
        ({"propertyNames": {"maxLength": 0}}, "a"),
        # unevaluatedProperties next to an applicator may be satisfied by it.
        ({"allOf": [{"properties": {"a": {}}}], "unevaluatedProperties": False}, "a"),
        # A digit may be an object's key as well as an index.
        ({"maxItems": 0}, "0"),
        # Drafts before 2019-09 ignore a $ref's siblings: they rule nothing out.
        (
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "definitions": {"d": {}},
                "$ref": "#/definitions/d",
                "additionalProperties": False,
            },
            "a",
        ),
        (True, "a"),
        ({}, "a.b.c"),
    ],
)
def test_what_the_schema_cannot_decide_is_not_flagged(schema: Any, path: str) -> None:
    assert cannot_exist(schema, path) is None


def test_references_and_branches_are_followed() -> None:
    closed = {"type": "object", "additionalProperties": False, "properties": {"a": {}}}
    assert cannot_exist({"$defs": {"c": closed}, "$ref": "#/$defs/c"}, "b") is not None
    assert cannot_exist({"$defs": {"c": closed}, "$anchor": "top", "$ref": "#/$defs/c"}, "a") is None
    # 2020-12 applies a $ref beside its siblings: either may rule a path out.
    assert cannot_exist({"$defs": {"c": {}}, "$ref": "#/$defs/c", "additionalProperties": False}, "b") is not None
    assert cannot_exist({"allOf": [{}, closed]}, "b") is not None
    assert cannot_exist({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "a") is not None
    # One branch that allows it is enough to allow it.
    assert cannot_exist({"oneOf": [{"type": "string"}, {"type": "object"}]}, "a") is None
    assert cannot_exist({"unevaluatedProperties": False, "properties": {"a": {}}}, "b") is not None
    # Drafts before 2020-12: items as a list is the tuple, additionalItems the rest.
    old = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "array",
        "items": [{}],
        "additionalItems": False,
    }
    assert cannot_exist(old, "1") is not None and cannot_exist(old, "0") is None
