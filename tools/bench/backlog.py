"""``--only backlog``: an executor comes back after 9 days without one.

The store holds 10 days of events (``Settings.backlog_events``) and their enforcements; the
ones of the last 9 days are all still ``created``, each with its dispatch row, as if no executor
had run since. On TimescaleDB the project's compression policy has run (``CALL run_job``), so
the 2 oldest days of the backlog lie in compressed chunks.

1. One resolution at a time (``ResolveEnforcement``, sequential): rows in compressed chunks
   (older than 8 days) against rows in uncompressed ones, in the same database.
2. CreateEvent c=16 (closed loop) alone; then one executor is started and works through the
   backlog while the same load runs, until every pending enforcement older than the start is
   resolved: the ingest rate during the drain against the rate alone, and the drain's rate.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import asyncpg

from shared.gen.automation.v1 import common_pb2, enforcement_pb2, enforcement_pb2_grpc

from . import read, steady, workload
from .fixture import Cluster, channel, services
from .load import ClosedResult, closed_loop
from .report import Row, median, percentile, progress
from .settings import Settings

TRIGGER = "bench.backlog.hook"
RULES = ["bench.backlog.a", "bench.backlog.b"]
DAYS = 10
DOWN = timedelta(days=9)
"""How long no executor ran: the enforcements of the last 9 days are pending."""
COMPRESSED_AGE = timedelta(days=8)
_PENDING_BEFORE = "SELECT count(*) FROM enforcement_dispatch WHERE enforcement_created < $1"
_SAMPLE = """
SELECT d.enforcement FROM enforcement_dispatch d
 WHERE d.enforcement_created < $1 AND d.enforcement_created >= $2
 ORDER BY d.enforcement LIMIT $3"""


async def _database(cluster: Cluster, s: Settings) -> tuple[str, int]:
    """A database of its own with the backlog; returns its URL and the events it holds."""
    url = await cluster.fresh_database("backlog")
    events = s.backlog_events
    await read.load(url, events, days=DAYS, pending_since=DOWN)
    if cluster.store == "timescale":
        await steady.run_policies(url)
        progress(f"backlog: {steady.describe_chunks(await steady.chunk_counts(url))}")
    return url, events


async def _resolve_each(stub: enforcement_pb2_grpc.EnforcementServiceAsyncStub, ids: list[int]) -> list[float]:
    latencies = []
    for id_ in ids:
        t = time.perf_counter()
        await stub.ResolveEnforcement(
            enforcement_pb2.ResolveEnforcementRequest(
                id=id_, status=common_pb2.ENFORCEMENT_STATUS_DISABLED, reason="bench: backlog"
            ),
            timeout=30,
        )
        latencies.append(time.perf_counter() - t)
    return latencies


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url, events = await _database(cluster, s)
    rows: list[Row] = []
    now = datetime.now(UTC)
    old = now - COMPRESSED_AGE
    async with services(url) as svc:
        target = await svc.start_api()
        conn = await asyncpg.connect(url)
        try:
            async with channel(target) as ch:
                stub: enforcement_pb2_grpc.EnforcementServiceAsyncStub = enforcement_pb2_grpc.EnforcementServiceStub(ch)
                n = s.read_samples
                fresh = [r[0] for r in await conn.fetch(_SAMPLE, now, old, n)]
                aged = [r[0] for r in await conn.fetch(_SAMPLE, old, now - DOWN, n)]
                hot = await _resolve_each(stub, fresh)
                cold = await _resolve_each(stub, aged)
                rows.append(
                    Row(
                        "backlog: ResolveEnforcement, one in a compressed chunk",
                        len(hot) / sum(hot),
                        len(cold) / sum(cold),
                        percentile(cold, 50),
                        percentile(cold, 99),
                        f"sequential; raw column = the same RPC on rows in uncompressed chunks "
                        f"(p50/p99 {percentile(hot, 50) * 1000:.2f}/{percentile(hot, 99) * 1000:.2f} ms); "
                        f"n={len(cold)}/{len(hot)}",
                    )
                )
                progress(rows[-1].notes)

                await workload.define(ch, TRIGGER, RULES)
                create = workload.create_event(ch, TRIGGER)
                alone = [await closed_loop(create, 16, s.rep_s) for _ in range(s.reps)]
                backlog = int(await conn.fetchval(_PENDING_BEFORE, now))
                old_pending = int(await conn.fetchval(_PENDING_BEFORE, old))
                progress(f"backlog: {backlog:,} pending ({old_pending:,} older than 8 days); starting one executor")
                started = time.perf_counter()
                await svc.start_executors(1)
                during: list[ClosedResult] = []
                left = backlog
                limit = 600.0 if not s.quick else 120.0
                while left and time.perf_counter() - started < limit:
                    during.append(await closed_loop(create, 16, s.rep_s))
                    left = int(await conn.fetchval(_PENDING_BEFORE, now))
                    progress(f"backlog: {left:,} left after {time.perf_counter() - started:.0f}s")
                drained = time.perf_counter() - started
                # The ingest windows ran back to back with the drain; the last one may have
                # outlived it, which only makes the "during" rate kinder by a fraction.
                rate_alone = median([r.rate for r in alone])
                rate_during = median([r.rate for r in during]) if during else float("nan")
                lat = [x for r in during for x in r.latencies]
                rows.append(
                    Row(
                        "backlog: CreateEvent c=16 while an executor drains it",
                        rate_alone,
                        rate_during,
                        percentile(lat, 50),
                        percentile(lat, 99),
                        f"raw column = the same load with no backlog to work; "
                        f"{len(during)} windows of {s.rep_s:g}s during the drain",
                    )
                )
                rows.append(
                    Row(
                        f"backlog: {backlog:,} pending enforcements, {old_pending:,} older than 8 days",
                        None,
                        (backlog - left) / drained if drained else None,
                        notes=(
                            f"{'drained' if not left else f'NOT drained ({left:,} left)'} by one executor in "
                            f"{drained:.0f}s beside the ingest load; {events:,} events in the store"
                        ),
                    )
                )
        finally:
            await conn.close()
    await cluster.drop(url)
    return rows
