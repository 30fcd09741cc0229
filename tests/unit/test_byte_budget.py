"""The request memory budget: holds are granted first come, first served, and always returned."""

from __future__ import annotations

import asyncio

import pytest

from services.api._guard import ByteBudget
from shared.errors import ResourceExhausted


class Holder:
    """A task holding ``n`` bytes of the budget until ``done`` is set."""

    def __init__(self, budget: ByteBudget, n: int, order: list[int], tag: int) -> None:
        self.started = asyncio.Event()
        self.granted = asyncio.Event()
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._run(budget, n, order, tag))

    async def _run(self, budget: ByteBudget, n: int, order: list[int], tag: int) -> None:
        # Set before the hold, which queues without yielding first: once a test sees it, the
        # holder is either granted or in the queue.
        self.started.set()
        async with budget.hold(n):
            order.append(tag)
            self.granted.set()
            await self.done.wait()

    async def finish(self) -> None:
        self.done.set()
        await self.task


async def test_holds_within_the_budget_go_at_once_and_the_rest_wait_in_order() -> None:
    budget = ByteBudget(100)
    order: list[int] = []
    # 60 + 30 fit; 50 must wait, and 10 (which would fit) queues behind it rather than overtaking.
    holders = [Holder(budget, n, order, tag) for tag, n in enumerate((60, 30, 50, 10))]
    await holders[3].started.wait()
    assert order == [0, 1]
    assert budget.waiting == 2
    assert budget.free == 10
    await holders[0].finish()
    await holders[3].granted.wait()
    assert order == [0, 1, 2, 3]
    for h in holders[1:]:
        await h.finish()
    assert budget.free == 100


async def test_a_cancelled_waiter_leaves_the_queue_and_the_next_goes() -> None:
    budget = ByteBudget(100)
    order: list[int] = []
    big = Holder(budget, 90, order, 0)
    await big.granted.wait()
    blocked = Holder(budget, 50, order, 1)
    small = Holder(budget, 40, order, 2)
    await small.started.wait()
    assert budget.waiting == 2
    blocked.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked.task
    await big.finish()
    await small.granted.wait()
    assert order == [0, 2]
    await small.finish()
    assert budget.free == 100


async def test_a_request_larger_than_the_budget_waits_for_all_of_it() -> None:
    budget = ByteBudget(100)
    async with budget.hold(10_000):
        assert budget.free == 0
    assert budget.free == 100


async def test_an_owner_past_its_share_is_refused_and_others_are_not() -> None:
    budget = ByteBudget(100, owner_share=40)
    async with budget.hold(30, "a"):
        budget.check(10, "a")  # exactly at its share
        with pytest.raises(ResourceExhausted, match="its share is 40"):
            budget.check(11, "a")
        budget.check(60, "b")  # another owner has its own share
        async with budget.hold(40, "b"):
            pass
    budget.check(100, "a")  # holding nothing, any call gets in line
    assert budget.free == 100


async def test_empty_requests_of_one_owner_overlap_without_losing_count() -> None:
    budget = ByteBudget(100, owner_share=40)
    first = budget.hold(0, "a")
    second = budget.hold(0, "a")
    await first.__aenter__()
    await second.__aenter__()
    await first.__aexit__(None, None, None)
    await second.__aexit__(None, None, None)
    async with budget.hold(10, "a"), budget.hold(0, "a"):
        budget.check(30, "a")
    assert budget.free == 100
