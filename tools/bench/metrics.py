"""Scenario ``metrics``: what Prometheus metrics cost, on vs off, in the same run.

Two identical sides, each its own database (on the same PostgreSQL), api and executor: one
with ``METRICS_ADDR`` unset, one with it set and scraped every second, as Prometheus would.
Repetitions alternate between the sides. Rows:

* ingest: CreateEvent at c=16, no executor attached (the api's own cost per call);
* pipeline: CreateEvent at c=16 while an executor resolves every enforcement (the api's and
  the executor's metrics both recording: RPCs, resolutions, decisions, batches).

The "raw" column is the side with metrics off; the ratio is what metrics cost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx

from tools.postgres import free_port

from . import workload
from .fixture import Cluster, Services, channel, services
from .ingest import summary
from .load import alternate, closed_loop
from .report import Row
from .settings import Settings

TRIGGER = "bench.obs"
RULES = ["bench.obs_a", "bench.obs_b"]
CONCURRENCY = 16
SCRAPE_S = 1.0
REPS = 7
"""At least this many alternating repetitions: a few percent is the difference measured."""


@contextlib.asynccontextmanager
async def _scraping(ports: list[int]) -> AsyncIterator[list[int]]:
    """Scrapes every port's /metrics each SCRAPE_S while the block runs; yields the count."""
    done = [0]

    async def loop() -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                for port in ports:
                    answer = await http.get(f"http://127.0.0.1:{port}/metrics")
                    answer.raise_for_status()
                    done[0] += 1
                await asyncio.sleep(SCRAPE_S)

    task = asyncio.create_task(loop())
    try:
        yield done
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _side(svc: Services, metrics: bool) -> tuple[str, list[int]]:
    ports: list[int] = []
    env: dict[str, str] = {}
    if metrics:
        ports.append(free_port())
        env["METRICS_ADDR"] = f"127.0.0.1:{ports[-1]}"
    return await svc.start_api(None, **env), ports


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    off_url = await cluster.fresh_database("metrics_off")
    on_url = await cluster.fresh_database("metrics_on")
    rows: list[Row] = []
    async with services(off_url) as off_svc, services(on_url) as on_svc:
        off_target, _ = await _side(off_svc, metrics=False)
        on_target, ports = await _side(on_svc, metrics=True)
        async with channel(off_target) as off_ch, channel(on_target) as on_ch, _scraping(ports) as scrapes:
            for ch in (off_ch, on_ch):
                await workload.define(ch, TRIGGER, RULES)
            off_create, on_create = workload.create_event(off_ch, TRIGGER), workload.create_event(on_ch, TRIGGER)
            for f in (off_create, on_create):
                await closed_loop(f, 4, 0.3)

            async def measure(label: str) -> Row:
                runs = await alternate(
                    f"metrics {label} c={CONCURRENCY}", off_create, on_create, CONCURRENCY, max(s.reps, REPS), s.rep_s
                )
                row, _ = summary(f"metrics on: {label} c={CONCURRENCY}", *runs, items=False)
                row.notes += "; raw = the same with metrics off (own database, api and executor), reps alternate"
                return row

            rows.append(await measure("CreateEvent"))
            await off_svc.start_executors(1)
            await on_svc.start_executors(1, METRICS_ADDR=f"127.0.0.1:{free_port()}")
            row = await measure("pipeline (CreateEvent + executor)")
            row.notes += f"; /metrics of the api scraped every {SCRAPE_S:.0f}s ({scrapes[0]} scrapes in all)"
            rows.append(row)
    await cluster.drop(off_url)
    await cluster.drop(on_url)
    return rows
