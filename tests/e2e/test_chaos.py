"""The chaos harness, short: about a minute of load under every kind of fault, then the checks.

It runs ``python -m tools.chaos`` as a subprocess, exactly as a person would, on its own
PostgreSQL (the harness restarts the database, so it cannot share the test server).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    "events sent (distinct request_id)",
    "events acknowledged (replayed)",
    "events stored (unacked but stored)",
    "enforcements resolved",
    "enforcements left created",
    "duplicates: events per request_id",
    "duplicates: enforcements per (rule, event)",
    "duplicates: executions per enforcement",
    "losses: acked events missing",
    "losses: acked enforcements missing",
    "executions after rule disabled",
    "faults: kill -9 executor",
    "faults: restart api (of which kill -9)",
    "faults: restart PostgreSQL (fast)",
    "faults: stall executor (SIGSTOP 4s)",
    "drain time",
    "redelivery after kill -9",
]


def _table(output: str) -> dict[str, str]:
    rows = {}
    for line in output.splitlines():
        m = re.match(r"^\| (.+?) +\| (.*)$", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    return rows


def _first_int(value: str) -> int:
    m = re.match(r"\d+", value)
    assert m, f"no number in {value!r}"
    return int(m.group())


@pytest.mark.timeout(420)
async def test_chaos_short_run_keeps_every_invariant(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.chaos",
        "--minutes",
        "1",
        "--rate",
        "30",
        "--fault-interval",
        "5",
        "--log-dir",
        str(tmp_path / "logs"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 400)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = out.decode(errors="replace")
    assert proc.returncode == 0, output[-6000:]
    assert "RESULT: PASS" in output
    rows = _table(output)
    missing = [r for r in ROWS if r not in rows]
    assert not missing, f"table lacks {missing}:\n{output[-4000:]}"

    sent = _first_int(rows["events sent (distinct request_id)"])
    assert sent == 1800
    assert _first_int(rows["events acknowledged (replayed)"]) == sent
    assert _first_int(rows["events stored (unacked but stored)"]) == sent
    assert _first_int(rows["enforcements left created"]) == 0
    for row in ROWS[5:11]:
        assert _first_int(rows[row]) == 0, f"{row}: {rows[row]}"
    # Every kind of fault happened at least twice during the minute.
    for row in ROWS[11:15]:
        assert _first_int(rows[row]) >= 2, f"{row}: {rows[row]}"
    assert rows["drain time"].endswith(" s")
