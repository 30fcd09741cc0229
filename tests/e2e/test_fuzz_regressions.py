"""Replays tests/fuzz_regressions/*.json and the built-in known-nasty requests against a real
api and executor, and checks each answer as the fuzzer does.

Each recorded file is one request that once broke an invariant (see the directory's
README). The built-in list (``tools.fuzz.known``) runs too, so the test means something
when no file is present: a 32-deep payload that a rule copies into its config, a
5,000-character source_ref, NUL in references, NaN in a payload, a page token fed to other
lists, near-miss references, unknown enum numbers, batches just over the limit, and corrupt
bytes sent to every method.
"""

from __future__ import annotations

import pytest

from shared.gen.automation.v1 import enforcement_pb2, enforcement_pb2_grpc
from tests.e2e.conftest import Cluster
from tools.fuzz import catalog
from tools.fuzz.invariants import REGRESSIONS_DIR, Recorder, tracebacks
from tools.fuzz.known import KNOWN, load_recorded, replay_recorded
from tools.fuzz.runner import Engine, wait_until

pytestmark = [pytest.mark.e2e]


def test_recorded_files_name_methods_of_the_contract() -> None:
    paths = {m.path for m in catalog.methods()}
    stale = [r.path.name for r in load_recorded(REGRESSIONS_DIR) if r.method not in paths]
    assert not stale, f"these files name methods that no longer exist (delete them): {stale}"
    assert (REGRESSIONS_DIR / "README.md").exists()


@pytest.mark.timeout(240)
async def test_recorded_and_known_nasty_requests_are_answered_within_the_contract(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the api does with what it is sent, on every method: without credentials, so that
    # no call stops at the door (the children inherit the variable; an api without
    # authentication ignores it).
    monkeypatch.setenv("API_INSECURE", "true")
    await cluster.start_api()
    executor = await cluster.start_executor("fuzz-replay")
    recorder = Recorder(directory=None)
    engine = Engine(cluster.target, recorder=recorder)
    pending = -1
    try:
        for case in KNOWN.values():
            await case(engine)
        paths = {m.path for m in catalog.methods()}
        for recorded in load_recorded(REGRESSIONS_DIR):
            if recorded.method in paths:
                await replay_recorded(engine, recorded)

        # Whatever the replays created must reach the executor and be resolved by it.
        state = enforcement_pb2_grpc.EnforcementServiceStub(engine.channel)

        async def settled() -> bool:
            nonlocal pending
            answer = await state.GetDispatchState(enforcement_pb2.GetDispatchStateRequest(), timeout=10)
            pending = answer.pending
            return pending == 0 or executor.returncode is not None

        await wait_until(settled, 30)
    finally:
        await engine.close()

    assert not engine.stats.fuzzer_errors, engine.stats.fuzzer_errors
    # The replays went deep: events were stored and matched, so the executor had work.
    assert engine.ledger.events and engine.ledger.enforcements
    assert not recorder.violations, "calls off the contract:\n" + "\n".join(
        v.line() for v in recorder.violations.values()
    )
    assert executor.returncode is None, f"the executor exited ({executor.returncode}):\n{cluster.logs()}"
    assert pending == 0, f"{pending} enforcement(s) never resolved:\n{cluster.logs()}"
    found = tracebacks(sorted(cluster.log_dir.glob("*.log")))
    assert not found, f"tracebacks in the logs: {dict(found)}\n{cluster.logs()}"
