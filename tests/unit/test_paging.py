"""The keyset page token and page-size rules (no database)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.api.store._paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Where,
    decode_token,
    encode_token,
    keyset_query,
    page_of,
    page_size,
)
from shared.errors import InvalidArgument


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
    token = encode_token(created, 9_000_000_000_123)
    assert decode_token(token) == (created, 9_000_000_000_123)


def test_token_round_trip_of_other_time_zone_is_the_same_instant() -> None:
    created = datetime(2024, 5, 1, 14, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    decoded, id_ = decode_token(encode_token(created, 5))
    assert decoded == created and decoded.tzinfo == UTC and id_ == 5


def test_token_is_url_safe_without_padding() -> None:
    token = encode_token(datetime(2024, 1, 1, tzinfo=UTC), 1)
    assert "=" not in token and "+" not in token and "/" not in token


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "not a token!",
        "@@@@",
        _b64("12345"),
        _b64("1:2:3"),
        _b64("abc:1"),
        _b64("1:abc"),
        _b64("1:"),
        _b64("1:0"),
        _b64("1:-5"),
        _b64(f"1:{2**63}"),
        _b64(f"{10**20}:1"),
        _b64(f"{-(10**20)}:1"),
        base64.urlsafe_b64encode(b"\xff\xfe:1").decode(),
    ],
)
def test_bad_token_is_invalid_argument_naming_page_token(token: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_token(token)
    assert info.value.violations == [("page_token", "is not a token returned by this list")]


@pytest.mark.parametrize(("requested", "expected"), [(0, DEFAULT_PAGE_SIZE), (1, 1), (7, 7), (10**6, MAX_PAGE_SIZE)])
def test_page_size_default_and_cap(requested: int, expected: int) -> None:
    assert page_size(requested) == expected


def test_negative_page_size_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as info:
        page_size(-1)
    assert info.value.violations[0][0] == "page_size"
    assert "-1" in info.value.violations[0][1]


def test_keyset_query_numbers_placeholders_and_adds_the_cursor() -> None:
    where = Where()
    where.add("trigger_ref = {}", "core.webhook")
    token = encode_token(datetime(2024, 1, 1, tzinfo=UTC), 10)
    sql, args = keyset_query("SELECT id FROM event", where, token, 5)
    assert sql == (
        "SELECT id FROM event WHERE trigger_ref = $1 AND (created, id) < ($2, $3) "
        "ORDER BY created DESC, id DESC LIMIT $4"
    )
    assert list(args) == ["core.webhook", datetime(2024, 1, 1, tzinfo=UTC), 10, 6]


def test_keyset_query_without_filters_or_token() -> None:
    sql, args = keyset_query("SELECT id FROM h", Where(), "", 3, time_column="time")
    assert sql == "SELECT id FROM h  ORDER BY time DESC, id DESC LIMIT $1"
    assert list(args) == [4]


class _Row:
    def __init__(self, id_: int, created: datetime) -> None:
        self.id = id_
        self.created = created


def test_page_of_cuts_the_extra_row_and_points_at_the_last_kept() -> None:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [_Row(i, base - timedelta(seconds=i)) for i in range(4)]
    page = page_of(rows, 3)
    assert [r.id for r in page.items] == [0, 1, 2]
    assert decode_token(page.next_token) == (base - timedelta(seconds=2), 2)


def test_page_of_last_page_has_empty_token() -> None:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [_Row(i, base) for i in range(3)]
    page = page_of(rows, 3)
    assert len(page.items) == 3 and page.next_token == ""
