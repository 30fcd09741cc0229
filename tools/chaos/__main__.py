"""``python -m tools.chaos --minutes N [--rate R] [--seed S]``: exit 0 only if no invariant broke."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

# Forking children while gRPC threads run only makes gRPC log that it skips its fork
# handlers; the children exec at once, so the handlers are not needed.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from tools.chaos.harness import run  # after the gRPC environment is set
from tools.chaos.settings import ALL_KINDS, FAULT_KINDS, REPLICATED_KINDS, REPLICATION, Settings


def parse(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m tools.chaos",
        description="Runs the pipeline (2 apis, 3 executors, PostgreSQL) under load while killing, restarting "
        "and stalling its parts, then checks in SQL that nothing was lost or done twice.",
    )
    p.add_argument("--minutes", type=float, default=1.0, help="how long the load runs (default 1)")
    p.add_argument("--rate", type=float, default=40.0, help="events per second (default 40)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the event mix")
    p.add_argument("--fault-interval", type=float, default=0.0, help="seconds between faults (default: ~11)")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds the backlog may take to drain")
    p.add_argument("--strict", action="store_true", help="also fail on INTERNAL/UNKNOWN answers")
    p.add_argument("--log-dir", type=Path, default=None, help="where the children's logs go (default: a temp dir)")
    p.add_argument(
        "--replication",
        choices=REPLICATION,
        default="none",
        help="none: one PostgreSQL (default); sync/async: a Patroni cluster of two nodes (needs patroni, etcd)",
    )
    p.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated fault kinds, or 'all' (every kind the database allows); of: {', '.join(ALL_KINDS)}. "
        f"Default: {','.join(FAULT_KINDS)}",
    )
    p.add_argument("--latency-window", type=float, default=60.0, help="seconds a latency fault lasts (default 60)")
    ns = p.parse_args(argv)
    if ns.minutes <= 0 or ns.rate <= 0:
        p.error("--minutes and --rate must be positive")
    if ns.faults == "all":
        faults = tuple(k for k in ALL_KINDS if ns.replication != "none" or k not in REPLICATED_KINDS)
    else:
        faults = tuple(k.strip() for k in ns.faults.split(",") if k.strip())
        unknown = [k for k in faults if k not in ALL_KINDS]
        if unknown or not faults:
            p.error(f"--faults: unknown kind(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(ALL_KINDS)}")
    return Settings(
        minutes=ns.minutes,
        rate=ns.rate,
        seed=ns.seed,
        log_dir=ns.log_dir or Path(tempfile.mkdtemp(prefix="chaos-")),
        database_url=os.environ.get("DATABASE_URL") or None,
        fault_interval_s=ns.fault_interval,
        drain_timeout_s=ns.drain_timeout,
        strict=ns.strict,
        faults=faults,
        replication=ns.replication,
        latency_window_s=ns.latency_window,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s chaos: %(message)s", stream=sys.stderr)
    # Each proxy's mode changes: the network module says it once for all of them.
    logging.getLogger("chaos.proxy").setLevel(logging.WARNING)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(run(settings))
    return uvloop.run(run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
