"""Volumes per hour, or per several hours summed in the database.

Where they come from depends on what the database has, which is read once:

- TimescaleDB's Timescale-licensed edition: event_volume_hourly / enforcement_volume_hourly are
  real-time continuous aggregates, refreshed every 30 minutes up to an hour ago, so their
  latest hours are counted from the base table at every read: a burst of 100,000 rows in the
  last hour made the console's volume page take 250 ms. Migration 0023 adds per-minute ones
  (``*_volume_minute``), refreshed every minute over the last few hours, and the hours since
  ``RECENT`` before the current one are read from those, summed into hours; older hours from
  the hourly ones. Both are real-time, so either answers any hour correctly: where the line
  falls only decides which is cheaper.
- Elsewhere (plain PostgreSQL, and the Apache-licensed edition, which has no continuous
  aggregates) the views are ordinary ones with the same names and columns; reading one would
  aggregate every row before filtering on its bucket, so the same buckets are counted from the
  base table, bounded on ``created``: the hour of ``created`` satisfies ``start <= b < end``
  exactly when ``ceil_hour(start) <= created < ceil_hour(end)``, which the index on ``created``
  (and, on hypertables, chunk exclusion) serves.

A bucket wider than an hour sums the hours in the database (``date_bin`` to the width, from the
Unix epoch): thirty days of hours by trigger were 17,000 rows to send, thirty days are 30 times
fewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

import asyncpg

from ._db import Repo
from ._paging import Where
from .types import EnforcementVolume, EventVolume

_HAS_CAGG_CATALOG = "SELECT to_regclass('timescaledb_information.continuous_aggregates') IS NOT NULL"
_CAGG_NAMES = (
    "SELECT array_agg(view_name::text) FROM timescaledb_information.continuous_aggregates "
    "WHERE view_schema = current_schema()"
)
HOUR = timedelta(hours=1)
RECENT = timedelta(hours=2)
"""How far before the current hour the per-minute aggregates are read: their policy keeps the
last 4 hours materialized, the hourly ones' leaves up to 2.5 hours to count at each read."""

Views = Literal["base", "hourly", "recent"]


class Counted(NamedTuple):
    """What a volume counts: a table, the columns its counts are kept by (and as they are
    answered), and its views' count column."""

    table: str
    keys: str
    shown: str
    count_column: str


EVENTS = Counted("event", "trigger_ref", "trigger_ref", "event_count")
ENFORCEMENTS = Counted("enforcement", "rule_ref, status", "rule_ref, status::text", "enforcement_count")


def _ceil_hour(t: datetime) -> datetime:
    """The first whole UTC hour at or after ``t`` (buckets are UTC hours)."""
    if t.tzinfo is not None:
        t = t.astimezone(UTC)
    floor = t.replace(minute=0, second=0, microsecond=0)
    return floor if floor == t else floor + HOUR


class Analytics(Repo):
    """Reads the volumes."""

    _views: Views | None = None

    async def views(self) -> Views:
        """Which volume views this database has (read once)."""
        if self._views is None:
            names = set(await self._fetchval(_CAGG_NAMES) or ()) if await self._fetchval(_HAS_CAGG_CATALOG) else set()
            hourly = {"event_volume_hourly", "enforcement_volume_hourly"} <= names
            minute = {"event_volume_minute", "enforcement_volume_minute"} <= names
            self._views = "recent" if hourly and minute else "hourly" if hourly else "base"
        return self._views

    async def event_volume(
        self, start: datetime, end: datetime, trigger_ref: str = "", width: timedelta = HOUR
    ) -> list[EventVolume]:
        filters = [("trigger_ref = {}", trigger_ref)] if trigger_ref else []
        rows = await self._volume(EVENTS, start, end, width, filters)
        return [EventVolume._make(r) for r in rows]

    async def enforcement_volume(
        self, start: datetime, end: datetime, rule_ref: str = "", status: str = "", width: timedelta = HOUR
    ) -> list[EnforcementVolume]:
        filters: list[tuple[str, Any]] = []
        if rule_ref:
            filters.append(("rule_ref = {}", rule_ref))
        if status:
            filters.append(("status = {}::enforcement_status", status))
        rows = await self._volume(ENFORCEMENTS, start, end, width, filters)
        return [EnforcementVolume._make(r) for r in rows]

    async def _volume(
        self, of: Counted, start: datetime, end: datetime, width: timedelta, filters: Sequence[tuple[str, Any]]
    ) -> list[asyncpg.Record]:
        query = volume_query(await self.views(), of, start, end, width, filters, datetime.now(UTC))
        if query is None:
            return []
        sql, args = query
        return await self._read_fetch_planned(sql, *args)


def volume_query(
    views: Views,
    of: Counted,
    start: datetime,
    end: datetime,
    width: timedelta,
    filters: Sequence[tuple[str, Any]],
    now: datetime,
) -> tuple[str, list[Any]] | None:
    """The statement and its arguments for the count of ``of`` per bucket of ``width`` and its
    keys (None: the range holds no whole hour): the parts read from each source, each binned to
    the width, then summed (a bucket may take hours from two sources)."""
    table, keys, count = of.table, of.keys, of.count_column
    where = Where()
    binned = f"date_bin({where.param(width)}::interval, {{}}, TIMESTAMPTZ 'epoch')"
    # Every part carries the same filters: their placeholders are shared.
    conditions = [fragment.format(where.param(value)) for fragment, value in filters]

    def part(source: str, column: str, low: datetime, high: datetime, counted: bool) -> str:
        bounds = [f"{column} >= {where.param(low)}", f"{column} < {where.param(high)}"]
        tally, group = ("count(*)", f" GROUP BY 1, {keys}") if counted else (count, "")
        return (
            f"SELECT {binned.format(column)} AS b, {keys}, {tally} AS n FROM {source} "
            f"WHERE {' AND '.join(bounds + conditions)}{group}"
        )

    first, last = _ceil_hour(start), _ceil_hour(end)
    if views == "base":
        parts = [part(table, "created", first, last, True)]
    else:
        line = last if views == "hourly" else now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) - RECENT
        parts = []
        if first < line:
            parts.append(part(f"{table}_volume_hourly", "bucket", first, min(last, line), False))
        if last > line:
            parts.append(part(f"{table}_volume_minute", "bucket", max(first, line), last, False))
        if not parts:
            return None
    sql = (
        f"SELECT extract(epoch FROM b)::bigint, {of.shown}, sum(n)::bigint "
        f"FROM ({' UNION ALL '.join(parts)}) v GROUP BY b, {keys} ORDER BY b, {keys}"
    )
    return sql, where.args
