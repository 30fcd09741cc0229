"""Fairness between sensors: one sensor's CreateEvent latency alone and beside another sensor
flooding CreateEvents, with the api's per-principal budgets off (the old behaviour: one pool,
first come first served) and on (the defaults: services/api/budgets.py).

The flood is hostile: FLOOD_TASKS loops of FLOOD_BATCH-event CreateEvents calls, each sent
again at once whatever the answer (it ignores RetryInfo). The calm sensor sends one event at
a time, back to back. Rows: ``raw rate`` is the calm sensor alone, ``our rate`` beside the
flood; p50/p99 are beside the flood; the notes give the calm sensor's p50/p99 alone and what
the flood got stored and refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc

from services.api.auth import new_token
from services.api.store import Store, create_pool
from shared.config import ClientSecurity
from shared.gen.automation.v1 import event_pb2, event_pb2_grpc
from shared.transport import open_channel

from . import workload
from .fixture import Cluster, services
from .load import ClosedResult, closed_loop
from .report import Row, percentile, progress
from .settings import Settings

TRIGGER = "bench.fair"
RULES = ["bench.fair_a"]
FLOOD_TASKS = 8
FLOOD_BATCH = 500
BUDGETS_OFF = {
    "API_INGEST_RATE": "0",
    "API_PRINCIPAL_CALLS": "100000",
    "API_PRINCIPAL_STREAMS": "100000",
    "API_MAX_CALLS": "100000",
    "API_RESERVED_CALLS": "0",
    "API_PRINCIPAL_MEMORY_FRACTION": "1",
}


async def _tokens(url: str) -> dict[str, str]:
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        out = {}
        for name, role in (("operator", "operator"), ("calm", "sensor"), ("flood", "sensor")):
            token, digest = new_token()
            await Store(pool).tokens.create(f"bench-fair-{name}", [role], digest, None)
            out[name] = token
        return out
    finally:
        await pool.close()


class Flood:
    """The flooding sensor's loops, run until stopped; counts what was stored and refused."""

    def __init__(self, stub: event_pb2_grpc.EventServiceAsyncStub) -> None:
        self.stub = stub
        self.stored = 0
        self.refused = 0
        self.started = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.request = event_pb2.CreateEventsRequest(events=[workload.new_event(TRIGGER) for _ in range(FLOOD_BATCH)])

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                response = await self.stub.CreateEvents(self.request, timeout=30)
                self.stored += len(response.receipts)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                self.refused += 1

    async def __aenter__(self) -> Flood:
        self.started = time.perf_counter()
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(FLOOD_TASKS)]
        await asyncio.sleep(1.0)  # let the flood reach its pace before the calm sensor is measured
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def rate(self) -> float:
        return self.stored / (time.perf_counter() - self.started)


async def _measure(url: str, s: Settings, tokens: dict[str, str], budgets: str) -> Row:
    env = {"API_INSECURE": "false", **(BUDGETS_OFF if budgets == "off" else {})}
    async with services(url) as svc:
        target = await svc.start_api(None, **env)
        async with (
            open_channel(target, ClientSecurity(token=tokens["operator"])) as admin,
            open_channel(target, ClientSecurity(token=tokens["calm"])) as calm_ch,
            open_channel(target, ClientSecurity(token=tokens["flood"])) as flood_ch,
        ):
            if budgets == "off":
                await workload.define(admin, TRIGGER, RULES)
            calm: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(calm_ch)
            request = event_pb2.CreateEventRequest(event=workload.new_event(TRIGGER))

            async def one() -> int:
                await calm.CreateEvent(request, timeout=30)
                return 1

            await closed_loop(one, 1, 0.5)  # warm up
            duration = max(s.rep_s * 2, 2.0)
            progress(f"fairness: calm sensor alone, budgets {budgets}")
            alone: ClosedResult = await closed_loop(one, 1, duration)
            progress(f"fairness: calm sensor beside a flood, budgets {budgets}")
            async with Flood(event_pb2_grpc.EventServiceStub(flood_ch)) as flood:
                beside = await closed_loop(one, 1, duration)
                flood_rate, refused = flood.rate, flood.refused
    return Row(
        f"fairness: calm sensor beside a flooding one, budgets {budgets}",
        alone.rate,
        beside.rate,
        percentile(beside.latencies, 50),
        percentile(beside.latencies, 99),
        f"raw = the calm sensor alone (p50/p99 {percentile(alone.latencies, 50) * 1000:.2f}/"
        f"{percentile(alone.latencies, 99) * 1000:.2f} ms), ours = beside {FLOOD_TASKS} loops of "
        f"{FLOOD_BATCH}-event CreateEvents that ignore RetryInfo; the flood stored {flood_rate:,.0f} events/s, "
        f"{refused} of its calls refused",
    )


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url = await cluster.fresh_database("fairness")
    tokens = await _tokens(url)
    rows = [await _measure(url, s, tokens, "off"), await _measure(url, s, tokens, "on")]
    await cluster.drop(url)
    return rows
