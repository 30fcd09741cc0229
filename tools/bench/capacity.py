"""``--only capacity``: what one event and one enforcement cost, in CPU seconds and WAL bytes.

The inputs of the README's capacity model. Each phase runs a steady load for a fixed window
and reads, before and after it, the CPU time (user + system, from /proc) of the api, of the
executor, of every PostgreSQL process (the postmaster's own and its reaped children's times
plus each live child's: a backend that exits in the window is still counted) and of this load
generator, the WAL position (``pg_wal_lsn_diff`` of ``pg_current_wal_lsn``), and PostgreSQL's
WAL statistics (``pg_stat_wal``: records, full-page images, syncs) and commits. Each cost is
divided by the items of the phase: events for ingest, enforcements for resolutions.

Phases, on one fresh database, one api, executor stopped unless said:

- ``raw insert``: the baseline, SQL alone: one statement inserting an event and its enforcement
  (the ingest scenario's), 16 connections, NOTIFY triggers off as in the api's sessions;
- ``raw resolve``: the conditional update + execution insert of each of those enforcements;
- ``CreateEvent c=16``, against a trigger with no rule (an event alone) and with one rule (an
  event and its enforcement): the difference is what an enforcement adds to ingest;
- ``resolve (executor drains)``: an executor started on the pending enforcements of the previous
  phase (claims, ``ResolveEnforcements`` batches): per enforcement resolved;
- ``pipeline``: CreateEvent at a fixed offered rate (40 % of the unary rate) with the executor
  running (hand-off), until the last enforcement is resolved: per event, end to end;
- ``raw COPY``: the baseline of a batch, the ingest scenario's: ids from the sequence, then the
  events and their enforcements by ``copy_records_to_table``, 1,000 per transaction;
- ``CreateEvents 1000/call``, without and with the rule.

PostgreSQL's statistics are flushed by each backend about once a second, and by an idle one
only after several seconds: each phase ends with a quiet pause (``settle_s``) before they are
read, and the CPU and WAL position are read when the load stops. PostgreSQL's CPU is read
only when the server runs on this machine (the parent of our backend works in the server's
data directory); otherwise those cells say ``-``. The executor's own start (imports, channel)
is measured apart and taken off the resolutions' CPU. One window per phase: the figures are costs, steadier than
rates on a shared machine, but still single measurements.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from shared.gen.automation.v1 import event_pb2, event_pb2_grpc

from . import workload
from .fixture import Cluster, Services, channel, services
from .ingest import ENFORCEMENT_COLUMNS, EVENT_COLUMNS
from .load import closed_loop, open_loop
from .report import Row, footer, median, percentile, progress
from .settings import Settings

BARE = "cap.bare"
"""A trigger no rule watches: its events are stored alone."""
ONE = "cap.one"
ONE_RULE = "cap.one_r"
RAW = "cap.raw"
RAW_RULE = "cap.raw_r"
UNARY_CONCURRENCY = 16
BATCH_CONCURRENCY = 2
PIPELINE_LOAD = 0.4
"""The pipeline phase's offered rate, as a fraction of the measured unary rate: a steady state
the executor keeps up with, so that work is handed off rather than claimed from a backlog."""
TICK = os.sysconf("SC_CLK_TCK")


def settle_s(s: Settings) -> float:
    return 1.5 if s.quick else 11.0


def window_s(s: Settings) -> float:
    return 2 * s.rep_s


# ---- CPU from /proc -----------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 onwards), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_s(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of ``pid`` (with ``children``: plus those of its reaped children)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 of the file, 12-15 of what follows the name.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def postgres_cpu_s(postmaster: int) -> float:
    """Every PostgreSQL process of the server: the postmaster with its reaped children, and each
    live child (backends, the WAL writer, the checkpointer, autovacuum)."""
    total = cpu_s(postmaster, children=True)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields is not None and int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


async def find_postmaster(url: str) -> int | None:
    """The postmaster's pid when the server runs on this machine: the parent of one of its
    backends, as /proc shows it; None for a server elsewhere (a container, another host)."""
    conn = await asyncpg.connect(url)
    try:
        # Read while the backend lives: it exits with the connection.
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        datadir = str(await conn.fetchval("SELECT current_setting('data_directory')"))
        fields = _stat(backend)
    finally:
        await conn.close()
    if fields is None:
        return None
    postmaster = int(fields[1])
    # A server in a container has its own pids: the same number here may be anything, another
    # PostgreSQL included. Ours works in its data directory.
    try:
        here = os.path.realpath(os.readlink(f"/proc/{postmaster}/cwd"))
    except OSError:
        return None
    return postmaster if here == os.path.realpath(datadir) else None


# ---- snapshots ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    api: float
    executor: float
    client: float
    postgres: float | None
    lsn: int
    """asyncpg reads a pg_lsn as its integer position."""


@dataclass(frozen=True)
class WalStats:
    records: int
    fpi: int
    syncs: int
    commits: int


@dataclass
class Cost:
    """One phase's costs per item (seconds of CPU, bytes of WAL)."""

    phase: str
    unit: str
    items: int
    elapsed: float
    api: float
    executor: float
    client: float
    postgres: float | None
    wal_bytes: float
    wal_records: float
    wal_fpi: float
    wal_syncs: float
    commits: float
    p50: float | None = None
    p99: float | None = None

    @property
    def rate(self) -> float:
        return self.items / self.elapsed if self.elapsed else 0.0


class Meter:
    """Reads the counters of the processes and the server around each phase."""

    def __init__(self, conn: asyncpg.Connection, svc: Services, postmaster: int | None) -> None:
        self.conn = conn
        self.svc = svc
        self.postmaster = postmaster
        self.costs: list[Cost] = []
        self.idle: list[float] = []
        """The api's CPU seconds per second at rest (its loops: maintenance, polls, health)."""
        self.idle_postgres: list[float] = []

    async def snapshot(self) -> Snapshot:
        api = self.svc.api.pid if self.svc.api is not None else 0
        times = os.times()
        return Snapshot(
            api=cpu_s(api) if api else 0.0,
            executor=sum(cpu_s(p.pid) for p in self.svc.executors),
            client=times.user + times.system,
            postgres=postgres_cpu_s(self.postmaster) if self.postmaster else None,
            lsn=int(await self.conn.fetchval("SELECT pg_current_wal_lsn()")),
        )

    async def wal(self) -> WalStats:
        row = await self.conn.fetchrow(
            "SELECT w.wal_records, w.wal_fpi, w.wal_sync, d.xact_commit"
            "  FROM pg_stat_wal w, pg_stat_database d WHERE d.datname = current_database()"
        )
        assert row is not None
        # A new snapshot of the statistics, not the one this transaction saw first.
        await self.conn.execute("SELECT pg_stat_clear_snapshot()")
        return WalStats(int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    async def measure(
        self,
        phase: str,
        unit: str,
        load: Callable[[], Awaitable[tuple[int, list[float]]]],
        settle: float,
    ) -> Cost:
        """Runs ``load`` (which returns its items and latencies) between two snapshots; the
        statistics are read again after ``settle`` quiet seconds."""
        wal0 = await self.wal()
        before = await self.snapshot()
        start = time.perf_counter()
        items, latencies = await load()
        elapsed = time.perf_counter() - start
        after = await self.snapshot()
        wal_bytes = float(await self.conn.fetchval("SELECT pg_wal_lsn_diff($1, $2)", after.lsn, before.lsn))
        await asyncio.sleep(settle)  # statistics of idle backends are flushed late; nothing waits on it
        wal1 = await self.wal()
        rest = await self.snapshot()
        self.idle.append((rest.api - after.api) / settle)
        if rest.postgres is not None and after.postgres is not None:
            self.idle_postgres.append((rest.postgres - after.postgres) / settle)
        n = max(items, 1)
        pg = None if before.postgres is None or after.postgres is None else (after.postgres - before.postgres) / n
        cost = Cost(
            phase=phase,
            unit=unit,
            items=items,
            elapsed=elapsed,
            api=(after.api - before.api) / n,
            executor=(after.executor - before.executor) / n,
            client=(after.client - before.client) / n,
            postgres=pg,
            wal_bytes=wal_bytes / n,
            wal_records=(wal1.records - wal0.records) / n,
            wal_fpi=(wal1.fpi - wal0.fpi) / n,
            wal_syncs=(wal1.syncs - wal0.syncs) / n,
            commits=(wal1.commits - wal0.commits) / n,
            p50=percentile(latencies, 50) if latencies else None,
            p99=percentile(latencies, 99) if latencies else None,
        )
        self.costs.append(cost)
        progress(
            f"capacity {phase}: {items:,} {unit}s in {elapsed:.1f}s; per {unit}: api {cost.api * 1e3:.3f} ms, "
            f"executor {cost.executor * 1e3:.3f} ms, postgres "
            f"{'-' if pg is None else f'{pg * 1e3:.3f} ms'}, WAL {cost.wal_bytes:,.0f} B"
        )
        return cost


async def executor_startup_cpu(svc: Services) -> float:
    """CPU seconds an executor spends starting and connecting, with no work waiting: started,
    left until its CPU time stops growing, stopped."""
    await svc.start_executors(1)
    proc = svc.executors[-1]
    last, still = -1.0, 0
    deadline = time.monotonic() + 20
    while still < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.3)  # sampling interval of its CPU time
        now = cpu_s(proc.pid)
        still = still + 1 if now == last else 0
        last = now
    await svc.stop_executors()
    progress(f"capacity: an executor's start costs {last:.2f} s of CPU (taken off the drain's)")
    return last


# ---- the run -----------------------------------------------------------------------------------


async def pending(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM enforcement_dispatch"))


async def drained(conn: asyncpg.Connection, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await pending(conn):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{await pending(conn)} enforcements still pending after {timeout:.0f}s")
        await asyncio.sleep(0.05)  # poll interval of a condition wait


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """As the api's pool: no reset query at each release (a transaction of its own, which would
    count as a commit and cost CPU that no event needs)."""


async def raw_define(conn: asyncpg.Connection) -> tuple[int, int]:
    trigger = await conn.fetchval("INSERT INTO trigger (ref) VALUES ($1) RETURNING id", RAW)
    rule = await conn.fetchval(
        "INSERT INTO rule (ref, trigger, trigger_ref, action_ref) VALUES ($1, $2, $3, $4) RETURNING id",
        RAW_RULE,
        trigger,
        RAW,
        workload.ACTION,
    )
    return int(trigger), int(rule)


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url = await cluster.fresh_database("capacity")
    postmaster = await find_postmaster(url)
    if postmaster is None:
        progress("capacity: the server is not on this machine; PostgreSQL's CPU is not measured")
    conn = await asyncpg.connect(url)
    try:
        meter = await _phases(conn, url, s, postmaster)
    finally:
        await conn.close()
    await cluster.drop(url)
    costs = meter.costs
    footer.append(cost_table(costs))
    footer.append(
        f"At rest (the quiet {settle_s(s):.1f} s after each phase, median): the api uses "
        f"{median(meter.idle) * 1e3:.1f} ms of CPU per second"
        + (f", PostgreSQL {median(meter.idle_postgres) * 1e3:.1f} ms per second" if meter.idle_postgres else "")
    )
    return [
        Row(f"capacity: {c.phase}", our_rate=c.rate, p50=c.p50, p99=c.p99, notes=f"{c.items:,} {c.unit}s; costs below")
        for c in costs
    ]


async def _phases(conn: asyncpg.Connection, url: str, s: Settings, postmaster: int | None) -> Meter:
    window, settle = window_s(s), settle_s(s)
    async with services(url) as svc:
        target = await svc.start_api()
        meter = Meter(conn, svc, postmaster)
        async with channel(target) as ch:
            await workload.define(ch, BARE, [])
            await workload.define(ch, ONE, [ONE_RULE])
            stub: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)

            # -- the raw baseline ----------------------------------------------------------------
            raw_trigger, raw_rule = await raw_define(conn)
            pool = await asyncpg.create_pool(
                url,
                min_size=UNARY_CONCURRENCY,
                max_size=UNARY_CONCURRENCY,
                server_settings={"automation.notify": "off"},
                reset=_no_reset,
            )
            assert pool is not None
            made: list[tuple[int, object]] = []
            try:

                async def raw_insert() -> int:
                    rows = await pool.fetch(
                        workload.RAW_EVENT_WITH_ENFORCEMENTS,
                        raw_trigger,
                        RAW,
                        workload.PAYLOAD_JSON,
                        workload.SOURCE,
                        workload.RAW_CONFIG,
                        [raw_rule],
                        [RAW_RULE],
                    )
                    made.extend((r["id"], r["created"]) for r in rows)
                    return 1

                await closed_loop(raw_insert, UNARY_CONCURRENCY, 0.3)  # warm-up
                await asyncio.sleep(settle)  # the warm-up's statistics flushed before the phase reads them

                async def raw_inserts() -> tuple[int, list[float]]:
                    r = await closed_loop(raw_insert, UNARY_CONCURRENCY, window)
                    return r.items, r.latencies

                await meter.measure("raw insert (1 statement: event + enforcement)", "event", raw_inserts, settle)
                todo = list(made)

                async def raw_resolve_all() -> tuple[int, list[float]]:
                    latencies: list[float] = []

                    async def worker() -> None:
                        while todo:
                            enforcement_id, created = todo.pop()
                            t = time.perf_counter()
                            assert await pool.fetchval(workload.RAW_RESOLVE, enforcement_id, created, workload.ACTION)
                            latencies.append(time.perf_counter() - t)

                    await asyncio.gather(*(worker() for _ in range(UNARY_CONCURRENCY)))
                    return len(latencies), latencies

                await meter.measure("raw resolve (update + execution)", "enforcement", raw_resolve_all, settle)
            finally:
                await pool.close()

            # -- ours: unary ingest --------------------------------------------------------------
            def unary(
                trigger: str, enforcements: int, duration: float = window
            ) -> Callable[[], Awaitable[tuple[int, list[float]]]]:
                request = event_pb2.CreateEventRequest(event=workload.new_event(trigger))

                async def call() -> int:
                    answer = await stub.CreateEvent(request, timeout=30)
                    assert len(answer.enforcements) == enforcements
                    return 1

                async def load() -> tuple[int, list[float]]:
                    r = await closed_loop(call, UNARY_CONCURRENCY, duration)
                    return r.items, r.latencies

                return load

            await unary(BARE, 0, 0.3)()  # warm-up: connections, statements, the rule sets' caches
            await asyncio.sleep(settle)  # the warm-up's statistics flushed before the phase reads them
            await meter.measure(f"CreateEvent c={UNARY_CONCURRENCY}, no rule", "event", unary(BARE, 0), settle)
            startup = await executor_startup_cpu(svc)
            await asyncio.sleep(settle)  # the executor's statistics flushed before the phase reads them
            one = await meter.measure(f"CreateEvent c={UNARY_CONCURRENCY}, 1 rule", "event", unary(ONE, 1), settle)

            # -- ours: resolutions, then the whole pipeline ----------------------------------------
            backlog = await pending(conn)

            async def drain() -> tuple[int, list[float]]:
                await svc.start_executors(1)
                await drained(conn, timeout=max(60.0, backlog / 100))
                return backlog, []

            resolve = await meter.measure("resolve (1 executor drains the backlog)", "enforcement", drain, settle)
            # What starting the executor process cost (imports, channel) is no resolution's.
            resolve.executor -= startup / max(resolve.items, 1)

            rate = max(10.0, one.rate * PIPELINE_LOAD)
            request = event_pb2.CreateEventRequest(event=workload.new_event(ONE))

            async def create(_: int) -> int:
                answer = await stub.CreateEvent(request, timeout=30)
                return len(answer.enforcements)

            async def pipeline() -> tuple[int, list[float]]:
                r = await open_loop(create, rate, window)
                if r.errors:
                    raise RuntimeError(f"pipeline: {len(r.errors)} calls failed, first: {r.errors[0]}")
                await drained(conn, timeout=60)
                return len(r.results), r.latencies

            await meter.measure(f"pipeline: CreateEvent at {rate:,.0f}/s + 1 executor", "event", pipeline, settle)
            await svc.stop_executors()

            # -- ours: batched ingest ------------------------------------------------------------
            def batched(trigger: str, enforcements: int) -> Callable[[], Awaitable[tuple[int, list[float]]]]:
                request = event_pb2.CreateEventsRequest(events=[workload.new_event(trigger)] * s.batch_size)

                async def call() -> int:
                    answer = await stub.CreateEvents(request, timeout=60)
                    assert len(answer.receipts) == s.batch_size
                    assert len(answer.receipts[0].enforcement_ids) == enforcements
                    return s.batch_size

                async def load() -> tuple[int, list[float]]:
                    r = await closed_loop(call, BATCH_CONCURRENCY, window)
                    return r.items, r.latencies

                return load

            # The raw side of a batch: the ingest scenario's ids from the sequence and COPY.
            copy_pool = await asyncpg.create_pool(
                url,
                min_size=BATCH_CONCURRENCY,
                max_size=BATCH_CONCURRENCY,
                server_settings={"automation.notify": "off"},
                reset=_no_reset,
            )
            assert copy_pool is not None
            try:

                async def raw_copy() -> int:
                    async with copy_pool.acquire() as c, c.transaction():
                        ids = await c.fetchval(
                            "SELECT array(SELECT nextval('event_id_seq') FROM generate_series(1, $1))", s.batch_size
                        )
                        now = datetime.now(UTC)
                        source = workload.SOURCE
                        events = [(i, raw_trigger, RAW, workload.PAYLOAD_JSON, source, now) for i in ids]
                        await c.copy_records_to_table("event", columns=EVENT_COLUMNS, records=events)
                        enforcements = [
                            (raw_rule, RAW_RULE, RAW, workload.RAW_CONFIG, i, workload.PAYLOAD_JSON, "all", "[]", now)
                            for i in ids
                        ]
                        await c.copy_records_to_table("enforcement", columns=ENFORCEMENT_COLUMNS, records=enforcements)
                    return s.batch_size

                async def raw_copies() -> tuple[int, list[float]]:
                    r = await closed_loop(raw_copy, BATCH_CONCURRENCY, window)
                    return r.items, r.latencies

                await raw_copy()  # warm-up
                await asyncio.sleep(settle)  # the warm-up's statistics flushed before the phase reads them
                await meter.measure(
                    f"raw COPY {s.batch_size}/transaction (events + enforcements)", "event", raw_copies, settle
                )
            finally:
                await copy_pool.close()

            warm = event_pb2.CreateEventsRequest(events=[workload.new_event(BARE)] * s.batch_size)
            await stub.CreateEvents(warm, timeout=60)
            await asyncio.sleep(settle)  # the warm-up's statistics flushed before the phase reads them
            await meter.measure(f"CreateEvents {s.batch_size}/call, no rule", "event", batched(BARE, 0), settle)
            await meter.measure(f"CreateEvents {s.batch_size}/call, 1 rule", "event", batched(ONE, 1), settle)
    return meter


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def cost_table(costs: list[Cost]) -> str:
    """The costs per item, as a Markdown table (pasted into the README's capacity model)."""
    lines = [
        "Capacity: costs per item (CPU in ms of one core, user + system; WAL from pg_current_wal_lsn; "
        "records, full-page images, syncs and commits from pg_stat_wal / pg_stat_database)",
        "",
        "| phase | item | items | rate | api CPU | executor CPU | PostgreSQL CPU | load generator CPU "
        "| WAL bytes | WAL records | full-page images | WAL syncs | commits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in costs:
        lines.append(
            f"| {c.phase} | {c.unit} | {c.items:,} | {c.rate:,.0f}/s | {_ms(c.api)} | {_ms(c.executor)} "
            f"| {_ms(c.postgres)} | {_ms(c.client)} | {c.wal_bytes:,.0f} | {c.wal_records:.2f} | {c.wal_fpi:.3f} "
            f"| {c.wal_syncs:.3f} | {c.commits:.3f} |"
        )
    return "\n".join(lines)
