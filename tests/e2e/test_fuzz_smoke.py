"""``tools.fuzz`` for about 30 seconds: every RPC fuzzed beside ordinary traffic, no violation.

The same engine as ``python -m tools.fuzz``, run in-process on the test's database (the
harness migrates it, which is a no-op, and counts only rows it created). Failing calls are
written under the test's temporary directory, not into tests/fuzz_regressions/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.fuzz import catalog
from tools.fuzz.harness import Settings, run
from tools.fuzz.report import render

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.timeout(300)
async def test_a_short_fuzz_run_breaks_no_invariant(db_url: str, tmp_path: Path) -> None:
    settings = Settings(
        minutes=0.5,
        seed=1,
        database_url=db_url,
        log_dir=tmp_path / "logs",
        regressions_dir=tmp_path / "regressions",
    )
    outcome = await run(settings)
    report = render(outcome)
    assert not outcome.failed, report

    # The run was a real one: every RPC of the contract was called, some of each answered,
    # writes got through, and the ordinary traffic flowed and was resolved.
    stats = outcome.stats
    assert set(stats.calls) == {m.short for m in catalog.methods()}, report
    assert sum(c["OK"] for c in stats.codes.values()) > sum(stats.calls.values()) // 5, report
    assert outcome.ledger_sizes[0] > outcome.traffic.ok > 0, report
    assert outcome.resolved.get("processed", 0) > 0, report
    assert {"scenario", "plausible", "edge", "raw"} <= set(stats.origins), report
