"""Targeted wake-ups (enough streams to take the new work, in turn, never a storm) and the
direct hand-off of new enforcements to a stream with free credit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.api.dispatcher import Dispatcher
from services.api.store import Enforcement, Lease

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def test_one_new_enforcement_wakes_one_stream_and_turns_rotate() -> None:
    d = Dispatcher("postgresql://unused")
    a, b, c = d.subscribe(4), d.subscribe(4), d.subscribe(4)
    d.wake(1)
    assert [s.wake.is_set() for s in (a, b, c)] == [True, False, False]
    a.wake.clear()
    d.wake(1)
    assert [s.wake.is_set() for s in (a, b, c)] == [False, True, False]


def test_many_new_enforcements_wake_streams_until_their_credit_covers_them() -> None:
    d = Dispatcher("postgresql://unused")
    a, b, c = d.subscribe(4), d.subscribe(4), d.subscribe(4)
    d.wake(6)
    assert [s.wake.is_set() for s in (a, b, c)] == [True, True, False]


def test_streams_without_free_credit_are_skipped() -> None:
    d = Dispatcher("postgresql://unused")
    full, free = d.subscribe(2), d.subscribe(2)
    full.held.update({1, 2})
    d.wake(1)
    assert (full.wake.is_set(), free.wake.is_set()) == (False, True)


def test_filtered_streams_are_always_woken() -> None:
    d = Dispatcher("postgresql://unused")
    plain, filtered = d.subscribe(4), d.subscribe(4, filtered=True)
    d.wake(1)
    d.wake(1)
    assert plain.wake.is_set() and filtered.wake.is_set()


def test_resolution_wakes_only_a_starved_stream_holding_it() -> None:
    d = Dispatcher("postgresql://unused")
    a, b = d.subscribe(2), d.subscribe(2)
    a.held.update({7, 8})
    a.starved = True
    d.resolved(7)
    assert (a.wake.is_set(), b.wake.is_set(), a.held) == (True, False, {8})


def test_resolution_does_not_wake_a_stream_that_took_all_there_was() -> None:
    # Its last claim found less than its credit: nothing waits, so a claim would find nothing.
    d = Dispatcher("postgresql://unused")
    a = d.subscribe(2)
    a.held.add(7)
    d.resolved(7)
    assert (a.wake.is_set(), a.held) == (False, set())


def test_work_that_finds_no_free_credit_starves_the_full_streams() -> None:
    d = Dispatcher("postgresql://unused")
    a, b = d.subscribe(1), d.subscribe(1)
    a.held.add(1)
    b.held.add(2)
    d.wake(1)
    assert (a.wake.is_set(), b.wake.is_set(), a.starved, b.starved) == (False, False, True, True)
    d.resolved(2)
    assert (a.wake.is_set(), b.wake.is_set()) == (False, True)


# --- direct hand-off ----------------------------------------------------------------------


def _enforcement(id_: int) -> Enforcement:
    return Enforcement(id_, 1, "demo.a", "core.webhook", {}, 10, "created", {}, "all", [], NOW, None)


def test_handoff_reserves_credit_of_one_stream_in_turn_and_delivers_to_it() -> None:
    d = Dispatcher("postgresql://unused")
    a, b = d.subscribe(2, executor_id="x", token="ta"), d.subscribe(2, executor_id="y", token="tb")
    first, second = d.handoff(15.0), d.handoff(15.0)
    assert first.reserve(2) == Lease("x", "ta", 15.0)
    assert (a.free, b.free) == (0, 2)
    assert second.reserve(1) == Lease("y", "tb", 15.0)
    a.look = b.look = False
    assert first.deliver([_enforcement(7), _enforcement(8)]) is None
    assert (a.held, a.reserved, a.free) == ({7, 8}, 0, 0)
    assert [x.enforcement.id for x in a.inbox] == [7, 8]
    assert all(x.attempt == 1 and x.lease_expires_at == NOW + timedelta(seconds=15) for x in a.inbox)
    # Woken to send, not to claim.
    assert (a.wake.is_set(), a.look) == (True, False)


def test_handoff_skips_starved_filtered_and_full_streams() -> None:
    d = Dispatcher("postgresql://unused")
    starved = d.subscribe(4, token="t1")
    starved.starved = True
    d.subscribe(4, filtered=True, token="t2")
    full = d.subscribe(1, token="t3")
    full.held.add(1)
    assert d.handoff(15.0).reserve(1) is None


def test_cancelled_handoff_gives_the_credit_back() -> None:
    d = Dispatcher("postgresql://unused")
    a = d.subscribe(2, token="t")
    h = d.handoff(15.0)
    assert h.reserve(2) is not None
    assert h.reserve(1) is not None  # a retried insert reserves again, not twice
    assert a.free == 1
    h.cancel()
    assert (a.free, h.taken) == (2, False)


def test_handoff_to_a_stream_that_closed_meanwhile_returns_its_token() -> None:
    d = Dispatcher("postgresql://unused")
    a = d.subscribe(2, token="gone")
    h = d.handoff(15.0)
    assert h.reserve(1) is not None
    d.unsubscribe(a)
    assert h.deliver([_enforcement(7)]) == "gone"
    assert a.inbox == []
