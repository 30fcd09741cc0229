"""``python -m tools.bench [--quick] [--store plain|timescale] [--only SCENARIO ...] [--memory-minutes N]``:
runs the benchmark scenarios and prints one table on stdout (progress goes to stderr)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable

from shared.runtime import run as run_loop

from . import (
    backlog,
    capacity,
    compare,
    console,
    fairness,
    ingest,
    latency,
    metrics,
    pipeline,
    read,
    replicas,
    rules,
    schemas,
    security,
    settings,
    traces,
    webhooks,
)
from .fixture import STORES, Cluster, StoreUnavailable
from .report import Row, footer, progress, table

Scenario = Callable[[Cluster, settings.Settings], Awaitable[list[Row]]]
SCENARIOS: dict[str, Scenario] = {
    "ingest": ingest.run,
    "rules": rules.run,
    "pipeline": pipeline.run,  # also the memory rows (scenario 5)
    "read": read.run,
    "latency": latency.run,
    # Not in the default run: --only backlog (an executor working through 90 days of pending
    # enforcements, most in compressed chunks on TimescaleDB, beside CreateEvent load).
    "backlog": backlog.run,
    # Not in the default run (it would take it past 15 minutes): --only security.
    "security": security.run,
    # Not in the default run either: --only webhooks (HTTP deliveries next to CreateEvent).
    "webhooks": webhooks.run,
    # And: --only metrics (CreateEvent and the pipeline with Prometheus metrics on vs off).
    "metrics": metrics.run,
    # And: --only tracing (CreateEvent and the pipeline with OpenTelemetry traces on vs off).
    "tracing": traces.run,
    # And: --only fairness (one sensor's latency alone and beside a flooding one, budgets off and on).
    "fairness": fairness.run,
    # And: --only schemas (ingest with a 40-property trigger schema enforced vs none).
    "schemas": schemas.run,
    # And: --only console (the console's pages, p50/p95/p99 as a person loads them).
    "console": console.run,
    # And: --only compare --baseline-dir PATH (this tree against another, same run).
    "compare": compare.run,
    # And: --only replicas (the read scenario's rate with reads on a streaming standby vs on the
    # primary, under ingest load).
    "replicas": replicas.run,
    # And: --only capacity (CPU and WAL per event and per enforcement: the capacity model's inputs).
    "capacity": capacity.run,
}
DEFAULT = ["ingest", "rules", "pipeline", "read", "latency"]


async def main(s: settings.Settings, only: list[str], store: str = "plain") -> int:
    started = time.perf_counter()
    try:
        cluster = await Cluster.start(store)
    except StoreUnavailable as exc:
        progress(f"cannot run on {store}: {exc}")
        return 2
    rows: list[Row] = []
    failed: list[str] = []
    try:
        about = await cluster.describe()
        progress(about)
        for name in only:
            t = time.perf_counter()
            progress(f"== {name}")
            try:
                rows += await SCENARIOS[name](cluster, s)
            except Exception as exc:  # noqa: BLE001 - one failed scenario must not hide the others
                progress(f"{name} FAILED: {type(exc).__name__}: {exc}")
                failed.append(name)
                rows.append(Row(f"{name} FAILED", notes=f"{type(exc).__name__}: {exc}"[:300]))
            progress(f"== {name} took {time.perf_counter() - t:.0f}s")
    finally:
        await cluster.close()
    print(table(rows))
    for line in footer:
        print(f"\n{line}")
    print(
        f"\n{about}; {'quick' if s.quick else 'full'} run in {time.perf_counter() - started:.0f}s. "
        "Load generator, api, executors and PostgreSQL share this machine's CPUs."
    )
    return 1 if failed else 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: every scenario tiny")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only this (repeatable)")
    parser.add_argument(
        "--memory-minutes",
        type=float,
        default=2.0,
        help="length of the constant-rate memory soak (default 2, to keep the full run under 15 "
        "minutes; the issue's flatness check is --only pipeline --memory-minutes 10)",
    )
    parser.add_argument(
        "--store",
        choices=STORES,
        default="plain",
        help="plain PostgreSQL (default) or TimescaleDB: a local server with the extension "
        "preloaded (kept under BENCH_CACHE_DIR with its 90-day fixture), or DATABASE_URL",
    )
    parser.add_argument(
        "--baseline-dir",
        help="for --only compare: the other tree (e.g. a git worktree of an earlier commit) to measure against",
    )
    ns = parser.parse_args(argv)
    if ns.baseline_dir:
        os.environ[compare.BASELINE_ENV] = ns.baseline_dir
    s = settings.quick() if ns.quick else settings.full(ns.memory_minutes)
    only = ns.only or DEFAULT
    return run_loop(main(s, only, ns.store))


if __name__ == "__main__":
    sys.exit(cli())
