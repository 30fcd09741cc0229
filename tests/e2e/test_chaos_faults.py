"""The chaos harness's newer faults, each in a short run of ``python -m tools.chaos``, with every
check of the harness (nothing acknowledged lost, nothing twice, no execution after a disable,
the backlog drained):

- PostgreSQL crashes and the network faults (blackholes, latency, resets, refusals) on one node;
- failover, switchover, crash and restart of the primary on a Patroni cluster in synchronous
  mode, where nothing acknowledged may be lost;
- failover in asynchronous mode, where the run passes whatever it lost and reports it.

The Patroni runs need Debian's patroni and etcd-server (``.ci/run`` installs them); without them
the harness fails saying so, never skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.chaos_run import first_int, run_chaos

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CLEAN = [
    "duplicates: events per request_id",
    "duplicates: enforcements per (rule, event)",
    "duplicates: executions per enforcement",
    "executions after rule disabled",
    "other violations",
    "enforcements left created",
]


def _all_acknowledged_and_clean(rows: dict[str, str], lossless: bool = True) -> None:
    sent = first_int(rows["events sent (distinct request_id)"])
    assert first_int(rows["events acknowledged (replayed)"]) == sent
    assert first_int(rows["CreateEvents batches among the sends"]) > 0
    for row in CLEAN:
        assert first_int(rows[row]) == 0, f"{row}: {rows[row]}"
    if lossless:
        assert first_int(rows["events stored (unacked but stored)"]) == sent
        for row in ("losses: acked events missing", "losses: acked enforcements missing"):
            assert first_int(rows[row]) == 0, f"{row}: {rows[row]}"
    assert rows["drain time"].endswith(" s")


@pytest.mark.timeout(560)
async def test_crashes_and_network_faults_on_one_node(tmp_path: Path) -> None:
    kinds = "crash_postgres,blackhole_db,blackhole_executor,latency,reset_connections,refuse_connections"
    output, rows, per_kind = await run_chaos(
        tmp_path / "logs", "--minutes", "1.5", "--rate", "25", "--faults", kinds, "--latency-window", "15"
    )
    _all_acknowledged_and_clean(rows)
    for kind in kinds.split(","):
        assert kind in per_kind and int(per_kind[kind][0]) >= 1, f"{kind} never happened:\n{output[-6000:]}"
    assert first_int(rows["connections reset by network faults"]) > 0
    assert first_int(rows["statuses off contract (INTERNAL in api logs)"]) == 0, rows


@pytest.mark.timeout(560)
async def test_failover_switchover_and_crashes_under_synchronous_replication(tmp_path: Path) -> None:
    kinds = "failover,switchover,crash_postgres,restart_postgres"
    output, rows, per_kind = await run_chaos(
        tmp_path / "logs", "--minutes", "1.5", "--rate", "25", "--replication", "sync", "--faults", kinds
    )
    assert "synchronous replication" in rows["database"]
    _all_acknowledged_and_clean(rows)
    for kind in kinds.split(","):
        assert kind in per_kind and int(per_kind[kind][0]) >= 1, f"{kind} never happened:\n{output[-6000:]}"
    assert rows["failover: old primary rejoined after (s)"] != "-"


@pytest.mark.timeout(560)
async def test_failover_under_asynchronous_replication_reports_what_it_lost(tmp_path: Path) -> None:
    output, rows, per_kind = await run_chaos(
        tmp_path / "logs", "--minutes", "1", "--rate", "25", "--replication", "async", "--faults", "failover"
    )
    assert "asynchronous replication" in rows["database"]
    assert "(async: measured)" in output
    # What was lost is a number the run reports, not a failure; nothing else may break.
    first_int(rows["losses: acked events missing (async: measured)"])
    _all_acknowledged_and_clean(rows, lossless=False)
    assert int(per_kind["failover"][0]) >= 1
