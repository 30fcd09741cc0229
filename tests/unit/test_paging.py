"""Keyset queries, page tokens (signed, bound to their list and filters) and page sizes (no database)."""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from services.api.store._paging import (
    DEFAULT_PAGE_SIZE,
    LOCAL,
    MAX_PAGE_SIZE,
    Cursor,
    Scope,
    Signer,
    Where,
    encode_token,
    keyset_query,
    page_of,
    page_size,
)
from services.api.store.types import Page
from shared.errors import InvalidArgument
from shared.limits import MAX_PAGE_TOKEN

KEY = bytes(range(32))
SIGNER = Signer(KEY)


def where(*filters: tuple[str, Any]) -> Where:
    w = Where()
    for fragment, value in filters:
        w.add(fragment, value)
    return w


EVENTS = Scope.of("SELECT id FROM event", Where())
WEBHOOK = Scope.of("SELECT id FROM event", where(("trigger_ref = {}", "core.webhook")))


def violation(exc: pytest.ExceptionInfo[InvalidArgument]) -> str:
    (field, why), *rest = exc.value.violations
    assert field == "page_token" and not rest
    return why


def rejected(token: str, scope: Scope = EVENTS, signer: Signer = SIGNER) -> str:
    """The page_token violation of decoding ``token``, which must be refused."""
    with pytest.raises(InvalidArgument) as info:
        signer.decode(scope, token)
    why = violation(info)
    assert "start again without a page_token" in why
    assert token[:20] not in why  # never echoed
    return why


# ---- tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "created",
    [
        datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2100, 1, 1, tzinfo=UTC),
    ],
)
def test_token_round_trip_keeps_microseconds_and_id(created: datetime) -> None:
    token = SIGNER.encode(WEBHOOK, (created, 9_000_000_000_123))
    assert SIGNER.decode(WEBHOOK, token) == (created, 9_000_000_000_123)


def test_token_round_trip_of_other_time_zone_is_the_same_instant() -> None:
    created = datetime(2024, 5, 1, 14, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    decoded, id_ = SIGNER.decode(EVENTS, SIGNER.encode(EVENTS, (created, 5)))
    assert decoded == created and decoded.tzinfo == UTC and id_ == 5


def test_token_is_url_safe_without_padding_and_short() -> None:
    token = SIGNER.encode(EVENTS, (datetime(2024, 1, 1, tzinfo=UTC), 2**63 - 1))
    assert "=" not in token and "+" not in token and "/" not in token
    assert len(token) == 55  # 41 bytes


def test_token_layout_is_version_cursor_digest_and_tag() -> None:
    created = datetime(2024, 1, 1, tzinfo=UTC)
    token = SIGNER.encode(WEBHOOK, (created, 7))
    raw = base64.urlsafe_b64decode(token + "=")
    version, micros, id_, digest = struct.unpack(">BqQ8s", raw[:25])
    assert (version, micros, id_, digest) == (1, 1704067200_000000, 7, WEBHOOK.digest)
    assert len(raw) == 41


def test_token_of_another_list_is_refused() -> None:
    token = SIGNER.encode(EVENTS, (datetime(2024, 1, 1, tzinfo=UTC), 1))
    why = rejected(token, Scope.of("SELECT id FROM enforcement", Where()))
    assert "was not issued by this list with these filters" in why


@pytest.mark.parametrize(
    "other",
    [
        Scope.of("SELECT id FROM event", where(("trigger_ref = {}", "core.timer"))),  # another value
        Scope.of("SELECT id FROM event", where(("source_ref = {}", "core.webhook"))),  # another filter
        Scope.of("SELECT id FROM event", Where()),  # filter dropped
        Scope.of("SELECT id FROM event", where(("trigger_ref = {}", "core.webhook"), ("rule_ref = {}", "r"))),
        Scope.of("SELECT id FROM event", where(("trigger_ref = {}", "core.webhook")), time_column="time"),
    ],
)
def test_token_with_other_filters_is_refused(other: Scope) -> None:
    token = SIGNER.encode(WEBHOOK, (datetime(2024, 1, 1, tzinfo=UTC), 1))
    assert "was not issued by this list with these filters" in rejected(token, other)


def test_token_of_another_key_is_refused() -> None:
    token = Signer(bytes(32)).encode(EVENTS, (datetime(2024, 1, 1, tzinfo=UTC), 1))
    assert "is not a page token issued by this api" in rejected(token)


def test_scope_digest_rewritten_to_match_other_filters_is_refused() -> None:
    """The digest only picks the message: a token re-pointed at other filters fails its tag."""
    raw = bytearray(base64.urlsafe_b64decode(SIGNER.encode(WEBHOOK, (datetime(2024, 1, 1, tzinfo=UTC), 1)) + "="))
    raw[17:25] = EVENTS.digest
    assert "is not a page token issued by this api" in rejected(base64.urlsafe_b64encode(raw).decode().rstrip("="))


def test_every_single_character_change_is_refused() -> None:
    token = SIGNER.encode(WEBHOOK, (datetime(2024, 1, 1, tzinfo=UTC), 42))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, ch in enumerate(token):
        # The neighbour differs in the lowest bit, the one base64 ignores in a final character.
        changed = alphabet[alphabet.index(ch) ^ 1]
        rejected(token[:i] + changed + token[i + 1 :], WEBHOOK)
        # '+' and '/' decode like '-' and '_' in lenient base64: refused all the same.
        if ch in "-_":
            rejected(token[:i] + {"-": "+", "_": "/"}[ch] + token[i + 1 :], WEBHOOK)


def test_truncated_or_extended_token_is_refused() -> None:
    token = SIGNER.encode(EVENTS, (datetime(2024, 1, 1, tzinfo=UTC), 1))
    for bad in (token[:-1], token[:-4], token + "A", token + "AAAA", token + "=", token + "=="):
        rejected(bad)


def test_over_long_token_is_refused_without_decoding_it() -> None:
    why = rejected("A" * (MAX_PAGE_TOKEN + 1))
    assert str(MAX_PAGE_TOKEN) in why


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "not a token!",
        "@@@@",
        "A",
        _b64(b"12345"),
        _b64(b"1:2"),  # the old format
        _b64(bytes(41)),
        _b64(b"\x02" + bytes(40)),  # unknown version
        "é" * 10,
    ],
)
def test_malformed_token_is_refused(token: str) -> None:
    assert "is not a page token issued by this api" in rejected(token)


def test_signer_refuses_a_short_key() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Signer(b"short")


def test_cursor_id_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SIGNER.encode(EVENTS, (datetime(2024, 1, 1, tzinfo=UTC), 0))


# ---- local tokens (tools that capture a list's SQL) -------------------------------------------


def test_local_token_is_accepted_by_the_local_signer_in_any_scope() -> None:
    created = datetime(2024, 1, 1, tzinfo=UTC)
    token = encode_token(created, 10)
    assert LOCAL.decode(EVENTS, token) == (created, 10)
    assert LOCAL.decode(WEBHOOK, token) == (created, 10)


def test_local_token_is_refused_by_a_signer_of_the_shared_key() -> None:
    assert "is not a page token issued by this api" in rejected(encode_token(datetime(2024, 1, 1, tzinfo=UTC), 10))


def test_local_signer_binds_its_own_tokens_to_their_scope() -> None:
    token = LOCAL.encode(WEBHOOK, (datetime(2024, 1, 1, tzinfo=UTC), 3))
    rejected(token, EVENTS, LOCAL)
    rejected(token, WEBHOOK, SIGNER)


# ---- scope ---------------------------------------------------------------------------------------


def test_scope_is_the_same_for_the_same_list_and_filters() -> None:
    at = datetime(2024, 1, 1, tzinfo=UTC)
    a = Scope.of("SELECT id FROM event", where(("created >= {}", at), ("trigger_ref = {}", "x")))
    b = Scope.of(
        "SELECT id FROM event",
        where(("created >= {}", at.astimezone(timezone(timedelta(hours=-5)))), ("trigger_ref = {}", "x")),
    )
    assert a == b


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, True),  # bool is not int
        (1, "1"),
        ("a", "a "),
        (None, ""),
        (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 1)),  # naive on purpose
        (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC)),
        (["a", "b"], ["a,b"]),
        ('a", "b', "a"),
    ],
)
def test_scope_tells_different_values_apart(a: Any, b: Any) -> None:
    assert Scope.of("SELECT id FROM t", where(("x = {}", a))) != Scope.of("SELECT id FROM t", where(("x = {}", b)))


def test_scope_refuses_a_value_it_cannot_make_canonical() -> None:
    with pytest.raises(TypeError, match="object"):
        Scope.of("SELECT id FROM t", where(("x = {}", object())))


# ---- queries --------------------------------------------------------------------------------------


def test_keyset_query_numbers_placeholders_and_adds_the_cursor() -> None:
    w = where(("trigger_ref = {}", "core.webhook"))
    sql, args = keyset_query("SELECT id FROM event", w, (datetime(2024, 1, 1, tzinfo=UTC), 10), 5)
    assert sql == (
        "SELECT id FROM event WHERE trigger_ref = $1 AND created <= $2 AND (created, id) < ($3, $4) "
        "ORDER BY created DESC, id DESC LIMIT $5"
    )
    # The plain bound repeats the cursor's time: only it lets TimescaleDB exclude chunks.
    at = datetime(2024, 1, 1, tzinfo=UTC)
    assert list(args) == ["core.webhook", at, at, 10, 6]


def test_keyset_query_without_filters_or_cursor() -> None:
    sql, args = keyset_query("SELECT id FROM h", Where(), None, 3, time_column="time")
    assert sql == "SELECT id FROM h  ORDER BY time DESC, id DESC LIMIT $1"
    assert list(args) == [4]


@pytest.mark.parametrize(("requested", "expected"), [(0, DEFAULT_PAGE_SIZE), (1, 1), (7, 7), (10**6, MAX_PAGE_SIZE)])
def test_page_size_default_and_cap(requested: int, expected: int) -> None:
    assert page_size(requested) == expected


def test_negative_page_size_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as info:
        page_size(-1)
    assert info.value.violations[0][0] == "page_size"
    assert "-1" in info.value.violations[0][1]


# ---- pages ---------------------------------------------------------------------------------------


@dataclass
class _Row:
    id: int
    created: datetime


BASE = datetime(2024, 1, 1, tzinfo=UTC)


def _after(row: _Row) -> str:
    return SIGNER.encode(EVENTS, (row.created, row.id))


def _rows(n: int) -> list[_Row]:
    return [_Row(100 - i, BASE - timedelta(seconds=i)) for i in range(n)]


def _cursor(token: str) -> Cursor:
    return SIGNER.decode(EVENTS, token)


def test_page_of_cuts_the_extra_row_and_points_at_the_last_kept() -> None:
    page = page_of(_rows(4), 3, _after)
    assert [r.id for r in page.items] == [100, 99, 98]
    assert _cursor(page.next_token) == (BASE - timedelta(seconds=2), 98)


def test_page_of_last_page_has_empty_token() -> None:
    page = page_of(_rows(3), 3, _after)
    assert len(page.items) == 3 and page.next_token == ""


@pytest.mark.parametrize("fetched", [6, 5])  # a page with a next page, and the last page
def test_cut_keeps_the_first_items_and_points_right_after_them(fetched: int) -> None:
    page = page_of(_rows(fetched), 5, _after)
    cut = page.cut(2)
    assert [r.id for r in cut.items] == [100, 99]
    assert _cursor(cut.next_token) == (BASE - timedelta(seconds=1), 99)
    # A cut page cuts again, with tokens of the same scope and key.
    again = cut.cut(1)
    assert [r.id for r in again.items] == [100]
    assert _cursor(again.next_token) == (BASE, 100)
    rejected(again.next_token, WEBHOOK)


@pytest.mark.parametrize("n", [0, -1, 5, 6])
def test_cut_to_nothing_or_to_the_whole_page_is_refused(n: int) -> None:
    page = page_of(_rows(6), 5, _after)
    with pytest.raises(ValueError, match=r"cuts to 1 \.\. 4 items"):
        page.cut(n)


def test_page_built_by_hand_cannot_be_cut() -> None:
    with pytest.raises(ValueError, match="not built by a list"):
        Page(_rows(3), "").cut(1)


def test_page_equality_ignores_its_token_maker() -> None:
    assert page_of(_rows(3), 5, _after) == Page(_rows(3), "")
