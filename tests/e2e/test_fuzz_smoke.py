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


@pytest.mark.timeout(300)
async def test_many_principals_fuzzing_leave_the_ordinary_sensor_unharmed(db_url: str, tmp_path: Path) -> None:
    """The fuzzer's "many principals" mode: the api authenticates, and the fuzzed calls go under
    ten tokens of every role; the ordinary sensor (a token of its own) is never refused or
    failed, and its enforcements are resolved by the executor (a token of its own too)."""
    settings = Settings(
        minutes=0.3,
        seed=2,
        database_url=db_url,
        log_dir=tmp_path / "logs",
        regressions_dir=tmp_path / "regressions",
        principals=10,
    )
    outcome = await run(settings)
    report = render(outcome)
    assert not outcome.failed, report
    stats = outcome.stats
    # Authentication was on: roles without the right were refused, the others got through.
    assert sum(c["PERMISSION_DENIED"] for c in stats.codes.values()) > 0, report
    assert sum(c["OK"] for c in stats.codes.values()) > 0, report
    assert outcome.traffic.ok == outcome.traffic.sent > 0, report
    assert outcome.resolved.get("processed", 0) > 0, report
