"""``python -m tools.bench --quick --only capacity`` measures what it says, on a real server.

Asserts that every phase ran and that each cost lands where it belongs: CPU of the api in the
api's phases, CPU of the executor only where one runs, CPU of
PostgreSQL read from /proc (the bench's server runs here), WAL written by every phase. Never a
figure's size: the machine is shared and noisy; the figures are for people to read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = [
    "phase",
    "item",
    "items",
    "rate",
    "api CPU",
    "executor CPU",
    "PostgreSQL CPU",
    "load generator CPU",
    "WAL bytes",
    "WAL records",
    "full-page images",
    "WAL syncs",
    "commits",
]


def number(cell: str) -> float:
    return float(cell.replace(",", "").removesuffix("/s"))


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_quick_capacity_run_attributes_every_cost() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--quick", "--only", "capacity"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    start = lines.index("| " + " | ".join(COLUMNS) + " |")
    phases = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(COLUMNS), line
        phases[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    assert len(phases) == 9, done.stdout
    for name, row in phases.items():
        assert number(row["items"]) > 0 and number(row["rate"]) > 0, name
        assert number(row["WAL bytes"]) > 0 and number(row["WAL records"]) > 0, name
        assert row["PostgreSQL CPU"] != "-" and number(row["PostgreSQL CPU"]) > 0, name
        if not name.startswith("raw "):  # beside the raw SQL the api only idles
            assert number(row["api CPU"]) > 0, name
        executor = name.startswith(("resolve", "pipeline"))
        assert (number(row["executor CPU"]) > 0) is executor, name
    assert "the api uses" in done.stdout
