"""Hourly volumes from event_volume_hourly / enforcement_volume_hourly (continuous aggregates
on TimescaleDB, ordinary views on plain PostgreSQL: same names, same columns)."""

from __future__ import annotations

from datetime import datetime

from ._db import Repo
from ._paging import Where
from .types import EnforcementVolume, EventVolume


class Analytics(Repo):
    """Reads the volume views."""

    async def event_volume(self, start: datetime, end: datetime, trigger_ref: str = "") -> list[EventVolume]:
        where = Where()
        where.add("bucket >= {}", start)
        where.add("bucket < {}", end)
        if trigger_ref:
            where.add("trigger_ref = {}", trigger_ref)
        sql = (
            "SELECT extract(epoch FROM bucket)::bigint, trigger_ref, event_count "
            f"FROM event_volume_hourly {where.sql()} ORDER BY bucket, trigger_ref"
        )
        return [EventVolume._make(r) for r in await self._fetch(sql, *where.args)]

    async def enforcement_volume(
        self, start: datetime, end: datetime, rule_ref: str = "", status: str = ""
    ) -> list[EnforcementVolume]:
        where = Where()
        where.add("bucket >= {}", start)
        where.add("bucket < {}", end)
        if rule_ref:
            where.add("rule_ref = {}", rule_ref)
        if status:
            where.add("status = {}::enforcement_status", status)
        sql = (
            f"SELECT extract(epoch FROM bucket)::bigint, rule_ref, status::text, enforcement_count "
            f"FROM enforcement_volume_hourly "
            f"{where.sql()} ORDER BY bucket, rule_ref, status"
        )
        return [EnforcementVolume._make(r) for r in await self._fetch(sql, *where.args)]
