"""Gathering single requests into batch calls, without waiting for a batch to fill.

The executor sends its decisions through one (``ResolveEnforcements``); the api stores
concurrent CreateEvent requests through one (one statement for many events).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Req = TypeVar("Req")
Out = TypeVar("Out")


def _cancel_timer(handle: asyncio.TimerHandle, _call: asyncio.Task[None]) -> None:
    handle.cancel()


class Batcher(Generic[Req, Out]):
    """Gathers single requests into batch calls without waiting for a batch to fill.

    A request goes out at once when fewer than ``max_calls`` calls are in flight; otherwise it
    waits for one to return and leaves with everything that gathered meanwhile. Idle, every
    request is its own call (no added latency); under load, calls carry many requests and the
    cost of each call is shared. ``send`` answers one outcome per request, in order; when it
    raises, every request of that call fails with its exception.

    With ``slow_after_s``, a call in flight longer than that stops counting against
    ``max_calls`` (up to ``most_calls`` in flight in all): a call that slow is waiting on the
    network or on a lock, not using the CPU that sharing saves, and a request queued behind
    it would wait for all of it and then for its own call, twice the time of one.
    """

    def __init__(
        self,
        send: Callable[[list[Req]], Awaitable[list[Out]]],
        max_batch: int = 500,
        max_calls: int = 2,
        slow_after_s: float | None = None,
        most_calls: int | None = None,
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_calls = max_calls
        self._slow_after_s = slow_after_s
        self._most_calls = max(most_calls or max_calls, max_calls)
        self._waiting: list[tuple[Req, asyncio.Future[Out]]] = []
        self._calls: set[asyncio.Task[None]] = set()
        self._counted: set[asyncio.Task[None]] = set()
        """The calls in flight that count against ``max_calls``: all but the slow ones."""

    def enqueue(self, request: Req) -> asyncio.Future[Out]:
        """Queues a request (sent now if a call slot is free); the future gets its outcome."""
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        self._start()
        return future

    async def submit(self, request: Req) -> Out:
        return await self.enqueue(request)

    def _start(self) -> None:
        while self._waiting and len(self._counted) < self._max_calls and len(self._calls) < self._most_calls:
            batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
            task = asyncio.create_task(self._call(batch))
            self._calls.add(task)
            self._counted.add(task)
            if self._slow_after_s is not None:
                aged = asyncio.get_running_loop().call_later(self._slow_after_s, self._slow, task)
                task.add_done_callback(functools.partial(_cancel_timer, aged))
            task.add_done_callback(self._done)

    def _slow(self, task: asyncio.Task[None]) -> None:
        self._counted.discard(task)
        self._start()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        self._counted.discard(task)
        self._start()

    async def _call(self, batch: list[tuple[Req, asyncio.Future[Out]]]) -> None:
        try:
            outcomes = await self._send([request for request, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} requests")
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
