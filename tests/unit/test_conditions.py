"""The rule language (services/api/conditions.py): every operator, validation, the rule index.

Operator meanings are StackStorm's criteria operators as specified in
protos/automation/v1/condition.proto; the property tests check the algebra (De Morgan, the
``n`` operators, the legacy flat form) and that the indexed ``RuleSet`` and the rule tester's
``explain`` agree with plain evaluation.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api import conditions
from services.api.conditions import RuleSet, compile_rule, count_nodes, explain, matches, problems
from services.api.matching import MISSING, Facts, json_equal
from shared import limits

Node = dict[str, Any]
ABSENT: Any = MISSING
"""As a payload value in the tables: the field is not in the payload at all."""

NEGATION = {"equals": "nequals", "contains": "ncontains", "icontains": "incontains", "inside": "ninside"}


def t(field: str, op: str, value: Any = ABSENT, item: Node | None = None) -> Node:
    """A test node (no ``value`` key when value is ABSENT)."""
    node: Node = {"field": field, "operator": op}
    if value is not ABSENT:
        node["value"] = value
    if item is not None:
        node["item"] = item
    return node


def holds(node: Node, payload: dict[str, Any]) -> bool:
    """Whether one valid node holds for a payload, by the compiled closure and by explain."""
    assert problems([node]) == []
    compiled = compile_rule([node], "all")(Facts(payload))
    assert explain([node], "all", Facts(payload))[0] is compiled
    return compiled


def payload_of(actual: Any) -> dict[str, Any]:
    return {} if actual is ABSENT else {"f": actual}


# ---- operators, table by table -----------------------------------------------------------------

EQUALS = [
    ("push", "push", True),
    ("push", "Push", False),
    ("push", ABSENT, False),
    ("", ABSENT, False),
    (None, None, True),
    (None, ABSENT, False),
    (None, "", False),
    (None, False, False),
    (1, 1.0, True),
    (1.0, 1, True),
    (0, -0.0, True),
    (5, "5", False),
    ("5", 5, False),
    (True, 1, False),
    (1, True, False),
    (0, False, False),
    (False, 0, False),
    (False, False, True),
    ([1, 2], [1, 2], True),
    ([1, 2], [1.0, 2.0], True),
    ([1, 2], [2, 1], False),
    ([1], [True], False),
    ([1], 1, False),
    (1, [1], False),
    ({"a": 1}, {"a": 1.0}, True),
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}, True),
    ({"a": 1}, {"a": 1, "b": 2}, False),
    ({"a": [True]}, {"a": [1]}, False),
    ("Straße", "STRASSE", False),
]

CONTAINS = [
    # text: a substring
    ("ell", "hello", True),
    ("ELL", "hello", False),
    ("", "hello", True),
    ("hello!", "hello", False),
    (1, "a1", False),
    # list: an element (JSON equality, not deep)
    ("b", ["a", "b"], True),
    ("c", ["a", "b"], False),
    (1, [1.0, 2], True),
    (1.0, [1], True),
    (1, [True], False),
    (True, [1], False),
    ("1", [1], False),
    (None, [None], True),
    (None, [], False),
    ({"a": 1}, [{"a": 1.0}], True),
    ({"a": 1}, [{"a": True}], False),
    ([1], [[1], 2], True),
    ("a", [["a"]], False),
    # object: a key, never a value
    ("k", {"k": 1}, True),
    ("v", {"k": "v"}, False),
    (1, {"1": 1}, False),
    # anything else: never
    (1, 1, False),
    ("1", 12, False),
    ("x", None, False),
    ("x", True, False),
    ("x", ABSENT, False),
]

INSIDE = [
    # list: an element
    (["a", "b"], "a", True),
    (["a", "b"], "c", False),
    ([1, 2], 1.0, True),
    ([1.5], 1.5, True),
    ([1], True, False),
    ([True], 1, False),
    ([True], True, True),
    (["1"], 1, False),
    ([1], "1", False),
    ([None], None, True),
    ([None], ABSENT, False),
    ([], "a", False),
    ([[1, 2]], [1, 2], True),
    ([[1, 2]], [1.0, 2.0], True),
    ([1, 2], [1, 2], False),
    ([{"a": 1}], {"a": 1.0}, True),
    ([{"a": 1}], {"a": 2}, False),
    # string: a substring
    ("abcdef", "cde", True),
    ("abcdef", "ace", False),
    ("abc", "", True),
    ("a1", 1, False),
    ("abc", ["a"], False),
    ("abc", ABSENT, False),
    # object: a key
    ({"k": 1}, "k", True),
    ({"k": "v"}, "v", False),
    ({"1": 1}, 1, False),
    ({}, "k", False),
]

TEXT = [
    # iequals: Unicode case folding
    ("iequals", "push", "PUSH", True),
    ("iequals", "push", "push ", False),
    ("iequals", "STRASSE", "Straße", True),
    ("iequals", "Straße", "strasse", True),
    ("iequals", "σας", "ΣΑΣ", True),  # final sigma folds like sigma
    ("iequals", "\u03a3\u0391\u03a3", "\u03c3\u03b1\u03c3", True),  # capitals, small
    ("iequals", "i̇", "İ", True),  # İ folds to i + COMBINING DOT ABOVE
    ("iequals", "i", "İ", False),
    ("iequals", "ǆ", "ǅ", True),  # titlecase digraph
    ("iequals", "1", 1, False),
    ("iequals", "true", True, False),
    ("iequals", "null", None, False),
    ("iequals", "", ABSENT, False),
    # icontains / incontains
    ("icontains", "ERROR", "an Error here", True),
    ("icontains", "STRASSE", "die Straße lang", True),
    ("icontains", "ss", "Fuß", True),
    ("icontains", "warn", "an error", False),
    ("icontains", "x", ["x"], False),
    ("icontains", "x", {"x": 1}, False),
    ("icontains", "1", 12, False),
    ("icontains", "x", ABSENT, False),
    # startswith / istartswith
    ("startswith", "feat", "feature", True),
    ("startswith", "Feat", "feature", False),
    ("startswith", "", "x", True),
    ("startswith", "1", 12, False),
    ("startswith", "a", ["a"], False),
    ("startswith", "a", ABSENT, False),
    ("istartswith", "FEAT", "feature", True),
    ("istartswith", "strass", "STRAßE", True),
    ("istartswith", "x", "feature", False),
    ("istartswith", "t", True, False),
    # endswith / iendswith
    ("endswith", ".py", "main.py", True),
    ("endswith", ".PY", "main.py", False),
    ("endswith", "x", None, False),
    ("iendswith", ".PY", "main.py", True),
    ("iendswith", "SS", "Fuß", True),
    ("iendswith", "Σ", "λόγος", True),
    ("iendswith", ".py", "main.pyc", False),
    ("iendswith", "1", 1, False),
    # matchwildcard: the whole text, shell-style
    ("matchwildcard", "*", "", True),
    ("matchwildcard", "*", "line one\nline two", True),
    ("matchwildcard", "feat-*", "feat-login", True),
    ("matchwildcard", "feat-*", "fix-login", False),
    ("matchwildcard", "feat-*", "a feat-login", False),
    ("matchwildcard", "*.txt", "notes.TXT", False),
    ("matchwildcard", "v?.0", "v1.0", True),
    ("matchwildcard", "v?.0", "v10.0", False),
    ("matchwildcard", "v?.0", "v1x0", False),  # . is literal
    ("matchwildcard", "?", "é", True),  # one character, not one byte
    ("matchwildcard", "?", "", False),
    ("matchwildcard", "a+b", "a+b", True),
    ("matchwildcard", "a+b", "aab", False),  # + is literal
    ("matchwildcard", "(x)|y", "(x)|y", True),
    ("matchwildcard", "(x)|y", "y", False),
    ("matchwildcard", "a^b$", "a^b$", True),
    ("matchwildcard", "\\d", "\\d", True),
    ("matchwildcard", "\\d", "1", False),
    ("matchwildcard", "{a,b}", "a", False),
    ("matchwildcard", "[abc]x", "bx", True),
    ("matchwildcard", "[abc]x", "dx", False),
    ("matchwildcard", "[!abc]x", "dx", True),
    ("matchwildcard", "[!abc]x", "ax", False),
    ("matchwildcard", "[!abc]", "\n", True),
    ("matchwildcard", "[a-z]1", "q1", True),
    ("matchwildcard", "[a-z]1", "Q1", False),
    ("matchwildcard", "[^a]", "^", True),  # ^ is not negation in a wildcard set
    ("matchwildcard", "[^a]", "b", False),
    ("matchwildcard", "[]]", "]", True),
    ("matchwildcard", "[!]]", "a", True),
    ("matchwildcard", "[!]]", "]", False),
    ("matchwildcard", "[\\]", "\\", True),
    ("matchwildcard", "[abc", "[abc", True),  # an unclosed [ is literal
    ("matchwildcard", "[abc", "a", False),
    ("matchwildcard", "a[", "a[", True),
    ("matchwildcard", "*", 5, False),
    ("matchwildcard", "*", None, False),
    ("matchwildcard", "*", ABSENT, False),
    # regex: found anywhere, . stops at newlines
    ("regex", "b+", "abbbc", True),
    ("regex", "^b", "abc", False),
    ("regex", "c$", "abc", True),
    ("regex", "c$", "abc\n", False),  # RE2: $ is the end of the text (Python's re also allows a final newline)
    ("regex", "c\n?$", "abc\n", True),
    ("regex", "^b", "a\nb", False),  # no multi-line mode unless the pattern asks
    ("regex", "(?m)^b", "a\nb", True),
    ("regex", "a.c", "a\nc", False),
    ("regex", "A", "a", False),
    ("regex", r"\d{3}", "x123", True),
    ("regex", "^$", "", True),
    ("regex", "é", "café", True),
    ("regex", "x", 5, False),
    ("regex", "1", 1, False),
    ("regex", "x", ["x"], False),
    ("regex", "", ABSENT, False),
    # iregex
    ("iregex", "ERROR", "an error", True),
    ("iregex", "^ERR", "an error", False),
    ("iregex", "é", "CAFÉ", True),
    ("iregex", "a.c", "A\nC", False),
    # matchregex: at the start, . takes newlines too
    ("matchregex", "b", "abc", False),
    ("matchregex", "a", "abc", True),
    ("matchregex", "a.c", "a\nc", True),
    ("matchregex", "a.*z", "a\n\nz", True),
    ("matchregex", "A", "abc", False),
    ("matchregex", "a", ABSENT, False),
]

T0 = "2026-01-01T08:00:00Z"
ORDER = [
    # numbers
    ("lessthan", 5, 4, True),
    ("lessthan", 5, 5, False),
    ("lessthan", 5, 4.5, True),
    ("lessthan", 5.5, 5, True),
    ("lessthan", 5, -1e300, True),
    ("lessthan", 5, "4", False),
    ("lessthan", 1, False, False),  # a boolean is not a number
    ("greaterthan", 0, True, False),
    ("lessthan", 5, None, False),
    ("lessthan", 5, [4], False),
    ("lessthan", 5, ABSENT, False),
    ("lessthan_or_equal", 5, 5.0, True),
    ("lessthan_or_equal", 5, 5.01, False),
    ("greaterthan", 5, 5, False),
    ("greaterthan", 5, 6, True),
    ("greaterthan", 1, "2", False),
    ("greaterthan_or_equal", 5, 5, True),
    ("greaterthan_or_equal", 5, 4.99, False),
    # timestamps: moments, whatever the offset
    ("lessthan", T0, "2026-01-01T10:00:00+02:00", False),
    ("greaterthan", T0, "2026-01-01T10:00:00+02:00", False),
    ("lessthan_or_equal", T0, "2026-01-01T10:00:00+02:00", True),
    ("greaterthan_or_equal", T0, "2026-01-01T10:00:00+02:00", True),
    ("greaterthan_or_equal", "2026-01-01T10:00:00+02:00", T0, True),
    ("lessthan", T0, "2026-01-01T09:00:00+02:00", True),  # 07:00Z
    ("greaterthan", T0, "2026-01-01T03:30:00-05:00", True),  # 08:30Z
    ("lessthan", T0, "2026-01-01T08:00:00.000001+00:00", False),
    ("greaterthan", T0, "2026-01-01T08:00:00.5z", True),
    ("greaterthan", T0, "2026-01-01 08:00:01", True),
    # no offset: UTC
    ("lessthan", T0, "2026-01-01T07:59:59", True),
    ("lessthan_or_equal", T0, "2026-01-01T08:00:00", True),
    ("greaterthan", "2026-01-01T10:00:00+01:00", "2026-01-01T09:30:00", True),
    ("lessthan", "2026-01-02", "2026-01-01T23:59:59Z", True),
    ("greaterthan_or_equal", "2026-01-01T00:00:00+00:00", "2026-01-01", True),
    # a timestamp is compared with timestamps only
    ("lessthan", T0, 5, False),
    ("lessthan", T0, 1e12, False),
    ("lessthan", 5, "2026-01-01", False),
    ("lessthan", T0, "yesterday", False),
    ("greaterthan", T0, "a", False),  # not compared as text ("a" > "2026...")
    ("lessthan", T0, "1", False),
    ("greaterthan", T0, "2026-13-01", False),
    ("lessthan", T0, "2026-01-01T08:00:00 UTC", False),
    ("lessthan", T0, None, False),
    ("lessthan", T0, ABSENT, False),
]


@pytest.mark.parametrize(("value", "actual", "expected"), EQUALS)
def test_equals(value: Any, actual: Any, expected: bool) -> None:
    assert holds(t("f", "equals", value), payload_of(actual)) is expected
    assert holds(t("f", "nequals", value), payload_of(actual)) is (not expected)
    assert holds(t("f", "not_equals", value), payload_of(actual)) is (not expected)


@pytest.mark.parametrize(("value", "actual", "expected"), CONTAINS)
def test_contains(value: Any, actual: Any, expected: bool) -> None:
    assert holds(t("f", "contains", value), payload_of(actual)) is expected
    assert holds(t("f", "ncontains", value), payload_of(actual)) is (not expected)


@pytest.mark.parametrize(("value", "actual", "expected"), INSIDE)
def test_inside(value: Any, actual: Any, expected: bool) -> None:
    assert holds(t("f", "inside", value), payload_of(actual)) is expected
    assert holds(t("f", "ninside", value), payload_of(actual)) is (not expected)


@pytest.mark.parametrize(("op", "value", "actual", "expected"), TEXT)
def test_text_operators(op: str, value: str, actual: Any, expected: bool) -> None:
    assert holds(t("f", op, value), payload_of(actual)) is expected
    if op == "icontains":
        assert holds(t("f", "incontains", value), payload_of(actual)) is (not expected)


@pytest.mark.parametrize(("op", "value", "actual", "expected"), ORDER)
def test_order_operators(op: str, value: Any, actual: Any, expected: bool) -> None:
    assert holds(t("f", op, value), payload_of(actual)) is expected


@pytest.mark.parametrize(
    ("actual", "exists"),
    [("x", True), (None, True), (False, True), (0, True), ("", True), ({}, True), ([], True), (ABSENT, False)],
)
def test_exists_and_nexists(actual: Any, exists: bool) -> None:
    assert holds(t("f", "exists"), payload_of(actual)) is exists
    assert holds(t("f", "nexists"), payload_of(actual)) is (not exists)
    # a value, though unused, is allowed
    assert holds(t("f", "exists", "ignored"), payload_of(actual)) is exists


@pytest.mark.parametrize(
    ("path", "exists"),
    [("a.b", True), ("a.b.c", False), ("a.x", False), ("l.1", True), ("l.2", False), ("l.x", False), ("n.x", False)],
)
def test_exists_follows_dot_paths(path: str, exists: bool) -> None:
    payload = {"a": {"b": None}, "l": [1, {"k": 2}], "n": None}
    assert holds(t(path, "exists"), payload) is exists
    assert holds(t(path, "nexists"), payload) is (not exists)


def test_a_value_inside_a_list_is_reached_by_index() -> None:
    payload = {"commits": [{"author": "ann"}, {"author": "bob"}]}
    assert holds(t("commits.1.author", "equals", "bob"), payload)
    assert not holds(t("commits.0.author", "equals", "bob"), payload)


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def test_timediff_against_now() -> None:
    now = datetime.now(UTC)
    seconds_ago = _iso(now - timedelta(seconds=5))
    hours_ago = _iso(now - timedelta(hours=2))
    hour_ahead = _iso(now + timedelta(hours=1))
    naive_hours_ago = _iso((now - timedelta(hours=2)).replace(tzinfo=None))
    # two hours ago, written in +05:00: read without its offset it would be three hours ahead
    offset_hours_ago = _iso((now - timedelta(hours=2)).astimezone(timezone(timedelta(hours=5))))
    # two hours ahead, written in -05:00: read without its offset it would be three hours ago
    offset_hours_ahead = _iso((now + timedelta(hours=2)).astimezone(timezone(timedelta(hours=-5))))
    cases = [
        (seconds_ago, True, False),
        (hours_ago, False, True),
        (naive_hours_ago, False, True),
        (offset_hours_ago, False, True),
        (offset_hours_ahead, True, False),
        (hour_ahead, True, False),  # the future is negative seconds ago
        ("2000-01-01", False, True),
        ("2999-01-01T00:00:00Z", True, False),
    ]
    for stamp, lt, gt in cases:
        assert holds(t("f", "timediff_lt", 3600), {"f": stamp}) is lt, stamp
        assert holds(t("f", "timediff_gt", 3600), {"f": stamp}) is gt, stamp
    assert holds(t("f", "timediff_lt", 3600.5), {"f": seconds_ago})
    assert holds(t("f", "timediff_gt", -600), {"f": seconds_ago})  # more than -10 minutes ago
    assert not holds(t("f", "timediff_lt", -600), {"f": seconds_ago})
    assert holds(t("f", "timediff_lt", -600), {"f": hour_ahead})  # more than 10 minutes ahead


@pytest.mark.parametrize("actual", ["now", "5", 5, 0, 1e12, None, True, [], {}, "2026-01-01T25:00:00Z", ABSENT])
def test_timediff_needs_a_timestamp(actual: Any) -> None:
    assert not holds(t("f", "timediff_lt", 10**12), payload_of(actual))
    assert not holds(t("f", "timediff_gt", -(10**12)), payload_of(actual))


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2026-01-01", datetime(2026, 1, 1, tzinfo=UTC)),
        ("2026-01-01T10:00", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01T10:00:00Z", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01t10:00:00Z", None),
        ("2026-01-01T10:00:00z", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01 10:00:00", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01T10:00:00+02:00", datetime(2026, 1, 1, 8, tzinfo=UTC)),
        ("2026-01-01T10:00:00+0200", datetime(2026, 1, 1, 8, tzinfo=UTC)),
        ("2026-01-01T10:00:00+02", datetime(2026, 1, 1, 8, tzinfo=UTC)),
        ("2026-01-01T10:00:00-00:30", datetime(2026, 1, 1, 10, 30, tzinfo=UTC)),
        ("2026-01-01T10:00:00.25Z", datetime(2026, 1, 1, 10, 0, 0, 250000, tzinfo=UTC)),
        ("2026-01-01T10:00:00,25Z", datetime(2026, 1, 1, 10, 0, 0, 250000, tzinfo=UTC)),
        ("2026-01-01T10:00:00.123456789Z", datetime(2026, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)),
        ("2026-02-30", None),
        ("2026-01-01T24:00:00", None),
        ("2026-01-01T10:00:00+24:00", None),
        ("20260101T100000Z", None),
        ("2026-01-01T10", None),
        ("2026-01-01T10:00:00 ", None),
        ("٢٠٢٦-01-01", None),  # non-ASCII digits
        ("2026-01-01T10:00:00.5Z" + "0" * 30, None),
        ("1", None),
        ("", None),
    ],
)
def test_timestamp(text: str, moment: datetime | None) -> None:
    assert conditions.timestamp(text) == moment
    if moment is not None:
        parsed = conditions.timestamp(text)
        assert parsed is not None and parsed.tzinfo is not None


def test_a_timestamp_without_offset_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "XYZ+7")  # UTC-7, a POSIX rule: no time zone database needed
    time.tzset()
    try:
        assert conditions.timestamp("2026-01-01T10:00:00") == datetime(2026, 1, 1, 10, tzinfo=UTC)
        assert holds(t("f", "lessthan", "2026-01-01T10:00:01Z"), {"f": "2026-01-01T10:00:00"})
        two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).replace(tzinfo=None).isoformat()
        assert holds(t("f", "timediff_gt", 3600), {"f": two_hours_ago})
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("value", [5, 5.0, None, True, [], {}])
def test_timestamp_of_a_non_string_is_none(value: Any) -> None:
    assert conditions.timestamp(value) is None


# ---- search ---------------------------------------------------------------------------------------

NAME_X = t("item.name", "equals", "x")


@pytest.mark.parametrize(
    ("items", "any_", "all_"),
    [
        ([{"name": "x"}, {"name": "y"}], True, False),
        ([{"name": "x"}, {"name": "x"}], True, True),
        ([{"name": "y"}], False, False),
        ([], False, True),
        ([{"name": "x"}, {}], True, False),
        ([1, {"name": "x"}], True, False),
        ([[{"name": "x"}]], False, False),
        ({"name": "x"}, False, False),  # not a list
        ("x", False, False),
        (None, False, False),
        (ABSENT, False, False),
    ],
)
def test_search_any_and_all(items: Any, any_: bool, all_: bool) -> None:
    payload = {} if items is ABSENT else {"items": items}
    assert holds(t("items", "search", "any", NAME_X), payload) is any_
    assert holds(t("items", "search", "all", NAME_X), payload) is all_


def test_search_item_is_the_element_itself() -> None:
    above_three = t("item", "greaterthan", 3)
    assert holds(t("n", "search", "any", above_three), {"n": [1, 5]})
    assert not holds(t("n", "search", "all", above_three), {"n": [1, 5]})
    assert holds(t("n", "search", "all", above_three), {"n": [4, 5.5]})
    assert not holds(t("n", "search", "any", above_three), {"n": ["9", True]})


def test_search_with_groups_inside_item() -> None:
    open_bug = {"all": [t("item.kind", "equals", "bug"), {"not": t("item.closed", "equals", True)}]}
    search = t("issues", "search", "any", open_bug)
    assert holds(search, {"issues": [{"kind": "bug", "closed": True}, {"kind": "bug"}]})
    assert not holds(search, {"issues": [{"kind": "bug", "closed": True}, {"kind": "task"}]})
    either = {"any": [t("item.kind", "equals", "bug"), t("item.labels", "contains", "urgent")]}
    every = t("issues", "search", "all", either)
    assert holds(every, {"issues": [{"kind": "bug"}, {"labels": ["urgent"]}]})
    assert not holds(every, {"issues": [{"kind": "bug"}, {"labels": ["later"]}]})


def test_search_inside_search() -> None:
    admin = t("item.role", "equals", "admin")
    teams_with_admin = t("teams", "search", "all", t("item.members", "search", "any", admin))
    good = {"teams": [{"members": [{"role": "dev"}, {"role": "admin"}]}, {"members": [{"role": "admin"}]}]}
    bad = {"teams": [{"members": [{"role": "admin"}]}, {"members": [{"role": "dev"}]}]}
    assert holds(teams_with_admin, good)
    assert not holds(teams_with_admin, bad)
    # inside the inner item, item is the inner element (a member), not the team
    team_named = t("teams", "search", "any", t("item.members", "search", "any", t("item.name", "exists")))
    assert not holds(team_named, {"teams": [{"name": "t", "members": [{"role": "dev"}]}]})
    assert holds(team_named, {"teams": [{"members": [{"name": "m"}]}]})


def test_search_item_does_not_see_the_payload() -> None:
    sees_top = t("l", "search", "any", t("item.flag", "exists"))
    assert not holds(sees_top, {"l": [{}], "flag": True, "item": {"flag": True}})


# ---- regular expressions are RE2 ----------------------------------------------------------------


def test_catastrophic_backtracking_pattern_completes() -> None:
    # Python's re takes exponential time here; RE2 is linear in the text.
    assert not holds(t("s", "regex", "(a+)+$"), {"s": "a" * 50_000 + "b"})
    assert holds(t("s", "regex", "(a+)+$"), {"s": "b" + "a" * 50_000})
    assert not holds(t("s", "matchregex", "(a|aa)+$"), {"s": "a" * 50_000 + "!"})


# ---- problems ---------------------------------------------------------------------------------------


def only_problem(nodes: list[Any]) -> tuple[str, str]:
    found = problems(nodes)
    assert len(found) == 1, found
    return found[0]


def test_valid_trees_have_no_problems() -> None:
    tree = [
        t("a", "equals", 1),
        t("a", "not_equals", 1),
        t("b", "exists"),
        t("b", "nexists"),
        {"any": [t("c", "regex", "^x(y|z)$"), {"not": t("d", "inside", [])}]},
        {"all": []},
        t("l", "search", "all", {"all": [t("item", "exists"), t("item.x", "lessthan", "2026-01-01")]}),
    ]
    assert problems(tree) == []
    assert problems([]) == []


def test_unknown_operator() -> None:
    assert only_problem([t("a", "like", "x")]) == ("conditions[0].operator", "is not an operator: 'like'")
    assert only_problem([t("a", "Equals", "x")])[0] == "conditions[0].operator"
    assert only_problem([{"any": [t("a", "equals", 1), t("a", "nequal", 1)]}])[0] == "conditions[0].any[1].operator"


def test_missing_value() -> None:
    assert only_problem([{"field": "a", "operator": "equals"}]) == ("conditions[0].value", "is required")
    assert only_problem([{"field": "a", "operator": "search", "item": NAME_X}]) == (
        "conditions[0].value",
        "is required",
    )
    assert problems([t("a", "exists"), t("a", "nexists")]) == []


def test_missing_field() -> None:
    assert only_problem([{"operator": "exists"}]) == ("conditions[0].field", "is required")
    assert only_problem([{"field": "", "operator": "exists"}]) == ("conditions[0].field", "is required")
    assert only_problem([{"field": 3, "operator": "exists"}]) == ("conditions[0].field", "is required")


TEXT_OPS = sorted(conditions.TEXT_OPERATORS)
ORDER_OPS = sorted(conditions.ORDER_OPERATORS)


@pytest.mark.parametrize(
    ("op", "value", "why"),
    [
        *((op, v, "must be a string") for op in TEXT_OPS for v in (5, None, True, ["x"], {"x": 1})),
        *(
            (op, v, "must be a number or an ISO 8601 timestamp")
            for op in ORDER_OPS
            for v in ("5", "soon", "", True, None, [1], {"a": 1})
        ),
        *((op, v, "must be a number of seconds") for op in ("timediff_lt", "timediff_gt") for v in ("60", True, None)),
        *((op, v, "must be a list, a string or an object") for op in ("inside", "ninside") for v in (5, None, True)),
        ("search", "some", 'must be "any" or "all"'),
        ("search", "ANY", 'must be "any" or "all"'),
        ("search", True, 'must be "any" or "all"'),
    ],
)
def test_a_value_of_the_wrong_type(op: str, value: Any, why: str) -> None:
    node = t("a", op, value, NAME_X if op == "search" else None)
    assert only_problem([node]) == ("conditions[0].value", why)


@pytest.mark.parametrize(
    ("op", "value"),
    [
        ("equals", None),
        ("equals", {"a": [1]}),
        ("contains", 1),
        ("contains", None),
        ("ncontains", [1]),
        ("inside", []),
        ("inside", ""),
        ("inside", {}),
        ("lessthan", 0),
        ("lessthan", -2.5),
        ("greaterthan", "2026-01-01T10:00:00+02:00"),
        ("timediff_lt", 0.5),
        ("timediff_gt", -3),
        ("iequals", ""),
        ("matchwildcard", "[abc"),
    ],
)
def test_a_value_of_the_right_type(op: str, value: Any) -> None:
    assert problems([t("a", op, value)]) == []


def test_search_needs_an_item() -> None:
    assert only_problem([t("a", "search", "any")]) == (
        "conditions[0].item",
        "is required with search: the test each item is put to",
    )
    assert only_problem([t("a", "search", "any", item=["x"])])[0] == "conditions[0].item"  # type: ignore[arg-type]
    assert only_problem([t("a", "equals", 1, NAME_X)]) == ("conditions[0].item", "is only for search")


@pytest.mark.parametrize("op", ["regex", "iregex", "matchregex"])
@pytest.mark.parametrize("pattern", ["(?<=a)b", "(a", "a)", "[z-a]", r"(a)\1", "a**", "x{2,1}"])
def test_a_pattern_re2_refuses(op: str, pattern: str) -> None:
    where, why = only_problem([{"any": [t("a", "exists"), t("s", op, pattern)]}])
    assert where == "conditions[0].any[1].value"
    assert why.startswith("is not a regular expression RE2 accepts: "), why


def test_a_wildcard_pattern_is_checked_too() -> None:
    where, why = only_problem([t("s", "matchwildcard", "[z-a]")])
    assert where == "conditions[0].value"
    assert "z-a" in why


def test_a_pattern_too_big_for_re2_is_refused() -> None:
    where, why = only_problem([t("s", "regex", "((((a{100}){100}){100}){100})")])
    assert where == "conditions[0].value"
    assert why.startswith("is not a regular expression RE2 accepts"), why


@pytest.mark.parametrize(
    ("item", "where"),
    [
        (t("item", "regex", "(a"), "conditions[0].item.value"),
        (t("item", "like", 1), "conditions[0].item.operator"),
        ({"not": t("item", "lessthan", "soon")}, "conditions[0].item.not.value"),
        ({"any": [t("item", "exists"), t("item", "equals")]}, "conditions[0].item.any[1].value"),
        (t("item", "search", "all"), "conditions[0].item.item"),
        (t("item", "search", "all", t("item", "iregex", "[")), "conditions[0].item.item.value"),
        ({"all": [], "not": t("item", "exists")}, "conditions[0].item"),
        ("item", "conditions[0].item"),
    ],
)
def test_a_search_with_a_bad_item(item: Any, where: str) -> None:
    assert only_problem([t("l", "search", "any", item)])[0] == where


def test_paths_inside_a_search_item_start_with_item() -> None:
    assert only_problem([t("l", "search", "any", t("name", "equals", "x"))]) == (
        "conditions[0].item.field",
        "must start with item inside a search's item (item is the list's item)",
    )
    nested = {"all": [t("item.a", "exists"), {"not": t("b", "exists")}]}
    assert only_problem([t("l", "search", "any", nested)])[0] == "conditions[0].item.all[1].not.field"
    assert only_problem([t("l", "search", "any", t("itemx", "exists"))])[0] == "conditions[0].item.field"
    assert only_problem([t("l", "search", "any", t("items.a", "exists"))])[0] == "conditions[0].item.field"
    assert problems([t("l", "search", "any", t("item", "exists"))]) == []
    assert problems([t("l", "search", "any", t("item.0.a", "exists"))]) == []
    # a nested search's own item: the field of the inner search starts with item, and so do its item's
    inner = t("item.m", "search", "any", t("x", "exists"))
    assert only_problem([t("l", "search", "any", inner)])[0] == "conditions[0].item.item.field"
    # outside a search, a field named item is just a field
    assert problems([t("item.a", "exists")]) == []


def nested_not(levels: int) -> Node:
    node: Node = t("a", "exists")
    for _ in range(levels):
        node = {"not": node}
    return node


def test_depth() -> None:
    assert problems([nested_not(limits.MAX_CONDITION_DEPTH - 1)]) == []  # the test is the 16th level
    where, why = only_problem([nested_not(limits.MAX_CONDITION_DEPTH)])
    assert where == "conditions[0]" + ".not" * limits.MAX_CONDITION_DEPTH
    assert why == "is nested too deep: at most 16 levels"
    # a search's item is one level deeper than the search
    search: Node = t("l", "search", "any", t("item", "exists"))
    for _ in range(limits.MAX_CONDITION_DEPTH - 2):
        search = {"all": [search]}
    assert problems([search]) == []
    assert only_problem([{"all": [search]}])[0].endswith(".item")


def test_node_count() -> None:
    sixty_four = [t(f"f{i}", "exists") for i in range(limits.MAX_CONDITIONS)]
    assert problems(sixty_four) == []
    assert problems([*sixty_four, t("x", "exists")]) == [
        ("conditions", "may hold at most 64 conditions (tests and groups), got 65")
    ]
    # groups and search items count
    grouped = [{"all": sixty_four[:-1]}]
    assert count_nodes(grouped) == 64 and problems(grouped) == []
    assert count_nodes([{"all": sixty_four}]) == 65 and len(problems([{"all": sixty_four}])) == 1
    searched = [t("l", "search", "any", {"not": t("item", "exists")})]
    assert count_nodes(searched) == 3
    assert len(problems([*searched, *sixty_four[:62]])) == 1
    assert problems([*searched, *sixty_four[:61]]) == []


@pytest.mark.parametrize(
    "node",
    [
        {"field": "a", "operator": "equals", "value": 1, "all": []},
        {"field": "a", "operator": "exists", "not": {"field": "a", "operator": "exists"}},
        {"all": [], "any": []},
        {"any": [], "not": {"field": "a", "operator": "exists"}},
        {"field": "a", "value": 1},
        {},
    ],
)
def test_a_node_must_be_exactly_a_test_or_a_group(node: Node) -> None:
    assert only_problem([node]) == ("conditions[0]", "must be exactly one of: a test (operator), all, any or not")


def test_malformed_nodes() -> None:
    assert only_problem(["equals"]) == ("conditions[0]", "must be an object")
    assert only_problem([{"all": [1]}]) == ("conditions[0].all[0]", "must be an object")
    assert only_problem([{"not": None}]) == ("conditions[0].not", "must be an object")
    assert only_problem([{"any": {"field": "a"}}]) == ("conditions[0].any", "must be a list")


def test_problems_are_named_at_where() -> None:
    assert problems([t("a", "exists"), t("b", "lessthan", "x")], "rule.conditions") == [
        ("rule.conditions[1].value", "must be a number or an ISO 8601 timestamp")
    ]


def test_every_problem_is_reported() -> None:
    found = problems([t("a", "like", 1), t("b", "regex", "("), {"all": [t("c", "equals")]}])
    assert [where for where, _ in found] == [
        "conditions[0].operator",
        "conditions[1].value",
        "conditions[2].all[0].value",
    ]


# ---- rules, the index and explain -----------------------------------------------------------------


def test_top_level_conditions_combine_by_all_or_any() -> None:
    conds = [t("a", "equals", 1), t("b", "equals", 2)]
    assert matches(conds, "all", {"a": 1, "b": 2})
    assert not matches(conds, "all", {"a": 1, "b": 3})
    assert matches(conds, "any", {"a": 1, "b": 3})
    assert not matches(conds, "any", {"a": 0, "b": 3})
    assert matches([], "all", {}) and matches([], "any", {})  # no conditions: every event
    assert matches([{"all": []}], "all", {})
    assert not matches([{"any": []}], "all", {})  # an empty any holds for nothing


def rule(
    rule_id: int, conds: list[Node], *, condition: str = "all", enabled: bool = True, backstop: bool = False
) -> dict[str, Any]:
    return {
        "id": rule_id,
        "ref": f"r{rule_id}",
        "enabled": enabled,
        "backstop": backstop,
        "conditions": conds,
        "condition": condition,
    }


def ids(rules: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in rules]


def test_rule_set_matching() -> None:
    rules = [
        rule(5, [t("kind", "equals", "push")]),
        rule(2, [t("kind", "equals", "push"), t("branch", "equals", "main")]),
        rule(3, [t("kind", "equals", "tag")]),
        rule(4, [t("n", "equals", 1)]),
        rule(1, [t("kind", "equals", "push")], enabled=False),
        rule(6, [t("kind", "nequals", "push")]),
        rule(7, [t("kind", "equals", "push"), t("x", "exists")], condition="any"),
        rule(8, [], backstop=True),
        rule(9, [{"all": [{"all": [t("flag", "equals", True)]}]}]),
    ]
    rs = RuleSet.build(rules)
    assert set(rs.by_ref) == {f"r{i}" for i in range(1, 10)}
    assert ids(rs.matching(Facts({"kind": "push", "branch": "main"}))) == [2, 5, 7]
    assert ids(rs.matching(Facts({"kind": "push"}))) == [5, 7]
    assert ids(rs.matching(Facts({"kind": "tag", "x": 1}))) == [3, 6, 7]
    assert ids(rs.matching(Facts({"kind": "push", "n": 1.0}))) == [4, 5, 7]
    assert ids(rs.matching(Facts({"kind": "push", "n": True, "flag": 1}))) == [5, 7]  # true is not 1
    assert ids(rs.matching(Facts({"kind": "push", "flag": True}))) == [5, 7, 9]
    assert ids(rs.standard_matches(Facts({"kind": "push"}))) == [5, 7]
    assert ids(rs.matching(Facts({"kind": {"push": 1}}))) == [6]
    # the backstop fires only when no standard rule matches
    rs2 = RuleSet.build([rule(1, [t("kind", "equals", "push")]), rule(2, [], backstop=True)])
    assert ids(rs2.matching(Facts({"kind": "tag"}))) == [2]
    assert ids(rs2.matching(Facts({"kind": "push"}))) == [1]
    assert rs2.standard_matches(Facts({"kind": "tag"})) == []


@pytest.mark.parametrize(
    "payload", [{"a": "X", "b": 1}, {"a": "x"}, {"a": "y", "b": 1}, {"a": "X"}, {"b": 1}, {"a": ["x"]}, {}]
)
def test_only_a_required_equality_picks_rules_by_the_index(payload: dict[str, Any]) -> None:
    rules = [
        rule(1, [t("a", "iequals", "x")]),
        rule(2, [{"any": [t("a", "equals", "x"), t("b", "exists")]}]),
        rule(3, [{"not": t("a", "equals", "x")}]),
        rule(4, [t("a", "equals", "x"), t("b", "exists")], condition="any"),
        rule(5, [t("a", "nequals", "x")]),
        rule(6, [t("a", "not_equals", "x"), t("b", "exists")]),
        rule(7, [t("a", "inside", ["x"])]),
        rule(8, [t("a", "contains", "x")]),
        rule(9, [t("b", "exists"), {"all": [t("a", "equals", "x")]}]),
        rule(10, [t("a", "equals", ["x"])]),
    ]
    assert ids(RuleSet.build(rules).matching(Facts(payload))) == naive(rules, payload)


def test_explain_reports_every_node() -> None:
    conds = [t("a", "equals", 1), {"not": t("b", "exists")}, t("l", "search", "any", t("item", "equals", 2))]
    held, results = explain(conds, "all", Facts({"a": "1", "l": [1, 2, 3]}))
    assert held is False
    assert [(r.node, r.holds, r.kind) for r in results] == [
        ("conditions", False, "all"),
        ("conditions[0]", False, "equals"),
        ("conditions[1]", True, "not"),
        ("conditions[1].not", False, "exists"),
        ("conditions[2]", True, "search"),
    ]
    assert results[0].note == "2 of 3 hold"
    assert results[1].note == "the field is a string, the value a number: never equal"
    assert results[3].note == "the field is missing"
    assert results[4].note == "1 of 3 items pass the item test (any needed)"
    assert explain([], "any", Facts({}))[0] is True


# ---- json_equal ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ([1], [True], False),
        ([0], [False], False),
        ({"a": 1}, {"a": 1.0}, True),
        ([[1]], [[1.0]], True),
        ({"a": [True]}, {"a": [1]}, False),
        ({"a": {"b": [1, {"c": None}]}}, {"a": {"b": [1.0, {"c": None}]}}, True),
        ({"a": {"b": [1, {"c": None}]}}, {"a": {"b": [1.0, {"c": False}]}}, False),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}, True),
        ({"a": 1}, {"a": 1, "b": None}, False),
        ([1, 2], [2, 1], False),
        ([1, 2], [1, 2, 2], False),
        ([], {}, False),
        ({}, {}, True),
        ([], [], True),
        (None, False, False),
        (None, None, True),
        (0, False, False),
        (1, True, False),
        (True, True, True),
        ("1", 1, False),
        ("a", ["a"], False),
        ({"1": 1}, [1], False),
        (1, 1.0, True),
        (-0.0, 0, True),
    ],
)
def test_json_equal(a: Any, b: Any, equal: bool) -> None:
    assert json_equal(a, b) is equal
    assert json_equal(b, a) is equal


# ---- wildcard_regex ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "regex"),
    [
        ("*", ".*"),
        ("?", "."),
        ("[abc]", "[abc]"),
        ("[!abc]", "[^abc]"),
        ("[a-z]", "[a-z]"),
        ("[", r"\["),
        ("a.b", r"a\.b"),
    ],
)
def test_wildcard_regex(pattern: str, regex: str) -> None:
    assert conditions.wildcard_regex(pattern) == regex


# ---- properties --------------------------------------------------------------------------------------

PROPERTY = settings(max_examples=200, deadline=None, database=None)

SCALARS: list[Any] = [None, True, False, 0, 1, 1.0, 2.5, "", "x", "X", "xy", "1"]
STAMPS = ["2000-01-01T00:00:00Z", "2000-01-01T02:00:00+02:00", "2999-01-01", "2000-01-01T00:00:01"]
PATHS = ["a", "b", "c.d", "l"]

scalars = st.sampled_from(SCALARS + STAMPS)
small_values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["x", "y", "1"]), scalars, max_size=2),
)
element = st.one_of(scalars, st.fixed_dictionaries({}, optional={"x": scalars, "y": st.lists(scalars, max_size=2)}))
payloads = st.fixed_dictionaries(
    {},
    optional={
        "a": small_values,
        "b": small_values,
        "c": st.one_of(scalars, st.fixed_dictionaries({}, optional={"d": small_values})),
        "l": st.one_of(st.lists(element, max_size=4), scalars),
    },
)

TEXT_VALUES = ["x", "X", "", "x*", "[!x]*", "?", "^x", "x$", "1", "xY"]
REGEX_VALUES = ["x", "X", "", "^x", "x$", "x.*y", "[xy]", "^$", "1"]
REGEX_OPS = ["regex", "iregex", "matchregex"]


def leaves_on(paths: list[str]) -> st.SearchStrategy[Node]:
    """Valid tests of every operator over ``paths``."""
    field = st.sampled_from(paths)
    return st.one_of(
        st.builds(
            t, field, st.sampled_from(["equals", "nequals", "not_equals", "contains", "ncontains"]), small_values
        ),
        st.builds(t, field, st.sampled_from(["exists", "nexists"])),
        st.builds(
            t,
            field,
            st.sampled_from(["inside", "ninside"]),
            st.one_of(st.lists(scalars, max_size=3), st.sampled_from(["xy", "1x", ""]), st.just({"x": 1})),
        ),
        st.builds(
            t,
            field,
            st.sampled_from([op for op in [*TEXT_OPS, "incontains"] if op not in REGEX_OPS]),
            st.sampled_from(TEXT_VALUES),
        ),
        st.builds(t, field, st.sampled_from(REGEX_OPS), st.sampled_from(REGEX_VALUES)),
        st.builds(t, field, st.sampled_from(ORDER_OPS), st.sampled_from([0, 1, 1.5, *STAMPS])),
        st.builds(t, field, st.sampled_from(["timediff_lt", "timediff_gt"]), st.sampled_from([3600, 0])),
    )


def trees(tests: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    return st.recursive(
        tests,
        lambda children: st.one_of(
            st.builds(lambda nodes: {"all": nodes}, st.lists(children, max_size=3)),
            st.builds(lambda nodes: {"any": nodes}, st.lists(children, max_size=3)),
            st.builds(lambda node: {"not": node}, children),
        ),
        max_leaves=5,
    )


item_trees = trees(leaves_on(["item", "item.x", "item.y"]))
searches = st.builds(t, st.sampled_from(["l", "a"]), st.just("search"), st.sampled_from(["any", "all"]), item_trees)
nodes = trees(st.one_of(leaves_on(PATHS), searches))
conditions_lists = st.lists(nodes, max_size=3)
how = st.sampled_from(["all", "any"])


def evaluate(conds: list[Node], condition: str, payload: dict[str, Any]) -> bool:
    return compile_rule(conds, condition)(Facts(payload))


def depth(node: Node) -> int:
    """Levels of a node, its search item included."""
    children = [*node.get("all", []), *node.get("any", [])]
    children += [node[k] for k in ("not", "item") if k in node]
    return 1 + max(map(depth, children), default=0)


def shown(node: Node) -> int:
    """The nodes explain reports: a search's item is summed up in the search's own result."""
    children = [*node.get("all", []), *node.get("any", [])]
    children += [node["not"]] if "not" in node else []
    return 1 + sum(map(shown, children))


@PROPERTY
@given(nodes)
def test_generated_trees_are_valid(node: Node) -> None:
    found = problems([node])
    if count_nodes([node]) <= limits.MAX_CONDITIONS and depth(node) <= limits.MAX_CONDITION_DEPTH:
        assert found == []
    else:
        assert len(found) == 1 and "at most" in found[0][1]


@PROPERTY
@given(nodes, nodes, payloads)
def test_de_morgan(a: Node, b: Node, payload: dict[str, Any]) -> None:
    assert evaluate([{"not": {"any": [a, b]}}], "all", payload) == evaluate(
        [{"all": [{"not": a}, {"not": b}]}], "all", payload
    )
    assert evaluate([{"not": {"all": [a, b]}}], "all", payload) == evaluate(
        [{"any": [{"not": a}, {"not": b}]}], "all", payload
    )
    assert evaluate([{"not": {"not": a}}], "all", payload) == evaluate([a], "all", payload)
    assert evaluate([a, b], "any", payload) == (evaluate([a], "all", payload) or evaluate([b], "all", payload))


legacy_tests = st.builds(t, st.sampled_from(PATHS), st.sampled_from(["equals", "not_equals", "contains"]), small_values)


@PROPERTY
@given(st.lists(legacy_tests, min_size=1, max_size=4), how, payloads)
def test_a_flat_legacy_rule_is_its_tree(flat: list[Node], condition: str, payload: dict[str, Any]) -> None:
    expected = evaluate(flat, condition, payload)
    assert evaluate([{condition: flat}], "all", payload) is expected
    assert evaluate([{condition: flat}], "any", payload) is expected
    assert evaluate([conditions.normal(n) for n in flat], condition, payload) is expected


@PROPERTY
@given(conditions_lists, how, payloads)
def test_explain_agrees_with_compile_rule(conds: list[Node], condition: str, payload: dict[str, Any]) -> None:
    held, results = explain(conds, condition, Facts(payload))
    assert held is evaluate(conds, condition, payload)
    assert results[0].holds is held
    assert len(results) == 1 + sum(map(shown, conds))
    by_node = {r.node: r.holds for r in results}
    for i, node in enumerate(conds):
        assert by_node[f"conditions[{i}]"] is evaluate([node], "all", payload)


@PROPERTY
@given(st.sampled_from(PATHS), small_values, payloads)
def test_n_operators_negate(field: str, value: Any, payload: dict[str, Any]) -> None:
    for positive, negative in [*NEGATION.items(), ("equals", "not_equals"), ("exists", "nexists")]:
        if positive in ("icontains",) and not isinstance(value, str):
            continue
        if positive == "inside" and not isinstance(value, (list, str, dict)):
            continue
        pos = evaluate([t(field, positive, value)], "all", payload)
        assert evaluate([t(field, negative, value)], "all", payload) is (not pos)
        assert evaluate([{"not": t(field, positive, value)}], "all", payload) is (not pos)


# Tests the index may or may not use: equality on a scalar (indexed), and near misses that must
# not be indexed (other operators, equality under any or not).
near_equals = st.one_of(
    st.builds(t, st.sampled_from(["a", "b"]), st.just("equals"), scalars),
    st.builds(t, st.sampled_from(["a", "b"]), st.sampled_from(["nequals", "not_equals"]), scalars),
    st.builds(t, st.sampled_from(["a", "b"]), st.just("iequals"), st.sampled_from(["x", "X", "xY"])),
    st.builds(t, st.sampled_from(["a", "b"]), st.just("inside"), st.lists(scalars, max_size=2)),
)
guards = st.one_of(
    near_equals,
    st.builds(lambda n: {"all": [n]}, near_equals),
    st.builds(lambda n, m: {"any": [n, m]}, near_equals, near_equals),
    st.builds(lambda n: {"not": n}, near_equals),
)


@st.composite
def rule_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(min_value=0, max_value=8))
    rule_ids = draw(st.lists(st.integers(min_value=1, max_value=1000), min_size=count, max_size=count, unique=True))
    out = []
    for rule_id in rule_ids:
        indexed = draw(st.lists(guards, max_size=2))
        others = draw(st.lists(nodes, max_size=2))
        conds = draw(st.permutations(indexed + others))
        if draw(st.booleans()) and conds:
            conds = [{"all": conds}]  # indexed through a nested all
        out.append(rule(rule_id, conds, condition=draw(how), enabled=draw(st.booleans()), backstop=draw(st.booleans())))
    return out


def naive(rules: list[dict[str, Any]], payload: dict[str, Any]) -> list[int]:
    enabled = sorted((r for r in rules if r["enabled"]), key=lambda r: r["id"])
    hits = [r for r in enabled if evaluate(r["conditions"], r["condition"], payload)]
    standard = [r["id"] for r in hits if not r["backstop"]]
    return standard or [r["id"] for r in hits if r["backstop"]]


@settings(PROPERTY, max_examples=300)
@given(rule_sets(), payloads)
def test_rule_set_agrees_with_naive_evaluation(rules: list[dict[str, Any]], payload: dict[str, Any]) -> None:
    rs = RuleSet.build(rules)
    facts = Facts(payload)
    assert ids(rs.matching(facts)) == naive(rules, payload)
    standard = sorted(
        r["id"]
        for r in rules
        if r["enabled"] and not r["backstop"] and evaluate(r["conditions"], r["condition"], payload)
    )
    assert ids(rs.standard_matches(facts)) == standard
