"""Scenario ``compare``: this tree against another one, in the same run, alternating.

``--baseline-dir PATH`` names the other tree: typically a git worktree of an earlier commit
(``git worktree add /tmp/base COMMIT``), to show what a change costs, or that it costs
nothing. Each side has its own database (migrated by its own tree), api and, for the
pipeline row, executor; both run on this virtual environment's packages. Rows:

* CreateEvent at c=16 (2 enforcements per event);
* CreateEvents, 1,000 events per call, 2 calls in flight;
* the pipeline: CreateEvent at c=16 while an executor resolves everything.

The "raw" column is the baseline tree, "ours" this one.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from shared.gen.automation.v1 import event_pb2, event_pb2_grpc

from . import workload
from .fixture import Cluster, channel, services
from .ingest import summary
from .load import alternate, closed_loop
from .report import Row
from .settings import Settings

BASELINE_ENV = "BENCH_BASELINE_DIR"
TRIGGER = "bench.cmp"
RULES = ["bench.cmp_a", "bench.cmp_b"]
CONCURRENCY = 16
BATCH = 1000
REPS = 7


def baseline_dir() -> Path:
    raw = os.environ.get(BASELINE_ENV, "")
    if not raw or not (Path(raw) / "services" / "api").is_dir():
        raise RuntimeError(f"compare needs --baseline-dir (or {BASELINE_ENV}): a tree of this project, got {raw!r}")
    return Path(raw).resolve()


def _create_many(ch: grpc.aio.Channel) -> Callable[[], Awaitable[int]]:
    stub: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
    many = event_pb2.CreateEventsRequest(events=[workload.new_event(TRIGGER)] * BATCH)

    async def call() -> int:
        response = await stub.CreateEvents(many, timeout=60)
        assert len(response.receipts) == BATCH
        return BATCH

    return call


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    base_dir = baseline_dir()
    base_url = await cluster.fresh_database("cmp_base", base_dir)
    ours_url = await cluster.fresh_database("cmp_ours")
    rows: list[Row] = []
    async with services(base_url, base_dir) as base_svc, services(ours_url) as ours_svc:
        base_target, ours_target = await base_svc.start_api(), await ours_svc.start_api()
        async with channel(base_target) as base_ch, channel(ours_target) as ours_ch:
            for ch in (base_ch, ours_ch):
                await workload.define(ch, TRIGGER, RULES)
            base_one, ours_one = workload.create_event(base_ch, TRIGGER), workload.create_event(ours_ch, TRIGGER)
            base_many, ours_many = _create_many(base_ch), _create_many(ours_ch)
            for f in (base_one, ours_one):
                await closed_loop(f, 4, 0.3)

            async def measure(
                label: str,
                base: Callable[[], Awaitable[int]],
                ours: Callable[[], Awaitable[int]],
                concurrency: int,
                items: bool,
            ) -> Row:
                runs = await alternate(f"compare {label}", base, ours, concurrency, max(s.reps, REPS), s.rep_s)
                row, _ = summary(f"this tree vs baseline: {label}", *runs, items=items)
                row.notes += f"; raw = the tree in {base_dir}, same run, reps alternate"
                return row

            rows.append(await measure(f"CreateEvent c={CONCURRENCY}", base_one, ours_one, CONCURRENCY, False))
            rows.append(await measure(f"CreateEvents {BATCH}/call", base_many, ours_many, 2, True))
            await base_svc.start_executors(1)
            await ours_svc.start_executors(1)
            rows.append(await measure(f"pipeline c={CONCURRENCY}", base_one, ours_one, CONCURRENCY, False))
    await cluster.drop(base_url)
    await cluster.drop(ours_url)
    return rows
