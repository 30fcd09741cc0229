"""Hourly volumes, and sums of them over wider buckets.

On TimescaleDB's Timescale-licensed edition, event_volume_hourly / enforcement_volume_hourly are
real-time continuous aggregates and are read as such. Elsewhere (plain PostgreSQL, and the
Apache-licensed edition, which has no continuous aggregates) they are ordinary views with the
same names and columns; reading one would aggregate every row before filtering on its bucket,
so the same buckets are computed from the base table, bounded on ``created``: a bucket ``b``
(the hour ``created`` falls in) satisfies ``start <= b < end`` exactly when
``ceil_hour(start) <= created < ceil_hour(end)``, which the index on ``created`` (and, on
hypertables, chunk exclusion) serves. Which kind the views are is read once.

A bucket wider than an hour sums the hourly buckets in the database (``date_bin`` of the hour
to the width, from the Unix epoch): thirty days of hours by trigger are 17,000 rows to send, and
thirty days are 30 times fewer.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ._db import Repo
from ._paging import Where
from .types import EnforcementVolume, EventVolume

_HAS_CAGG_CATALOG = "SELECT to_regclass('timescaledb_information.continuous_aggregates') IS NOT NULL"
_CAGGS = (
    "SELECT count(*) FROM timescaledb_information.continuous_aggregates "
    "WHERE view_schema = current_schema() AND view_name IN ('event_volume_hourly', 'enforcement_volume_hourly')"
)
_HOUR = "date_bin(INTERVAL '1 hour', created, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
HOUR = timedelta(hours=1)


def _ceil_hour(t: datetime) -> datetime:
    """The first whole UTC hour at or after ``t`` (buckets are UTC hours)."""
    if t.tzinfo is not None:
        t = t.astimezone(UTC)
    floor = t.replace(minute=0, second=0, microsecond=0)
    return floor if floor == t else floor + timedelta(hours=1)


class Analytics(Repo):
    """Reads the hourly volumes."""

    _aggregates: bool | None = None

    async def _continuous(self) -> bool:
        """Whether the volume views are continuous aggregates (read once)."""
        if self._aggregates is None:
            self._aggregates = bool(await self._fetchval(_HAS_CAGG_CATALOG)) and await self._fetchval(_CAGGS) == 2
        return self._aggregates

    async def _bounds(self, start: datetime, end: datetime) -> tuple[Where, str, bool]:
        """The range condition, the hour expression, and whether to read the base table."""
        where = Where()
        if await self._continuous():
            where.add("bucket >= {}", start)
            where.add("bucket < {}", end)
            return where, "bucket", False
        where.add("created >= {}", _ceil_hour(start))
        where.add("created < {}", _ceil_hour(end))
        return where, _HOUR, True

    async def event_volume(
        self, start: datetime, end: datetime, trigger_ref: str = "", width: timedelta = HOUR
    ) -> list[EventVolume]:
        where, hour, base = await self._bounds(start, end)
        if trigger_ref:
            where.add("trigger_ref = {}", trigger_ref)
        sql = _summed(
            where, hour, width, "event" if base else "event_volume_hourly", "trigger_ref", "event_count", base
        )
        return [EventVolume._make(r) for r in await self._read_fetch(sql, *where.args)]

    async def enforcement_volume(
        self, start: datetime, end: datetime, rule_ref: str = "", status: str = "", width: timedelta = HOUR
    ) -> list[EnforcementVolume]:
        where, hour, base = await self._bounds(start, end)
        if rule_ref:
            where.add("rule_ref = {}", rule_ref)
        if status:
            where.add("status = {}::enforcement_status", status)
        source = "enforcement" if base else "enforcement_volume_hourly"
        sql = _summed(where, hour, width, source, "rule_ref, status", "enforcement_count", base)
        return [EnforcementVolume._make(r) for r in await self._read_fetch(sql, *where.args)]


def _summed(where: Where, hour: str, width: timedelta, source: str, keys: str, count: str, base: bool) -> str:
    """The ``count`` per bucket of ``width`` and ``keys`` from ``source``: the base table, counted,
    or an hourly view, read as it is or summed into wider buckets."""
    bucket = hour if width == HOUR else f"date_bin({where.param(width)}::interval, {hour}, TIMESTAMPTZ 'epoch')"
    condition = where.sql()
    if base or width != HOUR:
        tally = "count(*)" if base else f"sum({count})::bigint"
        source = (
            f"(SELECT {bucket} AS bucket, {keys}, {tally} AS {count} FROM {source} {condition} GROUP BY 1, {keys}) v"
        )
        condition = ""
    shown = keys.replace("status", "status::text")
    return (
        f"SELECT extract(epoch FROM bucket)::bigint, {shown}, {count} FROM {source} {condition} ORDER BY bucket, {keys}"
    )
