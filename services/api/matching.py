"""Payload lookups for conditions and action-parameter templates: pure functions, no I/O.

Values are JSON data (dict, list, str, int, float, bool, None); type checks test dict and
list directly, since the abstract-class checks cost more than the matching itself.

Conditions (``conditions.py``) see an event's payload through ``Facts``: each dot path
(``body.items.0.name``; a numeric segment indexes a list) is looked up once per event.

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
from collections.abc import Iterator, Mapping
from typing import Any

from shared import limits

MISSING = object()
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\s*\}\}")
_WHOLE = re.compile(r"^\s*\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\s*\}\}\s*$")
_FIELD = re.compile(r"[^.\s]+(\.[^.\s]+)*")


class RenderTooLarge(Exception):
    """Rendering would produce more text than the event's budget allows."""


def path_problem(path: str) -> str | None:
    """Why a dot path (a condition's field, a template's path) is refused, or None."""
    if len(path) > limits.MAX_FIELD_PATH:
        return f"must be at most {limits.MAX_FIELD_PATH} characters, got {len(path)}"
    if not _FIELD.fullmatch(path):
        return "must be a dot path such as body.action"
    if path.count(".") + 1 > limits.MAX_FIELD_SEGMENTS:
        return f"may have at most {limits.MAX_FIELD_SEGMENTS} segments"
    return None


def templates(value: Any) -> Iterator[str]:
    """The paths of every template inside a JSON value (keys are never rendered)."""
    if isinstance(value, str):
        if "{{" in value:
            for m in _TEMPLATE.finditer(value):
                yield m.group(1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from templates(item)
    elif isinstance(value, list):
        for item in value:
            yield from templates(item)


def template_violations(action_params: Any, field_name: str) -> list[tuple[str, str]]:
    """Problems of a rule's templates: too many, or paths too long (matching cost is bounded
    by construction: every path is walked once per event)."""
    paths = list(templates(action_params))
    problems = []
    if len(paths) > limits.MAX_TEMPLATES:
        problems.append((field_name, f"may hold at most {limits.MAX_TEMPLATES} templates, got {len(paths)}"))
    for path in paths:
        why = path_problem(path)
        if why:
            problems.append((field_name, f"template {{{{ {path[:40]} }}}}: {why}"))
            break
    return problems


def lookup(data: Any, path: str) -> Any:
    """The value at a dot path, or the MISSING sentinel."""
    current = data
    for segment in path.split("."):
        if isinstance(current, dict):
            if segment not in current:
                return MISSING
            current = current[segment]
        elif isinstance(current, list) and segment.isdigit():
            index = int(segment)
            if index >= len(current):
                return MISSING
            current = current[index]
        else:
            return MISSING
    return current


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 equals 1.0, but true is not 1 (at any depth)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(json_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(json_equal, a, b))
    if isinstance(b, (dict, list)):
        return False
    return bool(a == b)


def scalar_key(value: Any) -> tuple[str, Any] | None:
    """A hashable key with JSON equality (1 == 1.0, but true != 1), or None for containers."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", float(value))
    if isinstance(value, str):
        return ("s", value)
    if value is None:
        return ("z", None)
    return None


class SearchTooCostly(Exception):
    """Matching one event would test more list items than MAX_SEARCH_ITEM_TESTS."""


SEARCH_TOO_COSTLY = (
    f"the rules of its trigger would make more than {limits.MAX_SEARCH_ITEM_TESTS:,} item tests searching "
    "its lists; send shorter lists"
)


class Facts:
    """One event's payload as conditions see it: every path is looked up once, a list that a
    ``contains`` condition searches is indexed once, and a text is case-folded and encoded
    once, however many rules ask. ``item`` gives the facts of one item of a searched list,
    sharing these memos and the event's budget of item tests."""

    __slots__ = ("_at", "_encoded", "_folded", "_index", "_spent", "payload")

    def __init__(self, payload: Mapping[str, Any], _parent: Facts | None = None) -> None:
        self.payload = payload
        self._at: dict[str, Any] = {}
        if _parent is None:
            self._index: dict[int, tuple[list[Any], frozenset[tuple[str, Any]], list[Any]]] = {}
            self._folded: dict[int, tuple[str, str]] = {}
            self._encoded: dict[int, tuple[str, bytes]] = {}
            self._spent = [0]
        else:
            self._index, self._folded, self._encoded = _parent._index, _parent._folded, _parent._encoded
            self._spent = _parent._spent

    def at(self, path: str) -> Any:
        try:
            return self._at[path]
        except KeyError:
            found = self._at[path] = lookup(self.payload, path)
            return found

    def item(self, element: Any) -> Facts:
        return Facts({"item": element}, self)

    def spend(self, item_tests: int) -> None:
        """Counts item tests a search is about to make; SearchTooCostly past the budget, so
        that no event can make the rules of its trigger run for seconds."""
        self._spent[0] += item_tests
        if self._spent[0] > limits.MAX_SEARCH_ITEM_TESTS:
            raise SearchTooCostly

    def folded(self, text: str) -> str:
        # The text is kept beside its fold: an id is unique only while its object lives.
        known = self._folded.get(id(text))
        if known is None:
            known = self._folded[id(text)] = (text, text.casefold())
        return known[1]

    def utf8(self, text: str) -> bytes:
        known = self._encoded.get(id(text))
        if known is None:
            known = self._encoded[id(text)] = (text, text.encode("utf-8", "surrogatepass"))
        return known[1]

    def list_contains(self, items: list[Any], expected: Any) -> bool:
        known = self._index.get(id(items))
        if known is None:
            scalars = frozenset(k for k in map(scalar_key, items) if k is not None)
            containers = [item for item in items if isinstance(item, (dict, list))]
            known = self._index[id(items)] = (items, scalars, containers)
        key = scalar_key(expected)
        if key is not None:
            return key in known[1]
        return any(json_equal(item, expected) for item in known[2])


def _text(value: Any) -> str:
    if value is MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


class Budget:
    """Text that rendering may still produce for one event, shared by all its rules.

    A whole-string template inserts the looked-up value itself (no copy, measured later by
    ``encoded.Measure``); a template inside text copies the value's text, which is what can
    multiply a payload. Each value's text is made once per event.
    """

    __slots__ = ("_texts", "remaining")

    def __init__(self, chars: int) -> None:
        self.remaining = chars
        self._texts: dict[int, tuple[Any, str]] = {}

    def text(self, value: Any) -> str:
        if isinstance(value, (dict, list)):
            known = self._texts.get(id(value))
            if known is None:
                known = self._texts[id(value)] = (value, _text(value))
            piece = known[1]
        else:
            piece = _text(value)
        self.remaining -= len(piece)
        if self.remaining < 0:
            raise RenderTooLarge
        return piece


def render(value: Any, context: Mapping[str, Any], budget: Budget | None = None) -> Any:
    """Renders every template string inside a JSON value against ``context``; raises
    ``RenderTooLarge`` when templates inside text would produce more than the budget."""
    if budget is None:
        budget = Budget(2**62)
    return _render(value, context, budget)


def _render(value: Any, context: Mapping[str, Any], budget: Budget) -> Any:
    if isinstance(value, str):
        whole = _WHOLE.match(value)
        if whole:
            found = lookup(context, whole.group(1))
            return None if found is MISSING else found
        if "{{" not in value:
            return value
        return _TEMPLATE.sub(lambda m: budget.text(lookup(context, m.group(1))), value)
    if isinstance(value, dict):
        return {k: _render(v, context, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, context, budget) for v in value]
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
