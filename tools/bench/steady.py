"""The production store's steady state on TimescaleDB: 90 one-day chunks per table, 83 compressed.

``read.load`` fills event and enforcement by COPY (``events`` events and twice as many
enforcements, ``created`` spread evenly over 90 days, so every day has its chunk). Then the
project's own policies run, as the scheduler would have run them: ``CALL run_job`` of each
compression policy (chunks older than 7 days), and the continuous aggregates are refreshed over
the whole range (their policy looks back 3 days, which a store that grew day by day would have
materialised long ago), then ANALYZE.

The full fixture (3M events, 6M enforcements) takes minutes to build, so it is kept on the server
as ``bench_steady_<digest>``: the digest covers the migrations, the fixture's shape and
``FIXTURE_VERSION``, and its shape and build time are in the database's comment, written last (a
database without it is a build that did not finish). A later run within ``REUSE_DAYS`` reuses
it after running the compression policies again; anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from services.api.migrate import migrate_url

from . import read
from .fixture import ROOT, Cluster, with_database
from .report import progress

DAYS = 90
FIXTURE_VERSION = 2
"""Bump when the rows ``read.load`` writes change: a kept fixture of another version is rebuilt."""
REUSE_DAYS = 2
TABLES = ("event", "enforcement")


@dataclass(frozen=True)
class Steady:
    url: str
    shape: read.Shape
    reused: bool
    built_s: float
    """How long this run spent building or refreshing it."""


def _digest(events: int) -> str:
    h = hashlib.sha256(f"{FIXTURE_VERSION}:{events}:{DAYS}".encode())
    for path in sorted((ROOT / "migrations").glob("*.sql")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


async def run_policies(url: str) -> None:
    """Runs the compression policies of event and enforcement, then refreshes the aggregates."""
    conn = await asyncpg.connect(url)
    try:
        jobs = await conn.fetch(
            "SELECT job_id FROM timescaledb_information.jobs "
            "WHERE proc_name = 'policy_compression' AND hypertable_name = ANY($1::text[]) ORDER BY job_id",
            list(TABLES),
        )
        for job in jobs:
            # run_job commits as it goes: it cannot run inside a transaction (asyncpg sends
            # this statement on its own, in autocommit).
            await conn.execute(f"CALL run_job({int(job['job_id'])})")
        # Continuous aggregates exist only on the Timescale-licensed edition; on the Apache one
        # the volume views are plain views with nothing to refresh.
        aggregates = {
            r["view_name"]
            for r in await conn.fetch("SELECT view_name FROM timescaledb_information.continuous_aggregates")
        }
        for view in ("event_volume_hourly", "enforcement_volume_hourly"):
            if view in aggregates:
                await conn.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, now() - INTERVAL '1 hour')")
        for table in TABLES:
            await conn.execute(f"ANALYZE {table}")
    finally:
        await conn.close()


async def run_refresh_policies(url: str) -> bool:
    """Runs the volume views' refresh policies once, as their scheduler does (the per-minute
    views' every minute, migration 0023; the hourly ones' every 30 minutes); whether there were
    any. On this machine's TimescaleDB build (2.28.3 against PostgreSQL 15.20) the scheduler's
    jobs fail ("cannot drop portal"): without this the per-minute views would stay empty, the hourly ones'
    watermark would never move, and a page would time the fallback, counting raw rows."""
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval("SELECT to_regclass('timescaledb_information.jobs') IS NOT NULL"):
            return False
        jobs = await conn.fetch(
            "SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = 'policy_refresh_continuous_aggregate' "
            "ORDER BY job_id"
        )
        for job in jobs:
            await conn.execute(f"CALL run_job({int(job['job_id'])})")
        return bool(jobs)
    finally:
        await conn.close()


async def chunk_counts(url: str) -> dict[str, tuple[int, int]]:
    """Chunks and compressed chunks of each table (none where the table is not a hypertable)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT hypertable_name, count(*) AS chunks, count(*) FILTER (WHERE is_compressed) AS compressed "
            "FROM timescaledb_information.chunks WHERE hypertable_name = ANY($1::text[]) GROUP BY 1",
            list(TABLES),
        )
    finally:
        await conn.close()
    return {r["hypertable_name"]: (int(r["chunks"]), int(r["compressed"])) for r in rows}


def describe_chunks(counts: dict[str, tuple[int, int]]) -> str:
    return "; ".join(f"{t}: {counts.get(t, (0, 0))[0]} chunks, {counts.get(t, (0, 0))[1]} compressed" for t in TABLES)


async def _kept(admin: asyncpg.Connection, name: str) -> dict[str, float] | None:
    comment = await admin.fetchval(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1", name
    )
    if not comment:
        return None
    try:
        about: dict[str, float] = json.loads(comment)
    except ValueError:
        return None
    if time.time() - about.get("built", 0) > REUSE_DAYS * 86400:
        return None
    return about


async def build(cluster: Cluster, events: int, keep: bool) -> Steady:
    """The steady-state database: reused when a kept one fits, otherwise built (and kept if
    ``keep``; a database that is not kept is dropped with the cluster)."""
    t = time.perf_counter()
    name = f"bench_steady_{_digest(events)}"
    url = with_database(cluster.admin_url, name)
    admin = await asyncpg.connect(cluster.admin_url)
    try:
        about = await _kept(admin, name) if keep else None
        if about is not None:
            progress(f"steady: reusing {name}, built {(time.time() - about['built']) / 3600:.1f} h ago")
            await run_policies(url)
            shape = read.Shape(
                int(about["events"]),
                datetime.fromtimestamp(about["start"], UTC),
                timedelta(microseconds=about["step_us"]),
            )
            return Steady(url, shape, True, time.perf_counter() - t)
        # Earlier fixtures (other migrations or sizes) would only fill the disk.
        for old in await admin.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_steady\\_%'"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{old["datname"]}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    if not keep:
        cluster.databases.append(name)
    await migrate_url(url, ROOT / "migrations")
    progress(f"steady: loading {events:,} events and {2 * events:,} enforcements over {DAYS} days")
    shape = await read.load(url, events, days=DAYS)
    t_policies = time.perf_counter()
    await run_policies(url)
    progress(f"steady: compression policies and aggregate refresh took {time.perf_counter() - t_policies:.0f}s")
    if keep:
        about = {
            "events": events,
            "start": shape.start.timestamp(),
            "step_us": shape.step / timedelta(microseconds=1),
            "built": time.time(),
        }
        admin = await asyncpg.connect(cluster.admin_url)
        try:
            await admin.execute(f"COMMENT ON DATABASE \"{name}\" IS '{json.dumps(about)}'")
        finally:
            await admin.close()
    return Steady(url, shape, False, time.perf_counter() - t)
