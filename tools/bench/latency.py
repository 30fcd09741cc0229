"""Issue 4's figure: creation-to-resolution latency over 1,000 events at a modest steady rate.

One executor; events offered at ``latency_rate``/s. The latency of an event is its
enforcement's ``resolved_at`` (PostgreSQL's ``now()`` in the resolving transaction, i.e. its
start, on this machine's clock) minus the wall-clock time (``time.time()``) at which
CreateEvent returned to the client. The raw column is the SQL-only resolution (the same
conditional update + execution insert, issued right after the insert returns) at the same
rate, timed the same way.
"""

from __future__ import annotations

import asyncio
import math
import time

import asyncpg

from shared.gen.automation.v1 import event_pb2_grpc

from . import workload
from .fixture import Cluster, channel, services
from .load import open_loop
from .pipeline import RAW_RULE, RAW_TRIGGER, RULE, TRIGGER, Sampler, raw_define, window
from .report import Row, percentile, progress
from .settings import Settings


async def _raw(url: str, s: Settings) -> list[float]:
    """Insert, then resolve in a second statement once the insert returned, at the same rate."""
    trigger_id, rule_id = await raw_define(url)
    pool = await workload.raw_pool(url, 8)
    latencies: list[float] = []
    try:

        async def one(_i: int) -> None:
            rows = await pool.fetch(
                workload.RAW_EVENT_WITH_ENFORCEMENTS,
                trigger_id,
                RAW_TRIGGER,
                workload.PAYLOAD_JSON,
                workload.SOURCE,
                workload.RAW_CONFIG,
                [rule_id],
                [RAW_RULE],
            )
            returned = time.time()
            await pool.fetchval(workload.RAW_RESOLVE, rows[0]["id"], rows[0]["created"], workload.ACTION)
            at = await pool.fetchval(
                "SELECT extract(epoch FROM resolved_at)::float8 FROM enforcement WHERE id = $1 AND created = $2",
                rows[0]["id"],
                rows[0]["created"],
            )
            latencies.append(float(at) - returned)

        await open_loop(one, s.latency_rate, s.latency_events / s.latency_rate)
    finally:
        await pool.close()
    return latencies


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url = await cluster.fresh_database("latency")
    progress(f"latency: {s.latency_events} events at {s.latency_rate:.0f}/s, raw first")
    raw = await _raw(url, s)
    async with services(url) as svc:
        target = await svc.start_api()
        await svc.start_executors(1)
        conn = await asyncpg.connect(url)
        try:
            async with channel(target) as ch:
                await workload.define(ch, TRIGGER, [RULE])
                stub: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
                await asyncio.sleep(0.5)  # let the watch stream open
                async with Sampler(url, [], s.sample_s) as sampler:
                    # A short warm-up, then the measured 1,000.
                    await window(stub, conn, sampler, s.latency_rate, 1.0, 10.0)
                    w = await window(stub, conn, sampler, s.latency_rate, s.latency_events / s.latency_rate, 20.0)
        finally:
            await conn.close()
    await cluster.drop(url)
    lat = w.latencies
    progress(f"latency: p50 {percentile(lat, 50) * 1000:.1f} ms, p99 {percentile(lat, 99) * 1000:.1f} ms")
    return [
        Row(
            f"latency {s.latency_events} events",
            None,
            w.load.offered_rate,
            percentile(lat, 50),
            percentile(lat, 99),
            f"CreateEvent return (client time.time) -> resolved_at (db now()), 1 executor; n={len(lat)}, "
            f"unresolved {w.unresolved}, max {max(lat, default=math.nan) * 1000:.1f} ms; raw SQL-only p50/p99 "
            f"{percentile(raw, 50) * 1000:.2f}/{percentile(raw, 99) * 1000:.2f} ms",
        )
    ]
