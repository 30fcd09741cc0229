"""Trigger schemas: a trigger's ``out_schema`` as a JSON Schema, checked when it is stored and
enforced on every event of the trigger (per its ``schema_mode``).

The validator is ``jsonschema-rs`` (Rust; README "Schemas" has the measurement that chose it):
drafts 4, 6, 7, 2019-09 and 2020-12, by ``$schema`` (2020-12 when it names none). A schema is a
client's data, run against every event of its trigger, so what it may cost is bounded before
it is stored, as the rule language's conditions are:

- its size and depth are those of any JSON value the api takes (64 KiB, 16 levels);
- ``pattern`` and ``patternProperties`` run on the ``regex`` crate (linear time, like RE2:
  ``(a+)+$`` cannot backtrack), each compiled within ``_REGEX_BYTES``;
- ``$ref`` points inside the schema only (``#`` JSON pointers and ``#name`` anchors): no remote
  or relative references (nothing is ever fetched: the validator runs offline) and no
  ``$dynamicRef``/``$recursiveRef``;
- no ``$ref`` cycle: a recursive schema would let one event's cost grow with the branching of
  its recursion (payloads are at most 16 levels deep: write the levels out);
- with every ``$ref`` inlined, at most ``MAX_SCHEMA_NODES`` subschemas: validation visits each
  at most once per value of the payload, so one event costs at most that many times its size;
- ``format`` is an annotation, not checked (its checks are not all linear, and they differ
  between libraries).

Problems name the schema node (``trigger.out_schema.properties.repo.type``); an event's
problems name the payload path (``event.payload.repo.name``) and the keyword that failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import jsonschema_rs

from services.api import secrets
from shared.errors import clip

MODES = ("off", "warn", "enforce")
MAX_SCHEMA_NODES = 2000
"""Subschemas of one schema with every ``$ref`` inlined."""
MAX_EVENT_ERRORS = 5
"""Problems kept per event: what an error lists, and what a 'warn' event stores."""
MAX_ERROR_TEXT = 200
"""Characters of one problem's text."""
_REGEX_BYTES = 1 << 20
"""Compiled size of one pattern (and its lazy DFA's cache), at most: a pattern like a{1000}{1000}
is refused when the schema is stored instead of taking memory at every event."""

DRAFTS = {
    "http://json-schema.org/draft-04/schema": "draft 4",
    "http://json-schema.org/draft-06/schema": "draft 6",
    "http://json-schema.org/draft-07/schema": "draft 7",
    "https://json-schema.org/draft/2019-09/schema": "draft 2019-09",
    "https://json-schema.org/draft/2020-12/schema": "draft 2020-12",
}

# Keywords whose value is one subschema, a list of them, or a map of names to them.
_ONE = (
    "additionalProperties",
    "propertyNames",
    "additionalItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentSchema",
    "items",
)
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
_REFUSED = ("$dynamicRef", "$recursiveRef")


def _node_path(base: str, pointer: tuple[str, ...]) -> str:
    return base + "".join(f".{p}" if p.replace("_", "").replace("-", "").isalnum() else f"[{p!r}]" for p in pointer)


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


@dataclass(slots=True)
class _Walk:
    """One pass over a schema's subschemas: references resolved, cycles and size checked."""

    root: Any
    field: str
    anchors: dict[str, tuple[str, ...]]
    problems: list[tuple[str, str]]

    def children(self, node: Any, at: tuple[str, ...]) -> Iterator[tuple[Any, tuple[str, ...]]]:
        if not isinstance(node, dict):
            return
        for key in _ONE:
            if isinstance(node.get(key), dict | bool):
                yield node[key], (*at, key)
        for key in _LIST:
            if isinstance(node.get(key), list):
                for i, child in enumerate(node[key]):
                    yield child, (*at, key, str(i))
        for key in _MAP:
            if isinstance(node.get(key), dict) and key not in ("$defs", "definitions"):
                for name, child in node[key].items():
                    if isinstance(child, dict | bool):
                        yield child, (*at, key, name)

    def resolve(self, ref: str, at: tuple[str, ...]) -> tuple[Any, tuple[str, ...]] | None:
        where = _node_path(self.field, (*at, "$ref"))
        if not ref.startswith("#"):
            self.problems.append(
                (where, f"may only point inside the schema ('#/...' or '#name'), got {clip(ref, 60)!r}")
            )
            return None
        fragment = ref[1:]
        if fragment and not fragment.startswith("/"):
            pointer = self.anchors.get(fragment)
            if pointer is None:
                self.problems.append((where, f"names no $anchor of this schema: {clip(ref, 60)!r}"))
                return None
        else:
            pointer = tuple(_unescape(t) for t in fragment.split("/")[1:]) if fragment else ()
        node = self.root
        for token in pointer:
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                self.problems.append((where, f"points at nothing in this schema: {clip(ref, 60)!r}"))
                return None
        return node, pointer

    def size(self, node: Any, at: tuple[str, ...], stack: tuple[tuple[str, ...], ...], budget: list[int]) -> None:
        """Counts the subschemas under ``node`` with references inlined into ``budget``; stops
        at the first problem."""
        budget[0] -= 1
        if budget[0] < 0 or self.problems:
            return
        if isinstance(node, dict):
            for key in _REFUSED:
                if key in node:
                    self.problems.append(
                        (_node_path(self.field, (*at, key)), "is not supported (use $ref inside the schema)")
                    )
                    return
            ref = node.get("$ref")
            if isinstance(ref, str):
                target = self.resolve(ref, at)
                if target is None:
                    return
                node_, pointer = target
                if pointer in stack or pointer == at:
                    self.problems.append(
                        (
                            _node_path(self.field, (*at, "$ref")),
                            f"makes a cycle ({clip(ref, 60)!r} leads back here): recursive schemas are not accepted",
                        )
                    )
                    return
                self.size(node_, pointer, (*stack, at), budget)
        for child, where in self.children(node, at):
            self.size(child, where, (*stack, at), budget)


def _anchors(node: Any, at: tuple[str, ...], out: dict[str, tuple[str, ...]], depth: int = 0) -> None:
    if depth > 64:
        return
    if isinstance(node, dict):
        for key in ("$anchor", "$dynamicAnchor"):
            if isinstance(node.get(key), str):
                out.setdefault(node[key], at)
        for key, child in node.items():
            _anchors(child, (*at, key), out, depth + 1)
    elif isinstance(node, list):
        for i, child in enumerate(node):
            _anchors(child, (*at, str(i)), out, depth + 1)


def _embedded_ids(node: Any, at: tuple[str, ...], out: list[tuple[str, ...]], depth: int = 0) -> None:
    if depth > 64:
        return
    if isinstance(node, dict):
        if at and isinstance(node.get("$id"), str) and not node["$id"].startswith("#"):
            out.append((*at, "$id"))
        for key, child in node.items():
            if key not in ("enum", "const", "examples", "default"):
                _embedded_ids(child, (*at, key), out, depth + 1)
    elif isinstance(node, list):
        for i, child in enumerate(node):
            _embedded_ids(child, (*at, str(i)), out, depth + 1)


class Schema:
    """A compiled trigger schema, and the payload paths it marks secret (``secrets.py``)."""

    __slots__ = ("_validator", "draft", "secrets")

    def __init__(self, validator: Any, draft: str, secret_paths: tuple[secrets.Path, ...] = ()) -> None:
        self._validator = validator
        self.draft = draft
        self.secrets = secret_paths

    def problems(self, payload: dict[str, Any], field: str) -> list[tuple[str, str]]:
        """Nothing when ``payload`` conforms; otherwise its first problems, each naming the
        payload path under ``field`` and the keyword."""
        if self._validator.is_valid(payload):
            return []
        out = []
        for e in islice(self._validator.iter_errors(payload), MAX_EVENT_ERRORS):
            path = _node_path(field, tuple(str(p) for p in e.instance_path))
            keyword = str(e.schema_path[-1]) if e.schema_path else "schema"
            out.append((path, clip(f"{keyword}: {e.message}", MAX_ERROR_TEXT)))
        return out or [(field, "does not conform to the trigger's schema")]


def _draft(schema: dict[str, Any]) -> str | None:
    declared = schema.get("$schema")
    if declared is None:
        return "draft 2020-12"
    if not isinstance(declared, str):
        return None
    return DRAFTS.get(declared.rstrip("#"))


def _compile_problem(field: str, exc: Any) -> tuple[str, str]:
    """A meta-schema or compile failure, naming the schema node."""
    node = tuple(str(p) for p in getattr(exc, "instance_path", ()) or ())
    message = str(getattr(exc, "message", "") or exc).split("\n")[0]
    return _node_path(field, node), clip(message, MAX_ERROR_TEXT)


def compile_schema(schema: dict[str, Any], field: str) -> tuple[Schema | None, list[tuple[str, str]]]:
    """The schema compiled, or its problems (each naming the node under ``field``)."""
    draft = _draft(schema)
    if draft is None:
        return None, [(f"{field}.$schema", "must name draft 4, 6, 7, 2019-09 or 2020-12 (or be omitted: 2020-12)")]
    try:
        # Against its draft's meta-schema first: the walk below may then trust the shapes.
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        return None, [_compile_problem(field, exc)]
    except (ValueError, TypeError, RecursionError) as exc:
        return None, [(field, clip(f"is not a schema: {exc}", MAX_ERROR_TEXT))]
    ids: list[tuple[str, ...]] = []
    _embedded_ids(schema, (), ids)
    if ids:
        return None, [(_node_path(field, ids[0]), "embedded resources are not accepted: give $id at the top only")]
    anchors: dict[str, tuple[str, ...]] = {}
    _anchors(schema, (), anchors)
    walk = _Walk(schema, field, anchors, [])
    budget = [MAX_SCHEMA_NODES]
    walk.size(schema, (), (), budget)
    # Definitions are compiled whether a $ref reaches them or not: the same checks, one more
    # budget for them all (what bounds this walk, not what an event costs).
    unreached = [MAX_SCHEMA_NODES]
    for key in ("$defs", "definitions"):
        defs = schema.get(key)
        for name, child in defs.items() if isinstance(defs, dict) else ():
            if isinstance(child, dict) and not walk.problems and unreached[0] >= 0:
                walk.size(child, (key, name), (), unreached)
    if walk.problems:
        return None, walk.problems[:1]
    if budget[0] < 0 or unreached[0] < 0:
        return None, [
            (field, f"has more than {MAX_SCHEMA_NODES:,} subschemas with its $refs inlined (each is checked per event)")
        ]
    try:
        validator = jsonschema_rs.validator_for(
            schema,
            validate_formats=False,
            offline=True,
            pattern_options=jsonschema_rs.RegexOptions(size_limit=_REGEX_BYTES, dfa_size_limit=_REGEX_BYTES),
        )
    except jsonschema_rs.ValidationError as exc:
        # A reference that does not resolve, a pattern the linear engine refuses or too large.
        return None, [_compile_problem(field, exc)]
    except (ValueError, TypeError, RecursionError) as exc:
        return None, [(field, clip(f"does not compile: {exc}", MAX_ERROR_TEXT))]
    marked, problems = secrets.secret_paths(schema, field)
    if problems:
        return None, problems
    return Schema(validator, draft, marked), []
