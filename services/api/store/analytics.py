"""Hourly volumes.

On TimescaleDB's Timescale-licensed edition, event_volume_hourly / enforcement_volume_hourly are
real-time continuous aggregates and are read as such. Elsewhere (plain PostgreSQL, and the
Apache-licensed edition, which has no continuous aggregates) they are ordinary views with the
same names and columns; reading one would aggregate every row before filtering on its bucket,
so the same buckets are computed from the base table, bounded on ``created``: a bucket ``b``
(the hour ``created`` falls in) satisfies ``start <= b < end`` exactly when
``ceil_hour(start) <= created < ceil_hour(end)``, which the index on ``created`` (and, on
hypertables, chunk exclusion) serves. Which kind the views are is read once.
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

    async def _bounds(self, start: datetime, end: datetime) -> tuple[Where, str, str]:
        """The range condition, and the bucket expression and source to read it from."""
        where = Where()
        if await self._continuous():
            where.add("bucket >= {}", start)
            where.add("bucket < {}", end)
            return where, "bucket", ""
        where.add("created >= {}", _ceil_hour(start))
        where.add("created < {}", _ceil_hour(end))
        return where, _HOUR, "base"

    async def event_volume(self, start: datetime, end: datetime, trigger_ref: str = "") -> list[EventVolume]:
        where, bucket, base = await self._bounds(start, end)
        if trigger_ref:
            where.add("trigger_ref = {}", trigger_ref)
        columns = "extract(epoch FROM bucket)::bigint, trigger_ref, event_count"
        if base:
            source = (
                f"SELECT {bucket} AS bucket, trigger_ref, count(*) AS event_count "
                f"FROM event {where.sql()} GROUP BY 1, 2"
            )
            sql = f"SELECT {columns} FROM ({source}) v"
        else:
            sql = f"SELECT {columns} FROM event_volume_hourly {where.sql()}"
        sql += " ORDER BY bucket, trigger_ref"
        return [EventVolume._make(r) for r in await self._read_fetch(sql, *where.args)]

    async def enforcement_volume(
        self, start: datetime, end: datetime, rule_ref: str = "", status: str = ""
    ) -> list[EnforcementVolume]:
        where, bucket, base = await self._bounds(start, end)
        if rule_ref:
            where.add("rule_ref = {}", rule_ref)
        if status:
            where.add("status = {}::enforcement_status", status)
        columns = "extract(epoch FROM bucket)::bigint, rule_ref, status::text, enforcement_count"
        if base:
            source = (
                f"SELECT {bucket} AS bucket, rule_ref, status, count(*) AS enforcement_count "
                f"FROM enforcement {where.sql()} GROUP BY 1, 2, 3"
            )
            sql = f"SELECT {columns} FROM ({source}) v"
        else:
            sql = f"SELECT {columns} FROM enforcement_volume_hourly {where.sql()}"
        sql += " ORDER BY bucket, rule_ref, status"
        return [EnforcementVolume._make(r) for r in await self._read_fetch(sql, *where.args)]
