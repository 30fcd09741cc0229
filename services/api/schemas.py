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

    def first_problem(self, payload: dict[str, Any], field: str) -> tuple[str, str] | None:
        """None when ``payload`` conforms; otherwise the payload path (under ``field``) and the
        keyword of its first problem, without the message (which may quote a secret value)."""
        if self._validator.is_valid(payload):
            return None
        for e in islice(self._validator.iter_errors(payload), 1):
            keyword = str(e.schema_path[-1]) if e.schema_path else "schema"
            return _node_path(field, tuple(str(p) for p in e.instance_path)), keyword
        return field, "schema"


# ---- fields a schema rules out (TestRule) ---------------------------------------------------

_NOTHING = object()
"""What a path walk over an ``enum``/``const`` value finds where the value has nothing."""
_WALK_STEPS = 20_000
"""Subschemas one ``cannot_exist`` call may visit: a stored schema inlines to at most 2,000, a
path has at most 16 segments, so this only guards against a schema stored before the bounds."""
_CHILDREN_OK = ("object", "array")


def _at(value: Any, segments: tuple[str, ...]) -> Any:
    """The value at ``segments`` as a condition's field lookup walks it (``matching.lookup``)."""
    for segment in segments:
        if isinstance(value, dict) and segment in value:
            value = value[segment]
        elif isinstance(value, list) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            return _NOTHING
    return value


def _types(node: dict[str, Any]) -> set[str] | None:
    declared = node.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list) and all(isinstance(t, str) for t in declared):
        return set(declared)
    return None


@dataclass(slots=True)
class _Excluder:
    """Whether a schema rules out anything at a payload path, for sure. Sound, not complete:
    every keyword it does not understand (``not``, ``if``/``then``/``else``, ``propertyNames``
    with a schema, ``dependentSchemas``, ...) is taken to allow anything."""

    root: Any
    old_refs: bool
    """Drafts 4 to 7: a ``$ref`` replaces its siblings, which are then ignored."""
    steps: int = _WALK_STEPS

    def target(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return True
        fragment = ref[1:]
        if fragment and not fragment.startswith("/"):
            anchors: dict[str, tuple[str, ...]] = {}
            _anchors(self.root, (), anchors)
            pointer = anchors.get(fragment)
            if pointer is None:
                return True
        else:
            pointer = tuple(_unescape(t) for t in fragment.split("/")[1:]) if fragment else ()
        found = _at(self.root, pointer)
        return True if found is _NOTHING else found

    def why(self, node: Any, segments: tuple[str, ...], shown: str) -> str | None:
        """Why nothing can be at ``segments`` under ``node`` (``shown``: the path so far, for
        the reason's words), or None when the schema allows it or cannot tell."""
        self.steps -= 1
        if self.steps < 0:
            return None
        if node is False:
            return f"the schema allows no value at {shown or 'the top'}"
        if not isinstance(node, dict):
            return None
        ref = node.get("$ref")
        if isinstance(ref, str):
            out = self.why(self.target(ref), segments, shown)
            if out is not None or self.old_refs:
                return out
        for key in ("const", "enum"):
            if key in node:
                values = [node[key]] if key == "const" else node[key]
                if isinstance(values, list) and all(_at(v, segments) is _NOTHING for v in values):
                    return (
                        f"{shown or 'the payload'} is limited by {key} to values without it"
                        if segments
                        else (f"{key} allows no value at {shown}")
                    )
        for sub in node.get("allOf", ()) if isinstance(node.get("allOf"), list) else ():
            out = self.why(sub, segments, shown)
            if out is not None:
                return out
        for key in ("anyOf", "oneOf"):
            branches = node.get(key)
            if isinstance(branches, list) and branches:
                reasons = [self.why(b, segments, shown) for b in branches]
                if all(r is not None for r in reasons):
                    return f"no branch of {key} at {shown or 'the top'} allows it ({reasons[0]}, ...)"
        if not segments:
            return None
        return self.own(node, segments, shown)

    def own(self, node: dict[str, Any], segments: tuple[str, ...], shown: str) -> str | None:
        """What the node's own keywords say about its child ``segments[0]`` and below."""
        segment, rest = segments[0], segments[1:]
        here = f"{shown}.{segment}" if shown else segment
        types = _types(node)
        as_object = types is None or "object" in types
        as_array = segment.isdigit() and (types is None or "array" in types)
        if not as_object and not as_array:
            kinds = " or ".join(sorted(types or ()))
            return f"{shown or 'the payload'} is of type {kinds}, which has no {segment!r}"
        reasons = []
        if as_object:
            reasons.append(self.in_object(node, segment, rest, here, shown))
        if as_array:
            reasons.append(self.in_array(node, int(segment), rest, here, shown))
        if all(r is not None for r in reasons):
            return reasons[0]
        return None

    def in_object(self, node: dict[str, Any], name: str, rest: tuple[str, ...], here: str, shown: str) -> str | None:
        if node.get("maxProperties") == 0 or node.get("propertyNames") is False:
            return f"{shown or 'the payload'} may have no properties"
        properties = node.get("properties")
        if isinstance(properties, dict) and name in properties:
            return self.why(properties[name], rest, here)
        if node.get("patternProperties"):
            # Whether an ECMA pattern matches is not decided here: any pattern may.
            return None
        extra = node.get("additionalProperties")
        if extra is None and node.get("unevaluatedProperties") is False:
            # Only its own properties evaluate names when nothing applies other subschemas in place.
            in_place = ("$ref", "allOf", "anyOf", "oneOf", "if", "dependentSchemas", "dependencies")
            if not any(k in node for k in in_place):
                extra = False
        if extra is False:
            return f"{here} is not declared and {shown or 'the payload'} allows no other properties"
        if isinstance(extra, dict):
            return self.why(extra, rest, here)
        return None

    def in_array(self, node: dict[str, Any], index: int, rest: tuple[str, ...], here: str, shown: str) -> str | None:
        most = node.get("maxItems")
        if isinstance(most, int) and not isinstance(most, bool) and index >= most:
            return f"{shown or 'the payload'} holds at most {most} items"
        prefix, rest_schema = node.get("prefixItems"), node.get("items")
        if not isinstance(prefix, list) and isinstance(rest_schema, list):
            # Drafts before 2020-12: items as a list is the tuple, additionalItems the rest.
            prefix, rest_schema = rest_schema, node.get("additionalItems")
        if isinstance(prefix, list) and index < len(prefix):
            return self.why(prefix[index], rest, here)
        if rest_schema is False:
            count = len(prefix) if isinstance(prefix, list) else 0
            return f"{shown or 'the payload'} holds at most {count} items"
        if isinstance(rest_schema, dict):
            return self.why(rest_schema, rest, here)
        return None


def cannot_exist(schema: Any, path: str) -> str | None:
    """Why ``schema`` says a payload can have nothing at the dot ``path`` (a condition's field),
    or None. Conservative: only what the schema rules out for sure (a property not declared
    where no others are allowed, a path through a value whose type has no children, an index
    past ``maxItems``, a ``false`` subschema, ``enum``/``const`` values without it, every branch
    of an ``anyOf``/``oneOf`` ruling it out); anything it cannot decide (``patternProperties``,
    ``not``, ``if``/``then``) counts as allowed. ``schema`` is a stored (so checked) out_schema."""
    if not isinstance(schema, dict | bool):
        return None
    draft = _draft(schema) if isinstance(schema, dict) else "draft 2020-12"
    old = draft in ("draft 4", "draft 6", "draft 7")
    return _Excluder(schema, old).why(schema, tuple(path.split(".")), "")


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
