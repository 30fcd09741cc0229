"""``--only replicas``: the read scenario's rate with reads on a streaming standby vs on the
primary, under ingest load, in the same run.

A durable primary of its own (the read scenario's fixture: ``read_events`` events, twice as many
enforcements, 30 days) and a streaming standby of it (``pg_basebackup -R``), both on this
machine. Two api configurations take turns on the same data, A B A B...: *primary* (no
``DATABASE_READ_URL``) and *standby* (``DATABASE_READ_URL`` = the standby). In each window
readers send the read scenario's first pages (every ListEvents / ListEnforcements case) and
GetEvent / GetEnforcement by id, as many as they can, while an ingest load sends CreateEvents
batches (every event fires two rules) at a fixed rate through the same api. The table's raw
column is the primary configuration, ours the standby one: the ratio is what the standby
buys. The notes say the ingest rate each kept, and which server answered the reads (the api's
``automation_db_reads_total``), so that a standby configuration that silently read the primary
cannot pass for one.

Every process (load generator, api, both PostgreSQL servers, WAL replay) shares this
machine's cores: a standby on its own host would add its CPU, which this run cannot show.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from shared.gen.automation.v1 import enforcement_pb2, enforcement_pb2_grpc, event_pb2, event_pb2_grpc
from tools.postgres import LocalPostgres, free_port

from . import read, workload
from .fixture import Cluster, channel, services, with_database
from .report import Row, footer, percentile, progress
from .settings import Settings

READERS = 8
INGEST_BATCH = 50


@dataclass(frozen=True)
class Knobs:
    window_s: float
    rounds: int
    ingest_rate: float
    """Events per second the ingest load sends (in batches of INGEST_BATCH)."""
    warm_s: float
    """An unmeasured window first: each api's connections plan their statements and the
    servers' caches fill, so that neither configuration pays for being first."""


def _knobs(s: Settings) -> Knobs:
    if s.quick:
        return Knobs(window_s=3.0, rounds=1, ingest_rate=200.0, warm_s=1.0)
    return Knobs(window_s=20.0, rounds=2, ingest_rate=1000.0, warm_s=5.0)


async def _scrape(port: int) -> dict[str, float]:
    """The api's ``automation_db_*`` samples, by name and labels as written."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())

    text = await asyncio.to_thread(get)
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(automation_db_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _reads(metrics: dict[str, float], by: str) -> float:
    return metrics.get(f'automation_db_reads_total{{served_by="{by}"}}', 0.0)


@dataclass
class Window:
    reads: int
    seconds: float
    latencies: list[float]
    ingested: int
    replica_share: float


async def _window(target: str, metrics_port: int, shape: read.Shape, k: Knobs) -> Window:
    """Readers as fast as they go and the paced ingest load, for ``k.window_s``."""
    cases = read.list_cases(shape)
    stop = asyncio.Event()
    latencies: list[float] = []
    ingested = 0
    before = await _scrape(metrics_port)
    async with channel(target) as ch:
        events: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
        enfs: enforcement_pb2_grpc.EnforcementServiceAsyncStub = enforcement_pb2_grpc.EnforcementServiceStub(ch)

        def page(case: read.Case) -> Callable[[], Awaitable[Any]]:
            request: Any = read.list_request(case, "")
            if case.kind == "events":
                return lambda: events.ListEvents(request, timeout=30)
            return lambda: enfs.ListEnforcements(request, timeout=30)

        calls = [page(case) for case in cases]
        rng = random.Random(7)

        def by_id() -> Awaitable[Any]:
            i = rng.randrange(1, shape.events)
            if rng.random() < 0.5:
                return events.GetEvent(event_pb2.GetEventRequest(id=i), timeout=30)
            return enfs.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=2 * i), timeout=30)

        # The read scenario's mix: every list case once, and as many Gets by id.
        mix = [c for call in calls for c in (call, by_id)]

        async def reader(n: int) -> None:
            i = n
            while not stop.is_set():
                t = time.perf_counter()
                await mix[i % len(mix)]()
                latencies.append(time.perf_counter() - t)
                i += 1

        async def ingest() -> None:
            nonlocal ingested
            interval = INGEST_BATCH / k.ingest_rate
            batch = event_pb2.CreateEventsRequest(
                events=[workload.new_event(read.TRIGGERS[i % len(read.TRIGGERS)]) for i in range(INGEST_BATCH)]
            )
            due = time.perf_counter()
            while not stop.is_set():
                await events.CreateEvents(batch, timeout=30)
                ingested += INGEST_BATCH
                due += interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, due - time.perf_counter()))

        started = time.perf_counter()
        tasks = [asyncio.create_task(reader(n)) for n in range(READERS)] + [asyncio.create_task(ingest())]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), k.window_s)
        stop.set()
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
    after = await _scrape(metrics_port)
    replica = _reads(after, "replica") - _reads(before, "replica")
    primary = _reads(after, "primary") - _reads(before, "primary")
    share = replica / (replica + primary) if replica + primary else 0.0
    return Window(len(latencies), seconds, latencies, ingested, share)


async def _until_usable(metrics_port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (await _scrape(metrics_port)).get("automation_db_replica_usable") != 1.0:
        if time.monotonic() > deadline:
            raise RuntimeError("the api never judged the standby usable (automation_db_replica_usable)")
        await asyncio.sleep(0.2)  # poll interval of a condition wait


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    k = _knobs(s)
    primary = LocalPostgres(durable=True)
    standby: LocalPostgres | None = None
    await asyncio.to_thread(primary.start)
    try:
        scratch = Cluster(primary.url, store="plain")
        url = await scratch.fresh_database("replicas")
        progress(f"replicas: loading {s.read_events:,} events and {2 * s.read_events:,} enforcements")
        shape = await read.load(url, s.read_events)
        t = time.perf_counter()
        standby = await asyncio.to_thread(primary.standby)
        progress(f"replicas: standby made by pg_basebackup in {time.perf_counter() - t:.0f}s")
        read_url = with_database(standby.url, url.rsplit("/", 1)[1])
        results: dict[str, list[Window]] = {"primary": [], "standby": []}
        for _ in range(k.rounds):
            for config in ("primary", "standby"):
                metrics_port = free_port()
                env = {"METRICS_ADDR": f"127.0.0.1:{metrics_port}", "API_INGEST_RATE": "0"}
                if config == "standby":
                    env["DATABASE_READ_URL"] = read_url
                async with services(url) as svc:
                    target = await svc.start_api(None, **env)
                    if config == "standby":
                        await _until_usable(metrics_port)
                    await _window(target, metrics_port, shape, dataclasses.replace(k, window_s=k.warm_s))
                    w = await _window(target, metrics_port, shape, k)
                results[config].append(w)
                progress(
                    f"replicas: reads on {config}: {w.reads / w.seconds:.0f} calls/s, "
                    f"ingest {w.ingested / w.seconds:.0f} events/s, {w.replica_share:.0%} served by the standby"
                )
        return [_row(results, k)]
    except grpc.aio.AioRpcError as exc:
        raise RuntimeError(f"replicas: a call failed: {exc.code().name}: {exc.details()}") from exc
    finally:
        if standby is not None:
            await asyncio.to_thread(standby.destroy)
        await asyncio.to_thread(primary.destroy)


def _row(results: dict[str, list[Window]], k: Knobs) -> Row:
    def rate(ws: list[Window]) -> float:
        return sum(w.reads for w in ws) / sum(w.seconds for w in ws)

    def ingest(ws: list[Window]) -> float:
        return sum(w.ingested for w in ws) / sum(w.seconds for w in ws)

    on_primary, on_standby = results["primary"], results["standby"]
    lat = [x for w in on_standby for x in w.latencies]
    base = [x for w in on_primary for x in w.latencies]
    share = sum(w.replica_share for w in on_standby) / len(on_standby)
    leak = max(w.replica_share for w in on_primary)
    note = (
        f"read scenario's first pages + Gets by id, {READERS} readers, {k.rounds}x{k.window_s:.0f}s per config, "
        f"alternating; ingest target {k.ingest_rate:.0f} events/s kept {ingest(on_primary):.0f} (primary) / "
        f"{ingest(on_standby):.0f} (standby); standby config: {share:.0%} of reads served by the standby "
        f"(primary config: {leak:.0%}); primary p50/p99 {percentile(base, 50) * 1000:.1f}/"
        f"{percentile(base, 99) * 1000:.1f} ms"
    )
    footer.append(
        f"Read replicas: reads {rate(on_standby):.0f}/s on the standby vs {rate(on_primary):.0f}/s on the primary "
        f"under {k.ingest_rate:.0f} events/s of ingest: x{rate(on_standby) / rate(on_primary):.2f} "
        "(one machine: both servers and the api share its cores)"
    )
    return Row(
        "replicas: reads on standby (raw = on primary), under ingest",
        rate(on_primary),
        rate(on_standby),
        percentile(lat, 50),
        percentile(lat, 99),
        note,
    )
