"""Targeted wake-ups: enough streams to take the new work, in turn, never a storm."""

from __future__ import annotations

from services.api.dispatcher import Dispatcher


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
