"""``python -m tools.bench --quick`` runs every scenario end to end and prints a whole table.

It asserts only that the run completes and that the table is well formed: never on time or
rates (this machine is shared and noisy; the figures are for people to read).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench.report import HEADER

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_ROWS = (
    "ingest-unary",
    "ingest-batch",
    "rules: unary",
    "rules: batch",
    "pipeline",
    "read",
    "memory api",
    "memory executor",
    "latency",
)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_quick_bench_prints_a_full_table() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = [c.strip() for c in lines[0].split(" | ")]
    assert header == list(HEADER)
    rows = [line for line in lines[1:] if " | " in line]
    for line in rows:
        cells = [c.strip() for c in line.split(" | ")]
        assert len(cells) == len(HEADER), line
        assert cells[0] and "FAILED" not in cells[0], line
    names = [line.split(" | ")[0].strip() for line in rows]
    for scenario in SCENARIO_ROWS:
        assert any(n.startswith(scenario) for n in names), f"no {scenario} row in:\n{done.stdout}"
    assert any(n.startswith("read events") for n in names)
    assert any(n.startswith("read enforcements") for n in names)
