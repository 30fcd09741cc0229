"""The rule language: condition trees, compiled once into closures; pure functions, no I/O.

A rule's conditions are stored as JSON: a list of nodes combined by ``all`` or ``any``. A
node is a test, ``{"field": "body.action", "operator": "equals", "value": "push"}`` (plus
``"item"`` for ``search``), or a group, ``{"all": [...]}``, ``{"any": [...]}`` or
``{"not": node}``. Operator names are StackStorm's (``not_equals``, the old name of
``nequals``, is still read). The meanings are in ``protos/automation/v1/condition.proto``.

``problems`` says what is wrong with a tree (before it is stored); ``compile_rule`` turns a
valid tree into one closure over a ``Facts`` (each payload path looked up once per event,
however many rules ask); ``RuleSet`` compiles all the rules of a trigger once and picks the
rules to evaluate for an event through an index of their equality tests; ``explain`` walks
a tree for the rule tester with the same leaf functions the closures use.

Regular expressions are RE2 (``google-re2``): time linear in the text, whatever the pattern.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import re2

from services.api.matching import MISSING, Facts, json_equal, scalar_key
from shared import limits

log = logging.getLogger(__name__)

Test = Callable[[Any, Facts], bool]
"""A compiled test: the value at the test's field (or MISSING), and the event's facts."""
Pred = Callable[[Facts], bool]

GROUPS = ("all", "any", "not")
TEXT_OPERATORS = frozenset(
    {
        "iequals",
        "icontains",
        "incontains",
        "startswith",
        "istartswith",
        "endswith",
        "iendswith",
        "matchwildcard",
        "regex",
        "iregex",
        "matchregex",
    }
)
ORDER_OPERATORS = frozenset({"lessthan", "greaterthan", "lessthan_or_equal", "greaterthan_or_equal"})
OPERATORS = frozenset(
    {
        "equals",
        "nequals",
        "contains",
        "ncontains",
        "exists",
        "nexists",
        "inside",
        "ninside",
        "timediff_lt",
        "timediff_gt",
        "search",
        *TEXT_OPERATORS,
        *ORDER_OPERATORS,
    }
)
ALIASES = {"not_equals": "nequals"}
NO_VALUE = frozenset({"exists", "nexists"})

_TIMESTAMP = re.compile(
    r"\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:[.,]\d{1,9})?)?(?:Z|z|[+-]\d\d(?::?\d\d)?)?)?", re.ASCII
)
_RE2_MAX_MEM = 4 << 20
"""Memory one compiled pattern may use: RE2 refuses a pattern that needs more."""


class ConditionError(ValueError):
    """A test that cannot be compiled: why (the caller knows where)."""


def operator_name(name: str) -> str:
    return ALIASES.get(name, name)


def timestamp(value: Any) -> datetime | None:
    """An ISO 8601 timestamp string as an aware datetime (UTC when it has no offset), or None."""
    if not isinstance(value, str) or len(value) > 40 or not _TIMESTAMP.fullmatch(value):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace(",", ".").replace("z", "Z"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_ANCHOR = re2._re2.RE2.Anchor  # type: ignore[attr-defined]
_NO_SPAN = (-1, -1)


def _re2(pattern: str, anchor: str, *, case_sensitive: bool = True, dot_nl: bool = False) -> Callable[[bytes], bool]:
    """Whether RE2 ``pattern`` matches a UTF-8 text: ``search`` (anywhere), ``match`` (at the
    start) or ``fullmatch`` (all of it). ConditionError when RE2 refuses the pattern."""
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.dot_nl = dot_nl
    options.log_errors = False
    options.max_mem = _RE2_MAX_MEM
    options.never_capture = True  # a yes or no is all a test needs
    try:
        compiled = re2.compile(pattern, options=options)  # type: ignore[no-untyped-call]
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ConditionError(f"is not a regular expression RE2 accepts: {detail}") from None
    raw = getattr(compiled, "_regexp", None)
    if raw is None or not hasattr(raw, "Match"):
        method = getattr(compiled, anchor)
        return lambda data: method(data) is not None
    # The wrapper's search() maps byte offsets back to characters for a Match object, which
    # costs five times the match itself on short texts; a test needs only whether it matched.
    where = {"search": _ANCHOR.UNANCHORED, "match": _ANCHOR.ANCHOR_START, "fullmatch": _ANCHOR.ANCHOR_BOTH}[anchor]
    return lambda data: bool(raw.Match(where, data, 0, len(data))[0] != _NO_SPAN)


def wildcard_regex(pattern: str) -> str:
    """A shell-style pattern (``*``, ``?``, ``[abc]``, ``[!abc]``) as an RE2 expression."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(r"\[")
                continue
            body = pattern[i:j]
            i = j + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            escaped = "".join("\\" + ch if ch in "\\^[]" else ch for ch in body)
            out.append(f"[{'^' if negate else ''}{escaped}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


# Tests. Each factory takes the condition's value (checked) and returns a Test.


def _equals(expected: Any) -> Test:
    key = scalar_key(expected)
    if key is not None:
        return lambda actual, _: scalar_key(actual) == key
    return lambda actual, _: actual is not MISSING and json_equal(actual, expected)


def _contains(expected: Any) -> Test:
    def test(actual: Any, facts: Facts) -> bool:
        if isinstance(actual, str):
            return isinstance(expected, str) and expected in actual
        if isinstance(actual, list):
            return facts.list_contains(actual, expected)
        if isinstance(actual, dict):
            return isinstance(expected, str) and expected in actual
        return False

    return test


def _inside(expected: Any) -> Test:
    if isinstance(expected, str):
        return lambda actual, _: isinstance(actual, str) and actual in expected
    if isinstance(expected, dict):  # a key of it
        return lambda actual, _: isinstance(actual, str) and actual in expected
    if isinstance(expected, list):
        scalars = frozenset(k for k in map(scalar_key, expected) if k is not None)
        containers = [item for item in expected if isinstance(item, (dict, list))]

        def test(actual: Any, _: Facts) -> bool:
            key = scalar_key(actual)
            if key is not None:
                return key in scalars
            return actual is not MISSING and any(json_equal(actual, item) for item in containers)

        return test
    raise ConditionError("must be a list, a string or an object")


def _text_test(operator: str, expected: Any) -> Test:
    if not isinstance(expected, str):
        raise ConditionError("must be a string")
    folded = expected.casefold()
    test: Test
    if operator == "iequals":
        test = lambda s, facts: facts.folded(s) == folded  # noqa: E731
    elif operator in ("icontains", "incontains"):
        test = lambda s, facts: folded in facts.folded(s)  # noqa: E731
    elif operator == "startswith":
        test = lambda s, _: s.startswith(expected)  # noqa: E731
    elif operator == "istartswith":
        test = lambda s, facts: facts.folded(s).startswith(folded)  # noqa: E731
    elif operator == "endswith":
        test = lambda s, _: s.endswith(expected)  # noqa: E731
    elif operator == "iendswith":
        test = lambda s, facts: facts.folded(s).endswith(folded)  # noqa: E731
    else:
        if operator == "matchwildcard":
            check = _re2(wildcard_regex(expected), "fullmatch", dot_nl=True)
        elif operator == "regex":
            check = _re2(expected, "search")
        elif operator == "iregex":
            check = _re2(expected, "search", case_sensitive=False)
        else:  # matchregex
            check = _re2(expected, "match", dot_nl=True)
        test = lambda s, facts: check(facts.utf8(s))  # noqa: E731
    if operator == "incontains":
        return lambda actual, facts: not (isinstance(actual, str) and test(actual, facts))
    return lambda actual, facts: isinstance(actual, str) and test(actual, facts)


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "lessthan": lambda a, b: a < b,
    "greaterthan": lambda a, b: a > b,
    "lessthan_or_equal": lambda a, b: a <= b,
    "greaterthan_or_equal": lambda a, b: a >= b,
}


def _order(operator: str, expected: Any) -> Test:
    compare = _ORDER[operator]
    if _number(expected):
        return lambda actual, _: _number(actual) and bool(compare(actual, expected))
    when = timestamp(expected)
    if when is None:
        raise ConditionError("must be a number or an ISO 8601 timestamp")

    def test(actual: Any, _: Facts) -> bool:
        found = timestamp(actual)
        return found is not None and compare(found, when)

    return test


def _timediff(operator: str, expected: Any) -> Test:
    if not _number(expected):
        raise ConditionError("must be a number of seconds")
    less = operator == "timediff_lt"

    def test(actual: Any, _: Facts) -> bool:
        found = timestamp(actual)
        if found is None:
            return False
        age = time.time() - found.timestamp()
        return bool(age < expected) if less else bool(age > expected)

    return test


def _search(expected: Any, item: Pred, weight: int) -> Test:
    if expected not in ("any", "all"):
        raise ConditionError('must be "any" or "all"')
    every = expected == "all"

    def test(actual: Any, facts: Facts) -> bool:
        if not isinstance(actual, list):
            return False
        facts.spend(len(actual) * weight)
        if every:
            for element in actual:  # noqa: SIM110 - a loop, not a generator: the hot path
                if not item(facts.item(element)):
                    return False
            return True
        for element in actual:  # noqa: SIM110
            if item(facts.item(element)):
                return True
        return False

    return test


def leaf_test(node: Mapping[str, Any], item: Pred | None = None) -> Test:
    """The test of one leaf (its ``item`` already compiled for search); ConditionError if its
    value does not suit its operator."""
    operator = operator_name(node["operator"])
    expected = node.get("value")
    if operator == "equals":
        return _equals(expected)
    if operator == "nequals":
        eq = _equals(expected)
        return lambda actual, facts: not eq(actual, facts)
    if operator in ("contains", "ncontains"):
        contains = _contains(expected)
        if operator == "ncontains":
            return lambda actual, facts: not contains(actual, facts)
        return contains
    if operator == "exists":
        return lambda actual, _: actual is not MISSING
    if operator == "nexists":
        return lambda actual, _: actual is MISSING
    if operator in ("inside", "ninside"):
        inside = _inside(expected)
        if operator == "ninside":
            return lambda actual, facts: not inside(actual, facts)
        return inside
    if operator in TEXT_OPERATORS:
        return _text_test(operator, expected)
    if operator in ORDER_OPERATORS:
        return _order(operator, expected)
    if operator in ("timediff_lt", "timediff_gt"):
        return _timediff(operator, expected)
    if operator == "search":
        assert item is not None
        return _search(expected, item, count_nodes([node["item"]]))
    raise ConditionError(f"unknown operator {operator!r}")


def _group(node: Mapping[str, Any]) -> str | None:
    for name in GROUPS:
        if name in node:
            return name
    return None


def compile_node(node: Mapping[str, Any]) -> Pred:
    """One node (valid: see ``problems``) as a predicate."""
    kind = _group(node)
    if kind == "not":
        inner = compile_node(node["not"])
        return lambda facts: not inner(facts)
    if kind is not None:
        return combine([compile_node(child) for child in _cheap_first(node[kind])], kind)
    item = compile_node(node["item"]) if operator_name(node["operator"]) == "search" else None
    test = leaf_test(node, item)
    path = node["field"]
    return lambda facts: test(facts.at(path), facts)


def _never(facts: Facts) -> bool:
    return False


def combine(preds: Sequence[Pred], how: str) -> Pred:
    """Predicates combined by ``all`` or ``any``; an empty ``all`` holds, as does an empty
    top-level list (``compile_rule``). Short lists are chained directly: a generator inside
    all() costs more than the tests themselves."""
    if len(preds) == 1:
        return preds[0]
    if how == "any":
        if len(preds) == 2:
            a, b = preds
            return lambda facts: a(facts) or b(facts)
        if len(preds) == 3:
            a, b, c = preds
            return lambda facts: a(facts) or b(facts) or c(facts)

        def any_of(facts: Facts) -> bool:
            for p in preds:  # noqa: SIM110 - a loop, not a generator: this is the hot path
                if p(facts):
                    return True
            return False

        return any_of
    if len(preds) == 2:
        a, b = preds
        return lambda facts: a(facts) and b(facts)
    if len(preds) == 3:
        a, b, c = preds
        return lambda facts: a(facts) and b(facts) and c(facts)

    def all_of(facts: Facts) -> bool:
        for p in preds:  # noqa: SIM110 - a loop, not a generator: this is the hot path
            if not p(facts):
                return False
        return True

    return all_of


def _cost(node: Mapping[str, Any]) -> int:
    """About what evaluating a node costs: cheap tests go first in a group, so that a group
    that fails usually fails before its regular expressions and searches run. Tests have no
    side effects, so the order changes nothing but the time."""
    kind = _group(node)
    if kind == "not":
        return _cost(node["not"])
    if kind is not None:
        return sum(_cost(child) for child in node[kind])
    operator = operator_name(node["operator"])
    if operator in ("regex", "iregex", "matchregex", "matchwildcard"):
        return 8
    if operator == "search":
        return 16 + _cost(node["item"])
    if operator in TEXT_OPERATORS or operator in ORDER_OPERATORS or operator.startswith("timediff"):
        return 3
    return 1


def _cheap_first(nodes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(nodes, key=_cost)


def compile_rule(conditions: Sequence[Mapping[str, Any]], condition: str) -> Pred:
    """A rule's top-level conditions combined by ``condition``; no conditions always match."""
    if not conditions:
        return lambda facts: True
    return combine([compile_node(node) for node in _cheap_first(conditions)], condition)


def matches(conditions: Sequence[Mapping[str, Any]], condition: str, payload: Mapping[str, Any] | Facts) -> bool:
    """Whether a payload satisfies a rule's conditions (compiled for this one call)."""
    facts = payload if isinstance(payload, Facts) else Facts(payload)
    return compile_rule(conditions, condition)(facts)


# Checking a tree before it is stored.


def problems(conditions: Sequence[Any], where: str = "conditions") -> list[tuple[str, str]]:
    """What is wrong with a tree of JSON nodes, as (location, why) pairs; none when valid.

    Checks the shape, the node count (MAX_CONDITIONS) and depth (MAX_CONDITION_DEPTH), every
    operator's value (regular expressions compile here, once), and that paths inside a
    search's ``item`` start with ``item``.
    """
    out: list[tuple[str, str]] = []
    count = count_nodes(conditions)
    if count > limits.MAX_CONDITIONS:
        out.append((where, f"may hold at most {limits.MAX_CONDITIONS} conditions (tests and groups), got {count}"))
        return out
    for i, node in enumerate(conditions):
        _check(node, f"{where}[{i}]", 1, False, out)
    return out


def count_nodes(conditions: Iterable[Any]) -> int:
    """Tests and groups in a tree (a search's ``item`` included)."""
    total = 0
    stack = list(conditions)
    while stack:
        node = stack.pop()
        total += 1
        if not isinstance(node, dict):
            continue
        for name in ("all", "any"):
            if isinstance(node.get(name), list):
                stack.extend(node[name])
        for name in ("not", "item"):
            if isinstance(node.get(name), dict):
                stack.append(node[name])
    return total


def _check(node: Any, where: str, depth: int, in_item: bool, out: list[tuple[str, str]]) -> None:
    if depth > limits.MAX_CONDITION_DEPTH:
        out.append((where, f"is nested too deep: at most {limits.MAX_CONDITION_DEPTH} levels"))
        return
    if not isinstance(node, dict):
        out.append((where, "must be an object"))
        return
    kinds = [name for name in GROUPS if name in node]
    operator = node.get("operator")
    if len(kinds) + (1 if operator else 0) != 1:
        out.append((where, "must be exactly one of: a test (operator), all, any or not"))
        return
    if kinds:
        kind = kinds[0]
        if kind == "not":
            _check(node["not"], f"{where}.not", depth + 1, in_item, out)
        elif not isinstance(node[kind], list):
            out.append((f"{where}.{kind}", "must be a list"))
        else:
            for i, child in enumerate(node[kind]):
                _check(child, f"{where}.{kind}[{i}]", depth + 1, in_item, out)
        return
    name = operator_name(operator) if isinstance(operator, str) else ""
    if name not in OPERATORS:
        out.append((f"{where}.operator", f"is not an operator: {str(operator)[:40]!r}"))
        return
    path = node.get("field")
    if not isinstance(path, str) or not path:
        out.append((f"{where}.field", "is required"))
    elif in_item and path != "item" and not path.startswith("item."):
        out.append((f"{where}.field", "must start with item inside a search's item (item is the list's item)"))
    if "value" not in node and name not in NO_VALUE:
        out.append((f"{where}.value", "is required"))
        return
    item: Pred | None = None
    if name == "search":
        if not isinstance(node.get("item"), dict):
            out.append((f"{where}.item", "is required with search: the test each item is put to"))
            return
        before = len(out)
        _check(node["item"], f"{where}.item", depth + 1, True, out)
        if len(out) > before:
            return
        item = compile_node(node["item"])
    elif "item" in node:
        out.append((f"{where}.item", "is only for search"))
    try:
        leaf_test(node, item)
    except ConditionError as exc:
        out.append((f"{where}.value", str(exc)))


# Trees in and out of their normal form.


def normal(node: Mapping[str, Any]) -> dict[str, Any]:
    """A stored node with the operator under its current name (not_equals -> nequals)."""
    kind = _group(node)
    if kind == "not":
        return {"not": normal(node["not"])}
    if kind is not None:
        return {kind: [normal(child) for child in node[kind]]}
    out = dict(node)
    out["operator"] = operator_name(node["operator"])
    if "item" in node:
        out["item"] = normal(node["item"])
    return out


# The rules of one trigger, compiled together.


@dataclass(slots=True)
class Compiled:
    """One rule and its predicate."""

    rule: dict[str, Any]
    pred: Pred
    backstop: bool


@dataclass(slots=True)
class RuleSet:
    """Every rule of one trigger, compiled once; ``matching`` answers which enabled rules
    fire for an event (backstop rules only when no standard rule matched).

    Rules whose top level requires ``field equals scalar`` are indexed by it: for an event,
    only the rules whose equality holds, and those without such a test, are evaluated.
    """

    by_ref: dict[str, Compiled] = field(default_factory=dict)
    _always: list[int] = field(default_factory=list)
    _index: dict[str, dict[tuple[str, Any], list[int]]] = field(default_factory=dict)
    _order: list[Compiled] = field(default_factory=list)
    _has_backstop: bool = False
    cost: int = 0
    """About how many nodes one event evaluates at most (unindexed rules, plus the largest
    indexed group): what decides whether matching runs in a thread."""

    @classmethod
    def build(cls, rules: Iterable[dict[str, Any]]) -> RuleSet:
        out = cls()
        for rule in sorted(rules, key=lambda r: r["id"]):
            try:
                pred = compile_rule(rule["conditions"], rule["condition"])
            except Exception as exc:  # noqa: BLE001 - one bad row must not stop its trigger's other rules
                # Only a row written around the api can get here (the api checks every tree).
                log.error("rule %s cannot be compiled, so it never fires until fixed: %r", rule["ref"], exc)
                out.by_ref[rule["ref"]] = Compiled(rule, _never, bool(rule.get("backstop")))
                continue
            compiled = Compiled(rule, pred, bool(rule.get("backstop")))
            out.by_ref[rule["ref"]] = compiled
            if not rule["enabled"]:
                continue
            position = len(out._order)
            out._order.append(compiled)
            out._has_backstop |= compiled.backstop
            guard = _guard(rule["conditions"], rule["condition"])
            if guard is None:
                out._always.append(position)
            else:
                out._index.setdefault(guard[0], {}).setdefault(guard[1], []).append(position)
        weight = [1 + count_nodes(c.rule["conditions"]) for c in out._order]
        out.cost = sum(weight[i] for i in out._always) + sum(
            max(sum(weight[i] for i in group) for group in by_value.values()) for by_value in out._index.values()
        )
        return out

    def candidates(self, facts: Facts) -> list[int]:
        if not self._index:
            return self._always
        picked = list(self._always)
        for path, by_value in self._index.items():
            key = scalar_key(facts.at(path))
            if key is not None and key in by_value:
                picked.extend(by_value[key])
        picked.sort()
        return picked

    def matching(self, facts: Facts) -> list[dict[str, Any]]:
        """The enabled rules that fire for the event, in id order."""
        order = self._order
        hits = [order[i] for i in self.candidates(facts) if order[i].pred(facts)]
        if not self._has_backstop:
            return [c.rule for c in hits]
        standard = [c.rule for c in hits if not c.backstop]
        return standard or [c.rule for c in hits if c.backstop]

    def standard_matches(self, facts: Facts) -> list[dict[str, Any]]:
        """The enabled standard rules that match the event (what keeps a backstop quiet)."""
        order = self._order
        return [order[i].rule for i in self.candidates(facts) if not order[i].backstop and order[i].pred(facts)]


def _guard(conditions: Sequence[Mapping[str, Any]], condition: str) -> tuple[str, tuple[str, Any]] | None:
    """A ``(path, key)`` that must hold by equality for the rule to match, if the top level
    has one (an ``all`` of tests, nested ``all`` groups included)."""
    if condition != "all":
        return None
    stack = list(conditions)
    while stack:
        node = stack.pop(0)
        if "all" in node:
            stack.extend(node["all"])
        elif node.get("operator") == "equals":
            key = scalar_key(node.get("value"))
            if key is not None:
                return node["field"], key
    return None


# The rule tester.


@dataclass(slots=True)
class Result:
    """The outcome of one node, for ``TestRule``."""

    node: str
    holds: bool
    kind: str
    field: str = ""
    expected: Any = MISSING
    found: Any = MISSING
    note: str = ""


def explain(conditions: Sequence[Mapping[str, Any]], condition: str, facts: Facts) -> tuple[bool, list[Result]]:
    """Whether the tree holds, and every node's result (parents first)."""
    results: list[Result] = []
    top = Result("conditions", True, condition)
    results.append(top)
    held = [_explain(node, f"conditions[{i}]", facts, results) for i, node in enumerate(conditions)]
    top.holds = (any(held) if condition == "any" else all(held)) if held else True
    top.note = f"{sum(held)} of {len(held)} hold" if held else "no conditions: every event matches"
    return top.holds, results


def _explain(node: Mapping[str, Any], where: str, facts: Facts, results: list[Result]) -> bool:
    kind = _group(node)
    if kind is not None:
        mine = Result(where, True, kind)
        results.append(mine)
        if kind == "not":
            mine.holds = not _explain(node["not"], f"{where}.not", facts, results)
        else:
            held = [_explain(child, f"{where}.{kind}[{i}]", facts, results) for i, child in enumerate(node[kind])]
            mine.holds = any(held) if kind == "any" else all(held)
            mine.note = f"{sum(held)} of {len(held)} hold"
        return mine.holds
    operator = operator_name(node["operator"])
    item = compile_node(node["item"]) if operator == "search" else None
    actual = facts.at(node["field"])
    holds = leaf_test(node, item)(actual, facts)
    mine = Result(where, holds, operator, node["field"], node.get("value", MISSING), actual)
    mine.note = _note(operator, node.get("value"), actual, holds, item)
    results.append(mine)
    return holds


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if _number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _note(operator: str, expected: Any, actual: Any, holds: bool, item: Pred | None) -> str:
    """Why a test came out as it did, when its result alone does not say."""
    if actual is MISSING:
        return (
            "the field is missing"
            if operator in NO_VALUE
            else f"the field is missing, so {operator} " + ("holds" if holds else "fails")
        )
    if operator == "search":
        if not isinstance(actual, list):
            return f"the field is {_kind_of(actual)}, not a list"
        assert item is not None
        passed = sum(1 for element in actual if item(Facts({"item": element})))  # explain has no budget
        return f"{passed} of {len(actual)} items pass the item test ({expected} needed)"
    if operator in TEXT_OPERATORS and not isinstance(actual, str):
        return f"the field is {_kind_of(actual)}; {operator} needs a string"
    if operator in ORDER_OPERATORS and _number(expected) and not _number(actual):
        return f"the field is {_kind_of(actual)}; {operator} against a number needs a number"
    timediff = operator.startswith("timediff")
    if timediff or (operator in ORDER_OPERATORS and not _number(expected)):
        found = timestamp(actual)
        if found is None:
            return f"the field is not an ISO 8601 timestamp; {operator} needs one"
        if timediff:
            age = time.time() - found.timestamp()
            return f"the timestamp is {abs(age):.0f} seconds {'ago' if age >= 0 else 'ahead'}"
    if operator in ("equals", "nequals") and _kind_of(actual) != _kind_of(expected):
        return f"the field is {_kind_of(actual)}, the value {_kind_of(expected)}: never equal"
    return ""
