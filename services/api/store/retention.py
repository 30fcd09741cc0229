"""Retention where TimescaleDB has no policies to do it: the Apache-licensed edition.

On the Timescale-licensed edition, retention policies (migration 0005) drop chunks older than
90 days; on plain PostgreSQL nothing is dropped. The Apache-licensed edition refuses policies
but has ``drop_chunks``: there the api's maintenance calls ``drop_expired`` every hour. The
edition is read once, from ``timescaledb.license``.
"""

from __future__ import annotations

from ._db import Repo

RETENTION_DAYS = 90
"""How long events, enforcements and history are kept (the retention policies' 90 days)."""

_EDITION = """
SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN ''
            ELSE coalesce(current_setting('timescaledb.license', true), '') END
"""
# The hypertables among the tables kept RETENTION_DAYS (plain tables are left alone).
_HYPERTABLES = """
SELECT hypertable_name::text FROM timescaledb_information.hypertables
 WHERE hypertable_schema = 'public'
   AND hypertable_name IN ('event', 'enforcement', 'execution_history', 'worker_history')
 ORDER BY hypertable_name
"""
_DROP = "SELECT c::text FROM drop_chunks($1::regclass, older_than => make_interval(days => $2)) c"


class Retention(Repo):
    """Drops chunks past RETENTION_DAYS where no retention policy can."""

    _edition: str | None = None

    async def edition(self) -> str:
        """``timescale``, ``apache``, or ``""`` without the extension (read once)."""
        if self._edition is None:
            self._edition = str(await self._fetchval(_EDITION))
        return self._edition

    async def drop_expired(self) -> list[str]:
        """On the Apache-licensed edition, drops the chunks older than RETENTION_DAYS and returns
        their names; elsewhere does nothing (policies or nothing keep the tables)."""
        if await self.edition() != "apache":
            return []
        dropped: list[str] = []
        for row in await self._fetch(_HYPERTABLES):
            dropped += [r[0] for r in await self._fetch(_DROP, row[0], RETENTION_DAYS)]
        return dropped
