"""``python -m tools.bench --quick`` runs every scenario end to end and prints a whole table.

It asserts only that the run completes and that the table is well formed: never on time or
rates (this machine is shared and noisy; the figures are for people to read).
"""

from __future__ import annotations

import os
import re
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


def _quick_bench(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--quick", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _check_table(done.stdout)
    return done.stdout


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_quick_bench_prints_a_full_table() -> None:
    _quick_bench({k: v for k, v in os.environ.items() if k != "DATABASE_URL"})


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timescale
@pytest.mark.timeout(240)
def test_quick_bench_on_timescaledb(pg_admin_url: str, timescaledb_license: str) -> None:
    """The same run on the test server when it has TimescaleDB (``TEST_DATABASE_URL``, or the
    testcontainers image): the read scenario then runs on 90 one-day chunks per table,
    compressed by the project's policies where the edition has compression (not 'apache')."""
    out = _quick_bench({**os.environ, "DATABASE_URL": pg_admin_url}, "--store", "timescale")
    footer = re.search(r"event: (\d+) chunks, (\d+) compressed; enforcement: (\d+) chunks, (\d+) compressed", out)
    assert footer is not None, out
    chunks, compressed, enf_chunks, enf_compressed = map(int, footer.groups())
    assert chunks >= 90 and enf_chunks >= 90, out
    if timescaledb_license == "apache":
        assert compressed == 0 and enf_compressed == 0, out
    else:
        assert compressed >= chunks - 9 and enf_compressed >= enf_chunks - 9, out
    assert "TimescaleDB" in out


def _check_table(stdout: str) -> None:
    lines = stdout.splitlines()
    header = [c.strip() for c in lines[0].split(" | ")]
    assert header == list(HEADER)
    rows = [line for line in lines[1:] if " | " in line]
    for line in rows:
        cells = [c.strip() for c in line.split(" | ")]
        assert len(cells) == len(HEADER), line
        assert cells[0] and "FAILED" not in cells[0], line
    names = [line.split(" | ")[0].strip() for line in rows]
    for scenario in SCENARIO_ROWS:
        assert any(n.startswith(scenario) for n in names), f"no {scenario} row in:\n{stdout}"
    assert any(n.startswith("read events") for n in names)
    assert any(n.startswith("read enforcements") for n in names)
