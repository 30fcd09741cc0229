"""Batcher: single requests leave at once when a call slot is free, and gather into one call
while the slots are busy; a slow call gives its slot up."""

from __future__ import annotations

import asyncio

import pytest

from shared.batching import Batcher


class Remote:
    """A batch endpoint whose calls return only when the test lets them."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.fail: Exception | None = None
        self._called = asyncio.Event()

    async def send(self, batch: list[int]) -> list[str]:
        self.calls.append(batch)
        self._called.set()
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail is not None:
            raise self.fail
        return [f"ok {i}" for i in batch]

    async def started(self, n: int) -> None:
        """Waits until ``n`` calls were made."""
        while len(self.calls) < n:
            self._called.clear()
            await self._called.wait()


async def test_idle_requests_leave_at_once_each_in_its_own_call() -> None:
    remote = Remote()
    batcher: Batcher[int, str] = Batcher(remote.send, max_calls=2)
    first = asyncio.create_task(batcher.submit(1))
    second = asyncio.create_task(batcher.submit(2))
    await remote.started(2)
    assert remote.calls == [[1], [2]]
    for gate in remote.gates:
        gate.set()
    assert list(await asyncio.gather(first, second)) == ["ok 1", "ok 2"]


async def test_requests_made_while_the_slots_are_busy_leave_together() -> None:
    remote = Remote()
    batcher: Batcher[int, str] = Batcher(remote.send, max_calls=1)
    first = batcher.enqueue(1)
    await remote.started(1)
    rest = [batcher.enqueue(i) for i in (2, 3, 4)]
    assert remote.calls == [[1]]
    remote.gates[0].set()
    await remote.started(2)
    assert remote.calls == [[1], [2, 3, 4]]
    remote.gates[1].set()
    assert await asyncio.gather(first, *rest) == ["ok 1", "ok 2", "ok 3", "ok 4"]


async def test_a_batch_never_exceeds_max_batch() -> None:
    remote = Remote()
    batcher: Batcher[int, str] = Batcher(remote.send, max_batch=2, max_calls=1)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
    await remote.started(1)
    for n in (2, 3):
        remote.gates[n - 2].set()
        await remote.started(n)
    remote.gates[2].set()
    assert await asyncio.gather(*tasks) == [f"ok {i}" for i in range(5)]
    assert remote.calls == [[0], [1, 2], [3, 4]]


async def test_a_failed_call_fails_each_of_its_requests_and_the_next_call_still_goes() -> None:
    remote = Remote()
    remote.fail = ConnectionError("api gone")
    batcher: Batcher[int, str] = Batcher(remote.send, max_calls=1)
    first = batcher.enqueue(1)
    await remote.started(1)
    second = batcher.enqueue(2)  # waits for the busy slot
    remote.gates[0].set()
    with pytest.raises(ConnectionError):
        await first
    await remote.started(2)
    remote.fail = None
    remote.gates[1].set()
    assert await second == "ok 2"


async def test_a_call_slower_than_slow_after_gives_its_slot_up() -> None:
    # Over a slow link a request queued behind a call in flight waited for all of it and then
    # for its own: twice a call's time, which there was more than a caller's deadline.
    remote = Remote()
    batcher: Batcher[int, str] = Batcher(remote.send, max_calls=1, slow_after_s=0.05, most_calls=2)
    first = batcher.enqueue(1)
    await remote.started(1)
    second = batcher.enqueue(2)
    assert remote.calls == [[1]]  # the one slot is taken: it waits
    await remote.started(2)  # until the first call has been in flight for slow_after_s
    assert remote.calls == [[1], [2]]
    for gate in remote.gates:
        gate.set()
    assert [await first, await second] == ["ok 1", "ok 2"]
