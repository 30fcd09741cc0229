"""Where a row lies in time, from its id alone: GetEvent and GetEnforcement on TimescaleDB.

A lookup by id carries no time, so TimescaleDB cannot exclude a chunk: on 90 one-day chunks
(83 compressed) ``WHERE id = $1`` probes every one of them (2 ms of SQL, against 0.1 ms on plain
PostgreSQL). Ids come from one sequence while rows are stored with ``created = now()``, so they
grow with ``created``: the smallest id of each chunk places any id between two chunk starts.

``ChunkFinder.bounds(id)`` answers a time range that holds the row when that held as it was
stored: the chunk whose smallest id is the last one at or below ``id``, widened backwards by
``SLACK`` (a transaction that began before midnight takes its id after the first row of the
next day, but is stamped with its start). Callers search that range first and every chunk
when the row is not there, so a row stored any other way (SQL with an explicit ``created``)
is still found, only slower. Nothing is written: the chunk list comes from TimescaleDB's
catalog (read again after ``REFRESH_S``, or after a miss), and a chunk's smallest id is asked
once, when a search first needs it, and kept (new rows only add larger ids).

On plain PostgreSQL, or where the table is not a hypertable, ``bounds`` is always None.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from ._db import guarded

SLACK = timedelta(hours=1)
"""How long before a chunk's start a row with one of its ids may have been stamped: far more
than any transaction of the api lasts (statements time out in seconds)."""
REFRESH_S = 60.0
"""How long the chunk list is trusted before it is read again (a new chunk starts each day)."""

_HYPERTABLE = """
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND to_regclass('timescaledb_information.hypertables') IS NOT NULL"""
_IS_HYPERTABLE = """
SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                WHERE hypertable_schema = current_schema() AND hypertable_name = $1)"""
_CHUNKS = """
SELECT range_start, range_end, is_compressed FROM timescaledb_information.chunks
 WHERE hypertable_schema = current_schema() AND hypertable_name = $1
 ORDER BY range_start"""


@dataclass(frozen=True, slots=True)
class _Chunk:
    start: datetime
    end: datetime
    compressed: bool


class ChunkFinder:
    """The time range of one hypertable's row, from its id (see the module's doc)."""

    def __init__(self, pool: asyncpg.Pool, table: str) -> None:
        self._pool = pool
        self._table = table
        # None until asked: whether this database has the table as a hypertable.
        self._hypertable: bool | None = None
        self._chunks: list[_Chunk] = []
        self._read_at = -REFRESH_S
        # Smallest id of each chunk, by its start; a chunk found empty is not kept.
        self._first_id: dict[datetime, int] = {}
        # Statement built from constants: the table name is this module's caller's, not input.
        self._first_id_sql = f"SELECT min(id) FROM {table} WHERE created >= $1 AND created < $2"

    def missed(self) -> None:
        """A row was not in the range ``bounds`` gave: read the chunk list again next time (a
        chunk may have started since), unless it was read within the last second."""
        if time.monotonic() - self._read_at > 1.0:
            self._read_at = -REFRESH_S

    async def bounds(self, id_: int) -> tuple[datetime, datetime] | None:
        """[start, end) of ``created`` to search first for the row ``id_``, or None to search
        every chunk (no hypertable, no chunk, or an id below every chunk's smallest)."""
        if not await self._read():
            return None
        chunks = self._chunks
        found = await search(len(chunks), lambda i: self._first(chunks[i]), id_)
        if found is None:
            return None
        chunk = chunks[found]
        return chunk.start - SLACK, chunk.end

    async def compressed_until(self) -> datetime | None:
        """The end of the newest compressed chunk (rows stamped before it may be compressed),
        as of at most ``REFRESH_S`` ago; None when no chunk is compressed or no hypertable."""
        if not await self._read():
            return None
        return max((c.end for c in self._chunks if c.compressed), default=None)

    async def _read(self) -> bool:
        """Reads the chunk list when it is stale; False where the table is no hypertable."""
        if self._hypertable is False:
            return False
        if self._hypertable is None or time.monotonic() - self._read_at >= REFRESH_S:
            async with guarded(), self._pool.acquire() as conn:
                if self._hypertable is None:
                    self._hypertable = bool(await conn.fetchval(_HYPERTABLE)) and bool(
                        await conn.fetchval(_IS_HYPERTABLE, self._table)
                    )
                # Another call may have found out meanwhile.
                if not self._hypertable:
                    return False
                rows = await conn.fetch(_CHUNKS, self._table)
            self._chunks = [_Chunk(r["range_start"], r["range_end"], r["is_compressed"]) for r in rows]
            self._read_at = time.monotonic()
            # Chunks that retention dropped are forgotten with them.
            starts = {c.start for c in self._chunks}
            self._first_id = {k: v for k, v in self._first_id.items() if k in starts}
        return True

    async def _first(self, chunk: _Chunk) -> int | None:
        first = self._first_id.get(chunk.start)
        if first is None:
            async with guarded():
                first = await self._pool.fetchval(self._first_id_sql, chunk.start, chunk.end)
            if first is not None:
                self._first_id[chunk.start] = first
        return first


class ById:
    """One hypertable's rows by id: in the range ``ChunkFinder`` gives first, then everywhere."""

    def __init__(self, pool: asyncpg.Pool, table: str, columns: str) -> None:
        self._pool = pool
        self.finder = ChunkFinder(pool, table)
        # Built from constants (the repositories' table and column lists), never from input.
        self.everywhere = f"SELECT {columns} FROM {table} WHERE id = $1"
        self.within = f"SELECT {columns} FROM {table} WHERE id = $1 AND created >= $2 AND created < $3"

    async def fetchrow(self, id_: int, pool: asyncpg.Pool | None = None) -> asyncpg.Record | None:
        """The row ``id_``, read on ``pool`` (a standby's; the primary's by default). The chunk
        list and chunks' smallest ids always come from the primary: they are cached, and a
        chunk the standby has not replayed yet only sends the search to every chunk."""
        bounds = await self.finder.bounds(id_)
        on = pool or self._pool
        async with guarded():
            if bounds is not None:
                row = await on.fetchrow(self.within, id_, *bounds)
                if row is not None:
                    return row
            row = await on.fetchrow(self.everywhere, id_)
        if row is not None and bounds is not None:
            self.finder.missed()
        return row


async def search(n: int, first: Callable[[int], Awaitable[int | None]], id_: int) -> int | None:
    """The index of the last of ``n`` chunks (in time order) whose smallest id, ``await
    first(i)``, is at or below ``id_``; None when there is none or an empty chunk is in the way.

    Ids grow with the chunks' starts, so this is a binary search: about log2(90) = 7 chunks are
    asked for their smallest id at most."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        smallest = await first(mid)
        if smallest is None:
            return None
        if smallest <= id_:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1 if lo else None
