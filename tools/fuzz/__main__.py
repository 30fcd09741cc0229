"""``python -m tools.fuzz [--minutes N] [--seed S] [--max-rss-mb M] [--database-url URL] [--keep-logs]
[--principals N]``.

Exits 0 only if no invariant broke.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from tools.fuzz.harness import Settings, run
from tools.fuzz.invariants import REGRESSIONS_DIR
from tools.fuzz.report import render


def parse(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m tools.fuzz",
        description="Fuzzes every RPC (hypothesis) against a real api and executor beside ordinary traffic, "
        "then checks statuses, processes, logs, memory and the database.",
    )
    p.add_argument("--minutes", type=float, default=1.0, help="how long to fuzz (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated requests (default 0)")
    p.add_argument("--max-rss-mb", type=float, default=1024.0, help="peak RSS allowed per process (default 1024)")
    p.add_argument(
        "--database-url",
        default=None,
        help="a migrated (or empty) database to use; default: a throwaway PostgreSQL of its own. "
        "Rows already there are left alone and not counted",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the children's logs even when the run passes")
    p.add_argument("--log-dir", type=Path, default=None, help="where the logs go (default: a temp dir)")
    p.add_argument(
        "--regressions-dir",
        type=Path,
        default=REGRESSIONS_DIR,
        help=f"where failing calls are written (default {REGRESSIONS_DIR})",
    )
    p.add_argument("--no-regressions", action="store_true", help="write no regression files")
    p.add_argument("--workers", type=int, default=4, help="concurrent fuzz calls (default 4)")
    p.add_argument("--rate", type=float, default=20.0, help="ordinary CreateEvent calls per second (default 20)")
    p.add_argument(
        "--code-dir",
        type=Path,
        default=None,
        help="run the api and executor from this tree (e.g. `git archive` of another commit) instead of a "
        "snapshot of the working tree",
    )
    p.add_argument(
        "--principals",
        type=int,
        default=0,
        help="many principals: the api authenticates and the fuzzed calls go under N tokens of every role, "
        "beside the ordinary traffic's own (which must stay unharmed); default 0, no authentication",
    )
    ns = p.parse_args(argv)
    if ns.minutes <= 0 or ns.workers <= 0 or ns.rate <= 0 or ns.principals < 0:
        p.error("--minutes, --workers and --rate must be positive, --principals at least 0")
    return Settings(
        minutes=ns.minutes,
        seed=ns.seed,
        max_rss_mb=ns.max_rss_mb,
        database_url=ns.database_url,
        keep_logs=ns.keep_logs,
        log_dir=ns.log_dir,
        regressions_dir=None if ns.no_regressions else ns.regressions_dir,
        workers=ns.workers,
        rate=ns.rate,
        code_dir=ns.code_dir.resolve() if ns.code_dir else None,
        principals=ns.principals,
    )


async def _main(settings: Settings) -> int:
    outcome = await run(settings)
    print(render(outcome), flush=True)
    return 1 if outcome.failed else 0


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fuzz: %(message)s", stream=sys.stderr)
    return asyncio.run(_main(settings))


if __name__ == "__main__":
    raise SystemExit(main())
