"""Scenarios 3 and 5: the pipeline at a fixed offered rate, and the memory of its processes.

Events go in through CreateEvent at a fixed offered rate (open loop); each matches one rule,
and an executor resolves its enforcement PROCESSED with an execution. A rate is *sustained*
when the generator kept the schedule, no call failed and the backlog (rows of
``enforcement_dispatch``, i.e. enforcements not yet resolved, including those leased to an
executor) stayed bounded: at the end at most one second of work (or 100) and not trending up.
The search probes short windows at rising rates, bisects once, then holds the best rate for
the full ``sustain_s`` (60 s). Latency is ``resolved_at`` (PostgreSQL ``now()`` of the
resolving transaction, i.e. its start, on this machine's clock) minus the wall-clock time at
which CreateEvent returned to the client, read back from the table after each window.

The raw baseline is the same work in SQL alone: producers insert the event and its
enforcement (one statement), consumers take ids from an in-process queue and run the
conditional update + execution insert (one statement); same tables, same triggers.

Memory: resident set of the api and the executors, sampled throughout (peak = VmHWM), and a
soak at 50 % of the sustained rate for ``memory_minutes`` whose first and last fifths are
compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

import asyncpg

from shared.gen.automation.v1 import event_pb2, event_pb2_grpc

from . import workload
from .fixture import Cluster, Proc, Services, channel, services
from .load import OpenResult, open_loop
from .report import Row, median, percentile, progress, spread
from .settings import Settings

TRIGGER = "bench.pipe"
RULE = "bench.pipe_r"
RAW_TRIGGER = "bench.rawpipe"
RAW_RULE = "bench.rawpipe_r"
RAW_PRODUCERS = 8
RAW_CONSUMERS = 8


# ---- raw baseline ------------------------------------------------------------------------------


async def raw_define(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        trigger_id = await conn.fetchval("INSERT INTO trigger (ref) VALUES ($1) RETURNING id", RAW_TRIGGER)
        rule_id = await conn.fetchval(
            "INSERT INTO rule (ref, trigger, trigger_ref, action_ref) VALUES ($1, $2, $3, $4) RETURNING id",
            RAW_RULE,
            trigger_id,
            RAW_TRIGGER,
            workload.ACTION,
        )
        return int(trigger_id), int(rule_id)
    finally:
        await conn.close()


async def _raw_rep(pool: asyncpg.Pool, trigger_id: int, rule_id: int, duration: float) -> float:
    """One window of the SQL-only pipeline: resolutions per second completed inside it."""
    queue: asyncio.Queue[tuple[int, object] | None] = asyncio.Queue(maxsize=2000)
    deadline = time.perf_counter() + duration
    done_in_window = 0

    async def produce() -> None:
        while time.perf_counter() < deadline:
            rows = await pool.fetch(
                workload.RAW_EVENT_WITH_ENFORCEMENTS,
                trigger_id,
                RAW_TRIGGER,
                workload.PAYLOAD_JSON,
                workload.SOURCE,
                workload.RAW_CONFIG,
                [rule_id],
                [RAW_RULE],
            )
            for r in rows:
                await queue.put((r["id"], r["created"]))

    async def consume() -> None:
        nonlocal done_in_window
        while (item := await queue.get()) is not None:
            executed = await pool.fetchval(workload.RAW_RESOLVE, item[0], item[1], workload.ACTION)
            assert executed is not None
            if time.perf_counter() <= deadline:
                done_in_window += 1

    consumers = [asyncio.create_task(consume()) for _ in range(RAW_CONSUMERS)]
    await asyncio.gather(*(produce() for _ in range(RAW_PRODUCERS)))
    # Drain what is queued (not counted) so that nothing is left pending for the api.
    for _ in consumers:
        await queue.put(None)
    await asyncio.gather(*consumers)
    return done_in_window / duration


async def raw_pipeline(url: str, s: Settings) -> list[float]:
    """Resolutions per second of the SQL-only pipeline, one value per repetition."""
    trigger_id, rule_id = await raw_define(url)
    pool = await workload.raw_pool(url, RAW_PRODUCERS + RAW_CONSUMERS)
    rates: list[float] = []
    try:
        await _raw_rep(pool, trigger_id, rule_id, min(1.0, s.rep_s))  # warm-up
        for rep in range(s.reps):
            rates.append(await _raw_rep(pool, trigger_id, rule_id, s.rep_s))
            progress(f"pipeline raw rep {rep + 1}/{s.reps}: {rates[-1]:,.0f} resolutions/s")
    finally:
        await pool.close()
    return rates


# ---- sampling ----------------------------------------------------------------------------------


class Sampler:
    """Backlog and RSS, sampled every ``interval`` seconds on a connection of its own."""

    def __init__(self, url: str, procs: list[Proc], interval: float) -> None:
        self.url = url
        self.procs = procs
        self.interval = interval
        self.backlog: list[tuple[float, int]] = []
        self.rss: dict[str, list[tuple[float, float]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None

    async def _run(self, conn: asyncpg.Connection) -> None:
        while True:
            t = time.perf_counter()
            self.backlog.append((t, await _backlog(conn)))
            for p in self.procs:
                self.rss.setdefault(p.name, []).append((t, p.rss_mb()))
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> Sampler:
        self._conn = await asyncpg.connect(self.url)
        self._task = asyncio.create_task(self._run(self._conn))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            await self._conn.close()


@dataclass
class Window:
    """One open-loop window and what came of it."""

    rate: float
    duration: float
    load: OpenResult[int]
    backlog: list[int]
    latencies: list[float]
    unresolved: int
    ok: bool
    why: str

    @property
    def max_backlog(self) -> int:
        return max(self.backlog, default=0)


async def _backlog(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM enforcement_dispatch"))


async def _drain(conn: asyncpg.Connection, timeout: float) -> int:
    deadline = time.perf_counter() + timeout
    while (left := await _backlog(conn)) and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    return left


def _judge(load: OpenResult[int], backlog: list[int], rate: float) -> tuple[bool, str]:
    why: list[str] = []
    if load.errors:
        why.append(f"{len(load.errors)} CreateEvent errors (first: {load.errors[0]})")
    if load.offered_rate < 0.95 * rate:
        why.append(f"offered only {load.offered_rate:,.0f}/s ({load.saturated} sends waited for a free slot)")
    if backlog:
        limit = max(100.0, rate)
        third = max(1, len(backlog) // 3)
        head, tail = backlog[third : 2 * third] or backlog, backlog[-third:]
        if backlog[-1] > limit:
            why.append(f"backlog {backlog[-1]} at the end (limit {limit:.0f})")
        elif sum(tail) / len(tail) - sum(head) / len(head) > limit / 4:
            why.append(f"backlog growing ({sum(head) / len(head):.0f} -> {sum(tail) / len(tail):.0f})")
    return not why, "; ".join(why)


ABORT_ERRORS = 20
"""Failed CreateEvent calls that end a hold early (one already fails it: see ``_judge``)."""


async def window(
    stub: event_pb2_grpc.EventServiceAsyncStub,
    conn: asyncpg.Connection,
    sampler: Sampler,
    rate: float,
    duration: float,
    drain_s: float,
    abort_backlog: float | None = None,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> Window:
    """Offers ``rate`` events/s for ``duration`` s, then waits for the backlog to drain.

    With ``abort_backlog``, the window stops early once the backlog passes it, or once
    ``ABORT_ERRORS`` calls failed: either has already failed the hold, and the time is better
    spent on a lower rate."""
    request = event_pb2.CreateEventRequest(event=workload.new_event(TRIGGER))

    async def create(_i: int) -> int:
        response = await stub.CreateEvent(request, timeout=30, metadata=metadata)
        return response.enforcements[0].id

    mark = len(sampler.backlog)

    def fallen_behind() -> bool:
        return abort_backlog is not None and len(sampler.backlog) > mark and sampler.backlog[-1][1] > abort_backlog

    def refused(so_far: OpenResult[int]) -> bool:
        return abort_backlog is not None and len(so_far.errors) >= ABORT_ERRORS

    load = await open_loop(create, rate, duration, should_stop=lambda so_far: fallen_behind() or refused(so_far))
    backlog = [n for _t, n in sampler.backlog[mark:]]
    ok, why = _judge(load, backlog, rate)
    if fallen_behind():
        ok = False
        why = "; ".join(filter(None, [why, f"stopped after {load.sent / rate:.0f}s: backlog over {abort_backlog:.0f}"]))
    elif refused(load):
        why = "; ".join(filter(None, [why, f"stopped after {load.sent / rate:.0f}s: {len(load.errors)} calls failed"]))
    left = await _drain(conn, drain_s)
    returned = {enf: t for t, enf in load.results}
    rows = await conn.fetch(
        "SELECT id, extract(epoch FROM resolved_at)::float8 AS at FROM enforcement "
        "WHERE id = ANY($1::bigint[]) AND resolved_at IS NOT NULL",
        list(returned),
    )
    latencies = [r["at"] - returned[r["id"]] for r in rows]
    unresolved = len(returned) - len(rows)
    if left:
        ok, why = False, "; ".join(filter(None, [why, f"{left} still pending {drain_s:.0f}s after the window"]))
    return Window(rate, duration, load, backlog, latencies, unresolved, ok, why)


def latency_text(w: Window | None) -> str:
    """A held window's latency, for notes."""
    return _lat(w) if w is not None else "not sustained"


def _lat(w: Window) -> str:
    return (
        f"p50 {percentile(w.latencies, 50) * 1000:.1f} p99 {percentile(w.latencies, 99) * 1000:.1f} "
        f"max {max(w.latencies, default=math.nan) * 1000:.1f} ms"
    )


# ---- the scenario ------------------------------------------------------------------------------


@dataclass
class Config:
    """Results for one executor count."""

    executors: int
    sustained: Window | None = None
    probes: list[Window] = field(default_factory=list)
    fractions: list[tuple[float, Window]] = field(default_factory=list)


async def search(
    stub: event_pb2_grpc.EventServiceAsyncStub,
    conn: asyncpg.Connection,
    sampler: Sampler,
    s: Settings,
    cfg: Config,
    start_rate: float,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> None:
    drain_s = 5.0 if s.quick else 20.0

    async def probe(rate: float, duration: float) -> Window:
        w = await window(
            stub, conn, sampler, rate, duration, drain_s, abort_backlog=max(5 * rate, 1000), metadata=metadata
        )
        progress(
            f"pipeline {cfg.executors} exec: {rate:,.0f}/s for {duration:.0f}s -> "
            f"{'ok' if w.ok else 'NOT sustained: ' + w.why}; {_lat(w)}; max backlog {w.max_backlog}"
        )
        cfg.probes.append(w)
        return w

    rate = start_rate
    best: float | None = None
    failed: float | None = None
    for _ in range(s.max_probes):
        if (await probe(rate, s.probe_s)).ok:
            best = rate
            rate *= 1.5
        else:
            failed = rate
            if best is not None:
                break
            rate /= 2
            if rate < 10:
                break
    if best is not None and failed is not None and failed > best and not s.quick:
        mid = math.sqrt(best * failed)
        if (await probe(mid, s.probe_s)).ok:
            best = mid
    if best is None:
        return
    # Short probes flatter: a rate can hold for seconds and fall behind within the minute
    # (transient backlogs turn hand-off into claims). Holds step down until one lasts; a
    # failing hold stops early (see window), which keeps the whole run under 15 minutes.
    for _ in range(1 if s.quick else 4):
        w = await probe(best, s.sustain_s)
        if w.ok:
            cfg.sustained = w
            return
        best *= 0.85


async def _config(
    svc: Services,
    stub: event_pb2_grpc.EventServiceAsyncStub,
    conn: asyncpg.Connection,
    s: Settings,
    executors: int,
    start_rate: float,
) -> Config:
    await svc.start_executors(executors)
    cfg = Config(executors)
    async with Sampler(svc.database_url, [p for p in [svc.api, *svc.executors] if p], s.sample_s) as sampler:
        # Let the watch streams open and everything warm up; this window is not judged.
        await asyncio.sleep(0.5)
        await window(stub, conn, sampler, start_rate / 2, s.probe_s, 10.0)
        await search(stub, conn, sampler, s, cfg, start_rate)
        if cfg.sustained is not None:
            for fraction in (0.25, 0.5, 0.9):
                w = await window(stub, conn, sampler, cfg.sustained.rate * fraction, s.fraction_s, 20.0)
                progress(f"pipeline {executors} exec at {fraction:.0%}: {w.rate:,.0f}/s; {_lat(w)}")
                cfg.fractions.append((fraction, w))
    return cfg


def _pipeline_rows(cfg: Config, raw_rates: list[float]) -> list[Row]:
    name = f"pipeline {cfg.executors} exec"
    raw = median(raw_rates)
    w = cfg.sustained
    if w is None:
        last = cfg.probes[-1] if cfg.probes else None
        return [Row(f"{name} sustained", raw, None, notes=f"no rate sustained; last: {last.why if last else '-'}")]
    rows = [
        Row(
            f"{name} sustained",
            raw,
            w.rate,
            percentile(w.latencies, 50),
            percentile(w.latencies, 99),
            f"held {w.duration:.0f}s, max backlog {w.max_backlog}, latency max "
            f"{max(w.latencies, default=math.nan) * 1000:.0f} ms; {len(cfg.probes)} probes; "
            f"raw = SQL-only pipeline ({RAW_PRODUCERS}+{RAW_CONSUMERS} conns), spread {spread(raw_rates)}",
        )
    ]
    for fraction, f in cfg.fractions:
        rows.append(
            Row(
                f"{name} @{fraction:.0%}",
                None,
                f.rate,
                percentile(f.latencies, 50),
                percentile(f.latencies, 99),
                f"CreateEvent return -> resolved_at; max {max(f.latencies, default=math.nan) * 1000:.1f} ms; "
                f"n={len(f.latencies)}, unresolved {f.unresolved}; "
                f"CreateEvent p50 {percentile(f.load.latencies, 50) * 1000:.2f} ms",
            )
        )
    return rows


def _growth(samples: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(MB at the start, MB at the end, MB per minute) from the first and last fifths."""
    values = [v for _t, v in samples if v > 0]
    if len(values) < 5:
        return math.nan, math.nan, math.nan
    fifth = max(1, len(values) // 5)
    first, last = median(values[:fifth]), median(values[-fifth:])
    # The centres of the first and last fifths are 80 % of the span apart.
    minutes = (samples[-1][0] - samples[0][0]) / 60 * 0.8
    return first, last, (last - first) / minutes if minutes else math.nan


async def _soak(
    svc: Services, stub: event_pb2_grpc.EventServiceAsyncStub, conn: asyncpg.Connection, s: Settings, rate: float
) -> tuple[float, dict[str, list[tuple[float, float]]], str]:
    """Constant load for ``memory_minutes``; returns the rate and the RSS samples."""
    duration = s.memory_minutes * 60
    progress(f"memory soak: {rate:,.0f}/s for {duration:.0f}s")
    procs = [p for p in [svc.api, *svc.executors] if p]
    async with Sampler(svc.database_url, procs, max(s.sample_s, duration / 300)) as sampler:
        # Warm-up outside the measured samples: pools, caches and allocator arenas fill first.
        await window(stub, conn, sampler, rate, min(10.0, duration / 5), 20.0)
        sampler.rss.clear()
        w = await window(stub, conn, sampler, rate, duration, 20.0)
    return rate, sampler.rss, "" if w.ok else f" (NOT sustained: {w.why})"


def _memory_rows(
    peaks: dict[str, float], soak: tuple[float, dict[str, list[tuple[float, float]]], str] | None, minutes: float
) -> list[Row]:
    rows = []
    for role in ("api", "executor"):
        mine = sorted(name for name in peaks if name.startswith(role))
        peak = max((peaks[name] for name in mine), default=math.nan)
        notes = f"peak RSS {peak:.0f} MB over scenario 3 ({len(mine)} process(es))"
        if soak is not None:
            rate, rss, flag = soak
            series = [rss[name] for name in mine if name in rss]
            if series:
                first, last, slope = _growth(series[0])
                growth = last - first
                flat = growth <= max(3.0, 0.03 * first)
                notes += (
                    f"; soak {minutes:g} min at {rate:,.0f}/s{flag}: {first:.1f} -> {last:.1f} MB "
                    f"({growth:+.1f} MB, {slope:+.2f} MB/min): {'flat' if flat else 'GROWING'}"
                )
        rows.append(Row(f"memory {role}", notes=notes))
    return rows


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url = await cluster.fresh_database("pipeline")
    progress("pipeline raw baseline (SQL only)")
    raw_rates = await raw_pipeline(url, s)
    rows: list[Row] = []
    peaks: dict[str, float] = {}

    def record_peaks() -> None:
        # VmHWM can only be read while a process lives.
        for p in [svc.api, *svc.executors]:
            if p is not None:
                peaks[p.name] = max(peaks.get(p.name, 0.0), p.peak_rss_mb())

    async with services(url) as svc:
        target = await svc.start_api()
        conn = await asyncpg.connect(url)
        try:
            async with channel(target) as ch:
                await workload.define(ch, TRIGGER, [RULE])
                stub: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
                one = await _config(svc, stub, conn, s, 1, s.start_rate)
                rows += _pipeline_rows(one, raw_rates)
                soak = None
                if one.sustained is not None and s.memory_minutes > 0:
                    soak = await _soak(svc, stub, conn, s, one.sustained.rate * 0.5)
                record_peaks()
                await svc.stop_executors()
                start = one.sustained.rate * 0.8 if one.sustained else s.start_rate
                three = await _config(svc, stub, conn, s, 3, start)
                rows += _pipeline_rows(three, raw_rates)
                record_peaks()
                await svc.stop_executors()
                rows += _memory_rows(peaks, soak, s.memory_minutes)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
    await cluster.drop(url)
    return rows
