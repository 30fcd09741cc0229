"""Keyset pagination on (created, id), newest first, with filters composed from fixed SQL.

The WHERE clause is assembled only from constant fragments chosen by which filters are set;
every value is a bound parameter. The page token is opaque to callers: base64 of the last
row's (created in microseconds, id).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from shared.errors import InvalidArgument

from .types import Page

T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """The page size to use: default when 0, INVALID_ARGUMENT when negative, capped at max."""
    if requested < 0:
        raise InvalidArgument.one("page_size", f"must not be negative (got {requested})")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(created: datetime, id_: int) -> str:
    micros = (created - _EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}:{id_}".encode()).decode().rstrip("=")


def decode_token(token: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        micros, id_text = raw.split(":")
        id_ = int(id_text)
        if not 0 < id_ < 2**63:
            raise ValueError("id out of range")
        return _EPOCH + timedelta(microseconds=int(micros)), id_
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument.one("page_token", "is not a token returned by this list") from None


class Where:
    """Collects WHERE fragments and their parameters, numbering placeholders as it goes."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.args: list[Any] = []

    def param(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def add(self, fragment: str, *values: Any) -> None:
        """Adds ``fragment`` with ``{}`` replaced by placeholders for ``values``."""
        self.parts.append(fragment.format(*(self.param(v) for v in values)))

    def sql(self) -> str:
        return ("WHERE " + " AND ".join(self.parts)) if self.parts else ""


def keyset_query(
    select: str, where: Where, token: str, size: int, time_column: str = "created"
) -> tuple[str, Sequence[Any]]:
    """Completes a list query: the cursor condition, newest-first order and LIMIT size+1."""
    if token:
        created, id_ = decode_token(token)
        where.add(f"({time_column}, id) < ({{}}, {{}})", created, id_)
    limit = where.param(size + 1)
    return f"{select} {where.sql()} ORDER BY {time_column} DESC, id DESC LIMIT {limit}", where.args


def page_of(items: list[T], size: int, time_attr: str = "created") -> Page[T]:
    """Cuts the size+1 fetched rows to a page and derives the next token from its last row."""
    if len(items) <= size:
        return Page(items, "")
    items = items[:size]
    last = items[-1]
    return Page(items, encode_token(getattr(last, time_attr), getattr(last, "id")))  # noqa: B009
