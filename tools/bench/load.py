"""Load generators: a closed loop (N callers back to back) and an open loop (a fixed offered rate).

Both are bounded in count and in time. Latencies use ``time.perf_counter``; the open loop also
records the wall-clock time (``time.time``) at which each call returned, which the pipeline
compares with ``resolved_at`` written by PostgreSQL on the same machine clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .report import progress

T = TypeVar("T")


@dataclass
class ClosedResult:
    """Calls completed in a window of ``elapsed`` seconds and each one's latency."""

    count: int
    elapsed: float
    latencies: list[float]
    items: int = 0

    @property
    def rate(self) -> float:
        return self.count / self.elapsed if self.elapsed else 0.0

    @property
    def item_rate(self) -> float:
        return self.items / self.elapsed if self.elapsed else 0.0


async def closed_loop(
    call: Callable[[], Awaitable[int]], concurrency: int, duration: float, max_calls: int = 10_000_000
) -> ClosedResult:
    """``concurrency`` tasks call back to back for ``duration`` seconds; ``call`` returns the
    number of items it handled (1 for a unary call, the batch size for a batch)."""
    latencies: list[float] = []
    items = 0
    count = 0
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal items, count
        while count < max_calls:
            t = time.perf_counter()
            if t >= deadline:
                return
            n = await call()
            latencies.append(time.perf_counter() - t)
            items += n
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ClosedResult(count, time.perf_counter() - start, latencies, items)


@dataclass
class OpenResult(Generic[T]):
    """What an open-loop run offered and got back."""

    target_rate: float
    sent: int
    send_elapsed: float
    results: list[tuple[float, T]] = field(default_factory=list)
    """(wall-clock time the call returned, its result) for each successful call."""
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    saturated: int = 0
    """Calls that had to wait because ``max_outstanding`` calls were already in flight."""

    @property
    def offered_rate(self) -> float:
        return self.sent / self.send_elapsed if self.send_elapsed else 0.0


async def open_loop(
    call: Callable[[int], Awaitable[T]],
    rate: float,
    duration: float,
    max_outstanding: int = 512,
    should_stop: Callable[[OpenResult[T]], bool] | None = None,
) -> OpenResult[T]:
    """Starts call i at ``start + i / rate`` for ``duration`` seconds, never more than
    ``max_outstanding`` at once (beyond that the offered rate falls behind, which the caller
    sees in ``offered_rate``), then waits for the calls in flight. ``should_stop`` is asked,
    with the result so far, before each send."""
    total = max(1, round(rate * duration))
    result: OpenResult[T] = OpenResult(rate, 0, 0.0)
    slots = asyncio.Semaphore(max_outstanding)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        t = time.perf_counter()
        try:
            value = await call(i)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            result.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        else:
            result.latencies.append(time.perf_counter() - t)
            result.results.append((time.time(), value))
        finally:
            slots.release()

    start = time.perf_counter()
    i = 0
    while i < total:
        if should_stop is not None and should_stop(result):
            break
        now = time.perf_counter()
        due = min(total, int((now - start) * rate) + 1)
        if due <= i:
            await asyncio.sleep((i / rate) - (now - start))
            continue
        while i < due:
            if slots.locked():
                result.saturated += 1
            await slots.acquire()
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
    result.sent = i
    # The offered rate is judged over the whole window: sending late stretches it.
    result.send_elapsed = max(time.perf_counter() - start, i / rate)
    if tasks:
        await asyncio.wait(set(tasks), timeout=60)
    return result


async def alternate(
    label: str,
    raw: Callable[[], Awaitable[int]],
    ours: Callable[[], Awaitable[int]],
    concurrency: int,
    reps: int,
    duration: float,
) -> tuple[list[ClosedResult], list[ClosedResult]]:
    """``reps`` closed-loop windows of each side, alternating (raw first), so that the
    machine's drift falls on both: the way two variants are compared in one run."""
    raw_runs: list[ClosedResult] = []
    our_runs: list[ClosedResult] = []
    for rep in range(reps):
        progress(f"{label} rep {rep + 1}/{reps}")
        raw_runs.append(await closed_loop(raw, concurrency, duration))
        our_runs.append(await closed_loop(ours, concurrency, duration))
    return raw_runs, our_runs
