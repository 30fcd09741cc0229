"""Keyset pagination on (created, id), newest first, with filters composed from fixed SQL, and
the signed page tokens that carry a list from one page to the next.

The WHERE clause is assembled only from constant fragments chosen by which filters are set;
every value is a bound parameter.

A page token is opaque to callers and valid only where it came from: the same list with the
same filters. That *scope* is derived here, in ``Paged._page``, from the list's SELECT (which
names the table) and every filter fragment with its bound value, taken before the cursor
condition joins them: no repository states what to bind, so none can forget a filter. The
token is urlsafe base64, without padding, of 41 bytes::

    version (1) | created, microseconds since the epoch (int64) | id (uint64)
    | scope digest: SHA-256(scope)[:8] | tag: HMAC-SHA256(key, the first 25 bytes + scope)[:16]

keyed by the secret that every api replica shares and that survives restarts (``_secret.py``).
The tag decides; the digest only tells a token of another list or other filters from a forged
or altered one, so that the error can say which.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

import asyncpg

from shared import limits
from shared.errors import InvalidArgument
from shared.limits import MAX_PAGE_TOKEN

from ._db import CUSTOM_PLAN, ReadRoute, Repo, guarded, json_loads_all, until_deadline
from .types import Page, columns

T = TypeVar("T")

Cursor = tuple[datetime, int]
"""The (created, id) of the last row of a page: the next page starts below it."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_PAGE_SIZE = limits.DEFAULT_PAGE_SIZE
MAX_PAGE_SIZE = limits.MAX_PAGE_SIZE

_VERSION = 1
# Tokens of encode_token: bound to no scope, so accepted only by a signer of this process's
# own key (see LOCAL), never by one of the shared key the api serves with.
_LOCAL_VERSION = 0
_HEAD = struct.Struct(">BqQ8s")
_TAG_BYTES = 16
_TOKEN_BYTES = _HEAD.size + _TAG_BYTES
_MIN_KEY_BYTES = 32
_URLSAFE = re.compile(r"[A-Za-z0-9_-]*")

_RESTART = "start again without a page_token"
_FOREIGN = f"was not issued by this list with these filters; {_RESTART}, or send the filters it was issued with"
_NOT_OURS = f"is not a page token issued by this api (it is malformed or was altered); {_RESTART}"
_TOO_LONG = f"is longer than the {MAX_PAGE_TOKEN} characters of any page token; {_RESTART}"


def page_size(requested: int) -> int:
    """The page size to use: default when 0, INVALID_ARGUMENT when negative, capped at max."""
    if requested < 0:
        raise InvalidArgument.one("page_size", f"must not be negative (got {requested})")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


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


# ---- scope ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """What a token is bound to: a list query and its filters, as canonical bytes."""

    text: bytes
    digest: bytes

    @classmethod
    def of(cls, select: str, where: Where, time_column: str = "created") -> Scope:
        # JSON because its escaping is unambiguous: no two different filter sets (whatever
        # text a caller puts in a value) serialise to the same bytes.
        text = json.dumps(
            [select, time_column, where.parts, [_canonical(v) for v in where.args]],
            ensure_ascii=True,
            separators=(",", ":"),
        ).encode()
        return cls(text, hashlib.sha256(text).digest()[:8])


def _canonical(value: Any) -> Any:
    """A filter value as JSON that is the same for equal values on every replica."""
    if value is None:
        return None
    if isinstance(value, bool):  # before int: bool is one
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, datetime):
        # The same instant in any time zone is the same filter.
        if value.tzinfo is not None:
            return ["at", (value - _EPOCH) // timedelta(microseconds=1)]
        return ["naive", value.isoformat()]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if isinstance(value, list | tuple):
        return ["list", [_canonical(v) for v in value]]
    # Failing loudly beats a scope that differs between replicas (a repr with an address).
    raise TypeError(f"a page token cannot be bound to a filter value of type {type(value).__name__}")


# ---- tokens -----------------------------------------------------------------------------------


def _invalid(why: str) -> InvalidArgument:
    return InvalidArgument.one("page_token", why)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _micros(created: datetime) -> int:
    return (created - _EPOCH) // timedelta(microseconds=1)


def _tag(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()[:_TAG_BYTES]


def _seal(key: bytes, version: int, created: datetime, id_: int, scope: Scope | None) -> str:
    if not 0 < id_ < 2**63:
        raise ValueError(f"a cursor's id is positive and below 2**63 (got {id_})")
    head = _HEAD.pack(version, _micros(created), id_, scope.digest if scope else bytes(8))
    return _b64(head + _tag(key, head + (scope.text if scope else b"")))


def _open(token: str) -> tuple[bytes, int, int, int, bytes, bytes]:
    """Splits a token into (head, version, micros, id, digest, tag); checks only its form."""
    if len(token) > MAX_PAGE_TOKEN:
        raise _invalid(_TOO_LONG)
    if not _URLSAFE.fullmatch(token):
        raise _invalid(_NOT_OURS)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise _invalid(_NOT_OURS) from None
    # Re-encoding catches a changed final character whose low bits base64 ignores: the token
    # must be the one string that encodes these bytes.
    if len(raw) != _TOKEN_BYTES or _b64(raw) != token:
        raise _invalid(_NOT_OURS)
    head, tag = raw[: _HEAD.size], raw[_HEAD.size :]
    version, micros, id_, digest = _HEAD.unpack(head)
    return head, version, micros, id_, digest, tag


class Signer:
    """Issues and checks page tokens with one key."""

    def __init__(self, key: bytes, *, local: bool = False) -> None:
        if len(key) < _MIN_KEY_BYTES:
            raise ValueError(f"a page-token key has at least {_MIN_KEY_BYTES} bytes (got {len(key)})")
        self._key = key
        self._local = local

    def encode(self, scope: Scope, cursor: Cursor) -> str:
        """The token of the page that starts below ``cursor`` in ``scope``."""
        return _seal(self._key, _VERSION, cursor[0], cursor[1], scope)

    def decode(self, scope: Scope, token: str) -> Cursor:
        """The cursor of ``token``; INVALID_ARGUMENT on page_token unless this signer issued it
        for ``scope``. The message never quotes the token."""
        head, version, micros, id_, digest, tag = _open(token)
        if version == _VERSION:
            if not hmac.compare_digest(digest, scope.digest):
                raise _invalid(_FOREIGN)
            bound = scope.text
        elif version == _LOCAL_VERSION and self._local:
            bound = b""
        else:
            raise _invalid(_NOT_OURS)
        if not hmac.compare_digest(tag, _tag(self._key, head + bound)):
            raise _invalid(_NOT_OURS)
        try:
            created = _EPOCH + timedelta(microseconds=micros)
        except OverflowError:
            raise _invalid(_NOT_OURS) from None
        if not 0 < id_ < 2**63:
            raise _invalid(_NOT_OURS)
        return created, id_


_LOCAL_KEY = secrets.token_bytes(32)
LOCAL = Signer(_LOCAL_KEY, local=True)
"""The signer of repositories built without a Store (tools that capture a list's SQL): its key
exists only in this process, so none of its tokens is valid anywhere else."""


def encode_token(created: datetime, id_: int) -> str:
    """A token of the page below (created, id_) in any list, for code in this process that
    composes list queries itself (``tools.bench.capture``, the EXPLAIN test). Only LOCAL
    accepts it; the api's lists refuse it."""
    return _seal(_LOCAL_KEY, _LOCAL_VERSION, created, id_, None)


class Keys(Protocol):
    """Where a repository gets the signer of its page tokens."""

    async def signer(self) -> Signer: ...


class _LocalKeys:
    async def signer(self) -> Signer:
        return LOCAL


# ---- queries and pages ------------------------------------------------------------------------


def keyset_query(
    select: str, where: Where, cursor: Cursor | None, size: int, time_column: str = "created"
) -> tuple[str, Sequence[Any]]:
    """Completes a list query: the cursor condition, newest-first order and LIMIT size+1."""
    if cursor is not None:
        # The plain bound on the time column is implied by the row comparison, but only it lets
        # TimescaleDB exclude chunks (at run time, in a generic plan) and skip compressed
        # batches by their min/max metadata: without it a far page visits every chunk.
        where.add(f"{time_column} <= {{}} AND ({time_column}, id) < ({{}}, {{}})", cursor[0], *cursor)
    limit = where.param(size + 1)
    return f"{select} {where.sql()} ORDER BY {time_column} DESC, id DESC LIMIT {limit}", where.args


def page_of(items: list[T], size: int, token_after: Callable[[T], str]) -> Page[T]:
    """Cuts the size+1 fetched rows to a page; its next token points below its last row."""
    if len(items) <= size:
        return Page(items, "", token_after)
    items = items[:size]
    return Page(items, token_after(items[-1]), token_after)


def json_as_text(
    row: type[T], table: str, json_columns: tuple[str, ...]
) -> tuple[str, Callable[[list[asyncpg.Record]], list[T]]]:
    """What ``Paged._page`` runs for a list of ``row`` (a named tuple) from ``table``: the
    SELECT with ``json_columns`` as text, and what builds the rows from its records, decoding
    the whole page's JSON in one pass (the connection's codec calls Python once per value,
    which for a page of 100 enforcements cost more than the decoding itself)."""
    names: tuple[str, ...] = getattr(row, "_fields")  # noqa: B009
    at = [names.index(name) for name in json_columns]

    def rows(records: list[asyncpg.Record]) -> list[T]:
        values = iter(json_loads_all([r[i] for r in records for i in at]))
        out = []
        for r in records:
            fields = list(r.values())
            for i in at:
                fields[i] = next(values)
            out.append(row(*fields))
        return out

    return f"SELECT {columns(row, as_text=json_columns)} FROM {table}", rows


SEARCH = f"SET LOCAL statement_timeout = {int(limits.SEARCH_TIMEOUT_S * 1000)}; {CUSTOM_PLAN}"
"""What a payload search runs first: its own statement timeout, and a custom plan. The generic
plan cannot know how many rows a containment filter matches and walks the created index
backwards, filtering every payload, which for a rare value reads the whole range; planned with
the value, PostgreSQL reads the payload index (tests/integration/test_explain.py). On
TimescaleDB, planning anew costs a few milliseconds per chunk left after exclusion: a time range
makes a search cheaper twice."""
_COUNT_TIMEOUT = f"SET LOCAL statement_timeout = {int(limits.COUNT_TIMEOUT_S * 1000)}"


class Count(NamedTuple):
    """A capped count (``count_matching``)."""

    n: int
    more: bool = False
    """More than ``n`` (MAX_COUNT) match."""
    stopped: bool = False
    """The count ran past COUNT_TIMEOUT_S and was stopped: how many match is not known."""


class Paged(Repo):
    """A repository with list methods.

    The Store hands every such repository the signer of the api's shared key. Built on its own
    (``tools.bench.capture``), a repository signs with LOCAL, valid in this process only.
    """

    def __init__(self, pool: asyncpg.Pool, keys: Keys | None = None, reads: ReadRoute | None = None) -> None:
        super().__init__(pool, reads)
        self._keys: Keys = keys or _LocalKeys()

    async def token_below(self, listing: tuple[str, Where], cursor: Cursor) -> str:
        """The token of the page just below ``cursor`` in the list ``listing`` (a repository's
        ``listing(**filters)``): where a client walking the list would be. The benchmarks use it
        to start deep inside a list without walking there."""
        select, where = listing
        return (await self._keys.signer()).encode(Scope.of(select, where), cursor)

    async def _page(
        self,
        select: str,
        where: Where,
        token: str,
        size: int,
        row: Callable[..., T],
        time_column: str = "created",
        run: tuple[str, Callable[[list[asyncpg.Record]], list[T]]] | None = None,
        bounded: str | None = None,
    ) -> Page[T]:
        """One page of ``select`` filtered by ``where``, below the cursor of ``token``.

        ``time_column`` is also the attribute of ``row`` that holds it. ``run``: the SELECT
        actually run instead and what builds the rows from its records (``json_as_text``);
        tokens stay bound to ``select``, so they do not change with it. ``bounded``: the
        request field to name when the page, run under SEARCH_TIMEOUT_S, takes longer (a
        search); None runs it under the pool's statement timeout.
        """
        # The signer first, even for a first page: a page must be able to mint the tokens of
        # Page.cut without I/O. After the first call of this api it is cached.
        signer = await self._keys.signer()
        # Taken before the cursor joins the filters: the filters are what the token is bound to.
        scope = Scope.of(select, where, time_column)
        cursor = signer.decode(scope, token) if token else None
        sql, args = keyset_query(run[0] if run else select, where, cursor, size, time_column)
        # Pages are read where reads may lag (a standby, when configured): a keyset token holds
        # no server state, so consecutive pages may come from either server.
        if bounded is None:
            records = await self._read_fetch(sql, *args)
        else:
            records = await self._bounded_fetch(bounded, sql, *args, settings=SEARCH) or []
        rows = run[1](records) if run else [row(*r) for r in records]

        def token_after(item: T) -> str:
            return signer.encode(scope, (getattr(item, time_column), getattr(item, "id")))  # noqa: B009

        return page_of(rows, size, token_after)

    async def _count(self, table: str, where: Where, search: bool = False) -> Count:
        """How many rows of ``table`` match ``where``, counting no further than MAX_COUNT.
        Reading MAX_COUNT + 1 index entries costs about what a few pages do, where an exact
        count of a common filter would read the whole range. A count that runs past
        COUNT_TIMEOUT_S is stopped and says so. ``search``: ``where`` holds a payload filter
        (planned as a search is)."""
        cap = where.param(limits.MAX_COUNT + 1)
        sql = f"SELECT count(*) FROM (SELECT 1 FROM {table} {where.sql()} LIMIT {cap}) m"
        settings = f"{_COUNT_TIMEOUT}; {CUSTOM_PLAN}" if search else _COUNT_TIMEOUT
        records = await self._bounded_fetch(None, sql, *where.args, settings=settings)
        if records is None:
            return Count(0, more=False, stopped=True)
        n = int(records[0][0])
        return Count(min(n, limits.MAX_COUNT), more=n > limits.MAX_COUNT)

    async def _bounded_fetch(
        self, field: str | None, sql: str, *args: Any, settings: str
    ) -> list[asyncpg.Record] | None:
        """``_read_fetch`` in a transaction that first runs ``settings`` (its own statement
        timeout, and how to plan); past the timeout, INVALID_ARGUMENT naming ``field``, or None
        without a field. The server ends the statement (the connection stays usable and goes
        back to the pool), so no client-side cancel is involved."""

        async def read(pool: asyncpg.Pool) -> list[asyncpg.Record] | None:
            async with pool.acquire(timeout=until_deadline()) as conn:
                # Caught here, not by the caller: on a standby the read route takes SQLSTATE
                # class 57 for a failing standby, and would set it aside and run the same slow
                # search again on the primary.
                try:
                    async with conn.transaction(readonly=True):
                        await conn.execute(settings)
                        return list(await conn.fetch(sql, *args))
                except asyncpg.QueryCanceledError:
                    return None

        async with guarded():
            records = await self._reads.run(read)
            if records is None and field is not None:
                raise InvalidArgument.one(
                    field,
                    f"this search ran for more than {limits.SEARCH_TIMEOUT_S:g} s and was stopped; "
                    "narrow it with a time range (created) or another filter",
                )
            return records
