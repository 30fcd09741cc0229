"""Scenario 4: ListEvents / ListEnforcements, a page of 100, first page and a far page.

The store is filled with COPY (``copy_records_to_table``) straight into the tables, with every
trigger, foreign key and index in place: ``read_events`` events and twice as many
enforcements, ``created`` spread over 30 days. The token of the far page is the keyset of the
last row of the page before it (found in SQL, encoded as the api encodes tokens), which is
exactly the token a client walking there would hold. Each case times the RPC and, as the raw
baseline, the very statement the store issues (captured from the repository), sequentially.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from google.protobuf import timestamp_pb2

from services.api.store import Store, create_pool
from services.api.store._db import PLANNER_SETTINGS
from services.api.store._paging import encode_token
from shared.gen.automation.v1 import (
    analytics_pb2,
    analytics_pb2_grpc,
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
)

from . import steady, workload
from .capture import list_enforcements_sql, list_events_sql
from .fixture import Cluster, channel, services
from .report import Row, footer, percentile, progress
from .settings import Settings

PAGE = 100
TRIGGERS = [f"bench.t{i}" for i in range(4)]
RULES = [f"bench.r{i}" for i in range(8)]  # rules 2t and 2t+1 watch trigger t
TARGETED_RULE = "bench.r0"
SOURCES = [f"sensor.s{i}" for i in range(4)]
CHUNK = 50_000
DAYS = 30


@dataclass(frozen=True)
class Shape:
    """Where generated rows fall: ids 1..n, created evenly over the last 30 days."""

    events: int
    start: datetime
    step: timedelta

    def created(self, i: int) -> datetime:
        return self.start + self.step * i

    def trigger(self, i: int) -> int:
        return i % 4


REPOS = 1000
"""Each event's payload names one of this many repositories (``repo_of``): a payload search for
one of them matches one event in REPOS, spread over the whole range."""
_PAYLOAD_HEAD = workload.PAYLOAD_JSON[:-1]


def repo_of(i: int) -> str:
    """The repository named in event ``i``'s payload (``{"repo": {"name": ...}}``)."""
    return f"repo-{i % REPOS}"


def _event_rows(shape: Shape, lo: int, hi: int, trigger_ids: list[int], targeted_id: int) -> Iterator[tuple[Any, ...]]:
    for i in range(lo, hi):
        t = shape.trigger(i)
        targeted = t == 0  # every event of trigger 0 targets rule 0: a quarter of them
        yield (
            i,
            trigger_ids[t],
            TRIGGERS[t],
            f'{_PAYLOAD_HEAD}, "repo": {{"name": "{repo_of(i)}"}}}}',
            SOURCES[(i // 7) % 4],
            targeted_id if targeted else None,
            TARGETED_RULE if targeted else None,
            shape.created(i),
        )


def _enforcement_rows(
    shape: Shape, lo: int, hi: int, rule_ids: list[int], pending_since: datetime | None = None
) -> Iterator[tuple[Any, ...]]:
    for i in range(lo, hi):
        t = shape.trigger(i)
        created = shape.created(i)
        for k in (0, 1):
            j = 2 * i - 1 + k
            r = 2 * t + k
            kind = j % 100
            # 1 % pending, spread over the whole range; or all since no executor ran.
            pending = kind == 0 if pending_since is None else created >= pending_since
            status = "created" if pending else "disabled" if kind < 10 else "processed"
            yield (
                j,
                rule_ids[r],
                RULES[r],
                TRIGGERS[t],
                workload.RAW_CONFIG,
                i,
                status,
                workload.PAYLOAD_JSON,
                created,
                None if status == "created" else created + timedelta(milliseconds=50),
            )


async def load(url: str, events: int, days: int = DAYS, pending_since: timedelta | None = None) -> Shape:
    """Fills the tables, ``created`` spread over the last ``days``; returns the shape of what it
    wrote. 1 % of the enforcements are pending, or, with ``pending_since``, those created since
    that long ago (and none before)."""
    conn = await asyncpg.connect(url)
    try:
        trigger_ids = [
            int(await conn.fetchval("INSERT INTO trigger (ref) VALUES ($1) RETURNING id", ref)) for ref in TRIGGERS
        ]
        rule_ids = [
            int(
                await conn.fetchval(
                    "INSERT INTO rule (ref, trigger, trigger_ref, action_ref) VALUES ($1, $2, $3, $4) RETURNING id",
                    ref,
                    trigger_ids[n // 2],
                    TRIGGERS[n // 2],
                    workload.ACTION,
                )
            )
            for n, ref in enumerate(RULES)
        ]
        now = datetime.now(UTC)
        shape = Shape(events, now - timedelta(days=days), timedelta(days=days) / (events + 1))
    finally:
        await conn.close()

    async def copy(table: str, columns: list[str], chunks: Callable[[int, int], Iterator[tuple[Any, ...]]]) -> None:
        c = await asyncpg.connect(url)
        try:
            for lo in range(1, events + 1, CHUNK):
                hi = min(lo + CHUNK, events + 1)
                await c.copy_records_to_table(table, columns=columns, records=chunks(lo, hi))
        finally:
            await c.close()

    t = time.perf_counter()
    await asyncio.gather(
        copy(
            "event",
            ["id", "trigger", "trigger_ref", "payload", "source_ref", "rule", "rule_ref", "created"],
            lambda lo, hi: _event_rows(shape, lo, hi, trigger_ids, rule_ids[0]),
        ),
        copy(
            "enforcement",
            [
                "id",
                "rule",
                "rule_ref",
                "trigger_ref",
                "config",
                "event",
                "status",
                "payload",
                "created",
                "resolved_at",
            ],
            lambda lo, hi: _enforcement_rows(
                shape, lo, hi, rule_ids, None if pending_since is None else now - pending_since
            ),
        ),
    )
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT setval('event_id_seq', $1)", events)
        await conn.execute("SELECT setval('enforcement_id_seq', $1)", 2 * events)
        await conn.execute("VACUUM ANALYZE event")
        await conn.execute("VACUUM ANALYZE enforcement")
        await conn.execute("VACUUM ANALYZE enforcement_dispatch")
    finally:
        await conn.close()
    progress(
        f"read: loaded {events:,} events + {2 * events:,} enforcements with COPY in {time.perf_counter() - t:.0f}s"
    )
    return shape


@dataclass(frozen=True)
class Case:
    kind: str  # "events" or "enforcements"
    label: str
    filters: dict[str, Any]


def list_cases(shape: Shape) -> list[Case]:
    # 20 of the 30 days: every filter combined with it still has over 1,000 pages.
    start = shape.start + timedelta(days=5)
    end = shape.start + timedelta(days=25)
    rng = {"created_from": start, "created_to": end}
    return [
        Case("events", "no filter", {}),
        Case("events", "trigger_ref", {"trigger_ref": TRIGGERS[1]}),
        Case("events", "source_ref", {"source_ref": SOURCES[2]}),
        Case("events", "rule_ref", {"rule_ref": TARGETED_RULE}),
        Case("events", "created range", rng),
        Case("events", "trigger_ref+range", {"trigger_ref": TRIGGERS[2], **rng}),
        Case("enforcements", "no filter", {}),
        Case("enforcements", "rule_ref", {"rule_ref": RULES[3]}),
        Case("enforcements", "event", {"event": shape.events // 2}),
        Case("enforcements", "status", {"status": "disabled"}),
        Case("enforcements", "trigger_ref", {"trigger_ref": TRIGGERS[2]}),
        Case("enforcements", "created range", rng),
        Case("enforcements", "rule_ref+status", {"rule_ref": RULES[5], "status": "processed"}),
    ]


def _range(filters: dict[str, Any]) -> common_pb2.TimeRange:
    r = common_pb2.TimeRange()
    if "created_from" in filters:
        r.start.CopyFrom(_ts(filters["created_from"]))
    if "created_to" in filters:
        r.end.CopyFrom(_ts(filters["created_to"]))
    return r


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


STATUS = {"created": 1, "processed": 2, "disabled": 3}


def list_request(case: Case, token: str) -> event_pb2.ListEventsRequest | enforcement_pb2.ListEnforcementsRequest:
    f = case.filters
    if case.kind == "events":
        return event_pb2.ListEventsRequest(
            page_size=PAGE,
            page_token=token,
            trigger_ref=f.get("trigger_ref", ""),
            source_ref=f.get("source_ref", ""),
            rule_ref=f.get("rule_ref", ""),
            created=_range(f),
        )
    req = enforcement_pb2.ListEnforcementsRequest(
        page_size=PAGE,
        page_token=token,
        rule_ref=f.get("rule_ref", ""),
        status=STATUS.get(f.get("status", ""), 0),  # type: ignore[arg-type]
        trigger_ref=f.get("trigger_ref", ""),
        created=_range(f),
    )
    if "event" in f:
        req.event = f["event"]
    return req


async def _sql(case: Case, size: int, token: str) -> tuple[str, Any]:
    if case.kind == "events":
        return await list_events_sql(size, token, **case.filters)
    return await list_enforcements_sql(size, token, **case.filters)


async def _far_token(conn: asyncpg.Connection, case: Case, page: int) -> str | None:
    """The token that a client holds after walking ``page - 1`` pages of 100."""
    sql, args = await _sql(case, PAGE * (page - 1) - 1, "")
    row = await conn.fetchrow(f"SELECT created, id FROM ({sql}) q ORDER BY created, id LIMIT 1", *args)
    if row is None:
        return None
    # Exactly page-1 full pages must precede the far page.
    count = await conn.fetchval(f"SELECT count(*) FROM ({sql}) q", *args)
    if count < PAGE * (page - 1):
        return None
    return encode_token(row["created"], row["id"])


async def _api_token(store: Store, case: Case, page: int) -> str:
    """The token the api gives a client after ``page - 1`` pages of 100 (signed with its key)."""
    repo = store.events if case.kind == "events" else store.enforcements
    return (await repo.list(PAGE * (page - 1), "", **case.filters)).next_token


async def _api_token_below(store: Store, case: Case, cursor: tuple[datetime, int]) -> str:
    """The api's token of the page below ``cursor``: a client that has walked there."""
    if case.kind == "events":
        return await store.events.token_below(store.events.listing(**case.filters), cursor)
    return await store.enforcements.token_below(store.enforcements.listing(**case.filters), cursor)


def raw_connect(url: str) -> Any:
    """The raw baseline's connection: the api's session settings (generic plans, no JIT), so
    that both sides run the same plan; jsonb stays text (no decoding)."""
    return asyncpg.connect(url, server_settings=PLANNER_SETTINGS)


@dataclass(frozen=True)
class Where:
    """Where a measured page starts: page 1, page ``far`` (walked to), or mid-range."""

    label: str
    page: int = 0
    cursor: tuple[datetime, int] | None = None


async def _steady_or_fresh(cluster: Cluster, s: Settings) -> tuple[str, Shape, str]:
    """The filled database and its shape; on TimescaleDB the 90-day steady state."""
    if cluster.store == "timescale":
        fixture = await steady.build(cluster, s.steady_events, keep=not s.quick)
        counts = steady.describe_chunks(await steady.chunk_counts(fixture.url))
        how = "reused" if fixture.reused else "built"
        return fixture.url, fixture.shape, f"{how} in {fixture.built_s:.0f}s; {counts}"
    url = await cluster.fresh_database("read")
    progress(f"read: loading {s.read_events:,} events and {2 * s.read_events:,} enforcements")
    return url, await load(url, s.read_events), ""


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url, shape, about = await _steady_or_fresh(cluster, s)
    days = round((shape.step * shape.events) / timedelta(days=1))
    rows: list[Row] = []
    if about:
        progress(f"read: {about}")
        footer.append(f"TimescaleDB steady state ({shape.events:,} events over {days} days): {about}")
        rows.append(
            Row(f"read fixture: {shape.events:,} events, {2 * shape.events:,} enforcements, {days} days", notes=about)
        )
    # The middle of the range: on TimescaleDB, 45 days back, inside the compressed chunks.
    mid = (shape.created(shape.events // 2), 2**62)
    async with services(url) as svc:
        target = await svc.start_api()
        conn = await raw_connect(url)
        pool = await create_pool(url, min_size=1, max_size=2)
        store = Store(pool)
        try:
            async with channel(target) as ch:
                events: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
                enfs: enforcement_pb2_grpc.EnforcementServiceAsyncStub = enforcement_pb2_grpc.EnforcementServiceStub(ch)
                for case in list_cases(shape):
                    for where in (
                        Where("p1", page=1),
                        Where(f"p{s.read_far_page}", page=s.read_far_page),
                        Where("mid", cursor=mid),
                    ):
                        name = f"read {case.kind} {case.label} {where.label}"
                        if where.cursor is not None:
                            token = encode_token(*where.cursor)
                            api_token = await _api_token_below(store, case, where.cursor)
                        else:
                            far = "" if where.page == 1 else await _far_token(conn, case, where.page)
                            if far is None:
                                rows.append(Row(name, notes=f"fewer than {where.page} pages match"))
                                continue
                            # The raw SQL takes the captured statement's local token; the api
                            # only takes tokens it signed itself, for this list and these filters.
                            token = far
                            api_token = token and await _api_token(store, case, where.page)
                        request = list_request(case, api_token)
                        sql, args = await _sql(case, PAGE, token)

                        async def ours(req: Any = request, kind: str = case.kind) -> int:
                            if kind == "events":
                                return len((await events.ListEvents(req, timeout=30)).events)
                            return len((await enfs.ListEnforcements(req, timeout=30)).enforcements)

                        async def raw(q: str = sql, a: Any = args) -> int:
                            return len(await conn.fetch(q, *a))

                        rows.append(await _measure(name, ours, raw, s.read_samples))
                by_id = await _by_id(conn, ch, store, shape, s)
                rows += by_id
                footer.append(_floor(by_id))
                # On plain PostgreSQL the volume views aggregate the base tables at every call
                # (hundreds of ms): a few samples say as much there.
                rows += await _analytics(conn, ch, s.read_samples if cluster.store == "timescale" else 5)
        finally:
            await conn.close()
            await pool.close()
    if not about:
        await cluster.drop(url)
    return rows


async def _by_id(conn: asyncpg.Connection, ch: Any, store: Store, shape: Shape, s: Settings) -> list[Row]:
    """GetEvent / GetEnforcement: by id alone. The raw column runs the statement the store runs
    (on TimescaleDB, the search within the day its chunk finder places the id in); the notes
    give the same lookup with no time bound, which probes every chunk."""
    events: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
    enfs: enforcement_pb2_grpc.EnforcementServiceAsyncStub = enforcement_pb2_grpc.EnforcementServiceStub(ch)
    rows = []
    for label, event_id in (("newest", shape.events - 1), ("mid", shape.events // 2), ("oldest", 2)):
        for kind in ("event", "enforcement"):
            id_ = event_id if kind == "event" else 2 * event_id
            by_id = store.events.by_id if kind == "event" else store.enforcements.by_id
            bounds = await by_id.finder.bounds(id_)
            sql, args = (by_id.within, (id_, *bounds)) if bounds else (by_id.everywhere, (id_,))

            async def ours(i: int = id_, k: str = kind) -> int:
                if k == "event":
                    await events.GetEvent(event_pb2.GetEventRequest(id=i), timeout=30)
                else:
                    await enfs.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=i), timeout=30)
                return 1

            async def raw(q: str = sql, a: tuple[Any, ...] = args) -> int:
                return len(await conn.fetch(q, *a))

            async def unbounded(q: str = by_id.everywhere, i: int = id_) -> int:
                return len(await conn.fetch(q, i))

            row = await _measure(f"read Get{kind.capitalize()} by id, {label}", ours, raw, s.read_samples)
            if bounds:
                alone = await _timed(unbounded, s.read_samples)
                row = dataclasses.replace(
                    row,
                    notes=f"{row.notes}; raw = within one day; by id alone (every chunk) p50/p99 "
                    f"{percentile(alone, 50) * 1000:.2f}/{percentile(alone, 99) * 1000:.2f} ms",
                )
            rows.append(row)
    return rows


async def _timed(call: Callable[[], Awaitable[int]], n: int) -> list[float]:
    await call()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t)
    return out


def _floor(by_id: list[Row]) -> str:
    """What one unary call costs beyond its SQL, from the GetEvent / GetEnforcement rows: a list
    page whose SQL takes r ms can reach at most r / (r + floor) of the raw rate, however cheap
    turning its rows into messages becomes."""
    extra = sorted(1 / r.our_rate - 1 / r.raw_rate for r in by_id if r.our_rate and r.raw_rate)
    floor = extra[len(extra) // 2] * 1000
    return (
        f"RPC floor: a Get by id costs {floor:.2f} ms more than its SQL (median of {len(extra)} rows); "
        f"a page whose SQL takes 0.5 ms can reach at most {0.5 / (0.5 + floor):.2f} of the raw rate, "
        f"one of 2 ms at most {2 / (2 + floor):.2f}"
    )


async def _analytics(conn: asyncpg.Connection, ch: Any, samples: int) -> list[Row]:
    """The hourly volume RPCs over the last 30 days (720 buckets per series)."""
    stub: analytics_pb2_grpc.AnalyticsServiceAsyncStub = analytics_pb2_grpc.AnalyticsServiceStub(ch)
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(days=30)
    span = common_pb2.TimeRange(start=_ts(start), end=_ts(end))
    rows = []
    for kind in ("event", "enforcement"):
        view = "event_volume_hourly" if kind == "event" else "enforcement_volume_hourly"
        sql = f"SELECT * FROM {view} WHERE bucket >= $1 AND bucket < $2"

        async def ours(k: str = kind) -> int:
            if k == "event":
                return len(
                    (await stub.QueryEventVolume(analytics_pb2.QueryEventVolumeRequest(range=span), timeout=30)).buckets
                )
            return len(
                (
                    await stub.QueryEnforcementVolume(
                        analytics_pb2.QueryEnforcementVolumeRequest(range=span), timeout=30
                    )
                ).buckets
            )

        async def raw(q: str = sql) -> int:
            return len(await conn.fetch(q, start, end))

        rows.append(await _measure(f"read {kind} volume, 30 days hourly", ours, raw, samples))
    return rows


async def _measure(name: str, ours: Callable[[], Awaitable[int]], raw: Callable[[], Awaitable[int]], n: int) -> Row:
    for _ in range(3):
        got = await ours()
        await raw()
    mine: list[float] = []
    base: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        await raw()
        base.append(time.perf_counter() - t)
        t = time.perf_counter()
        await ours()
        mine.append(time.perf_counter() - t)
    row = Row(
        name,
        len(base) / sum(base),
        len(mine) / sum(mine),
        percentile(mine, 50),
        percentile(mine, 99),
        f"calls/s sequential; {got} rows each; raw (same SQL) p50/p99 "
        f"{percentile(base, 50) * 1000:.2f}/{percentile(base, 99) * 1000:.2f} ms; n={n}",
    )
    raw_ms = f"{percentile(base, 50) * 1000:.2f}/{percentile(base, 99) * 1000:.2f}"
    ours_ms = f"{percentile(mine, 50) * 1000:.2f}/{percentile(mine, 99) * 1000:.2f}"
    progress(f"{name}: p50/p99 {ours_ms} ms (raw {raw_ms} ms)")
    return row
