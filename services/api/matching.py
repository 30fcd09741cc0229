"""Rule conditions and action-parameter templates: pure functions, no I/O.

Values are JSON data (dict, list, str, int, float, bool, None); type checks test dict and
list directly, since the abstract-class checks cost more than the matching itself.

Conditions are ``{field, operator, value}`` objects over the event payload, where ``field``
is a dot path (``body.items.0.name``; a numeric segment indexes a list). Operators:
``equals`` and ``not_equals`` (JSON equality; a missing field equals nothing), ``contains``
(substring of a string, element of a list, key of an object). A rule combines them with
``all`` or ``any``; an empty list always matches.

Templates in action parameters: ``{{ event.payload.a.b }}``, ``{{ event.id }}``,
``{{ event.trigger }}`` (the trigger reference), ``{{ event.created }}`` (ISO 8601),
``{{ rule.ref }}``. A string that is exactly one template keeps the JSON type of the value;
templates inside other text are interpolated (objects and lists as JSON); a missing path
renders as null when whole and as an empty string when mixed. Nothing is evaluated: a
template is a path lookup and nothing more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

OPERATORS = frozenset({"equals", "not_equals", "contains"})
_MISSING = object()
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\s*\}\}")
_WHOLE = re.compile(r"^\s*\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\s*\}\}\s*$")
_FIELD = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")


def condition_violations(conditions: Sequence[Any], field_name: str = "rule.conditions") -> list[tuple[str, str]]:
    """Every problem of a condition list, as (field, description) pairs naming the condition."""
    problems: list[tuple[str, str]] = []
    for i, cond in enumerate(conditions):
        where = f"{field_name}[{i}]"
        if not isinstance(cond, Mapping):
            problems.append((where, "must be an object with field, operator and value"))
            continue
        unknown = set(cond) - {"field", "operator", "value"}
        if unknown:
            problems.append((where, f"unknown keys {sorted(unknown)}"))
        fld = cond.get("field")
        if not isinstance(fld, str) or not _FIELD.match(fld):
            problems.append((f"{where}.field", "must be a dot path such as body.action"))
        op = cond.get("operator")
        if op not in OPERATORS:
            problems.append((f"{where}.operator", f"must be one of {sorted(OPERATORS)}, got {op!r}"))
        if "value" not in cond:
            problems.append((f"{where}.value", "is required"))
    return problems


def lookup(data: Any, path: str) -> Any:
    """The value at a dot path, or the _MISSING sentinel."""
    current = data
    for segment in path.split("."):
        if isinstance(current, dict):
            if segment not in current:
                return _MISSING
            current = current[segment]
        elif isinstance(current, list) and segment.isdigit():
            index = int(segment)
            if index >= len(current):
                return _MISSING
            current = current[index]
        else:
            return _MISSING
    return current


def _json_equal(a: Any, b: Any) -> bool:
    # JSON has one number type: 1 and 1.0 are equal, but true is not 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _holds(cond: Mapping[str, Any], payload: Mapping[str, Any]) -> bool:
    actual = lookup(payload, cond["field"])
    expected = cond["value"]
    op = cond["operator"]
    if op == "equals":
        return actual is not _MISSING and _json_equal(actual, expected)
    if op == "not_equals":
        return actual is _MISSING or not _json_equal(actual, expected)
    if isinstance(actual, str):
        return isinstance(expected, str) and expected in actual
    if isinstance(actual, list):
        return any(_json_equal(item, expected) for item in actual)
    if isinstance(actual, dict):
        return isinstance(expected, str) and expected in actual
    return False


def matches(conditions: Sequence[Mapping[str, Any]], condition: str, payload: Mapping[str, Any]) -> bool:
    """Whether a payload satisfies a (valid) condition list combined with ``all`` or ``any``."""
    if not conditions:
        return True
    results = (_holds(c, payload) for c in conditions)
    return any(results) if condition == "any" else all(results)


def _text(value: Any) -> str:
    if value is _MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """Renders every template string inside a JSON value against ``context``."""
    if isinstance(value, str):
        whole = _WHOLE.match(value)
        if whole:
            found = lookup(context, whole.group(1))
            return None if found is _MISSING else found
        if "{{" not in value:
            return value
        return _TEMPLATE.sub(lambda m: _text(lookup(context, m.group(1))), value)
    if isinstance(value, dict):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context) for v in value]
    return value


def template_context(
    *,
    event_id: int | None,
    trigger_ref: str,
    created_iso: str | None,
    payload: Mapping[str, Any],
    rule_ref: str,
    source_ref: str | None = None,
) -> dict[str, Any]:
    """The names a template may use."""
    return {
        "event": {
            "id": event_id,
            "trigger": trigger_ref,
            "trigger_ref": trigger_ref,
            "created": created_iso,
            "payload": payload,
            "source_ref": source_ref,
        },
        "rule": {"ref": rule_ref},
    }
