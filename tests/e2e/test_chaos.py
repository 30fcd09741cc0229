"""The chaos harness, short: about a minute of load under every kind of fault, then the checks.

It runs ``python -m tools.chaos`` as a subprocess, exactly as a person would, on its own
PostgreSQL (the harness restarts the database, so it cannot share the test server).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.chaos_run import first_int, run_chaos

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


@pytest.mark.timeout(420)
async def test_chaos_short_run_keeps_every_invariant(tmp_path: Path) -> None:
    output, rows, _ = await run_chaos(
        tmp_path / "logs", "--minutes", "1", "--rate", "30", "--fault-interval", "5", timeout=400
    )
    missing = [r for r in ROWS if r not in rows]
    assert not missing, f"table lacks {missing}:\n{output[-4000:]}"

    sent = first_int(rows["events sent (distinct request_id)"])
    assert sent == 1800
    assert first_int(rows["events acknowledged (replayed)"]) == sent
    assert first_int(rows["events stored (unacked but stored)"]) == sent
    assert first_int(rows["enforcements left created"]) == 0
    for row in ROWS[5:11]:
        assert first_int(rows[row]) == 0, f"{row}: {rows[row]}"
    # Every kind of fault happened at least twice during the minute.
    for row in ROWS[11:15]:
        assert first_int(rows[row]) >= 2, f"{row}: {rows[row]}"
    assert rows["drain time"].endswith(" s")
