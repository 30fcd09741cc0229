"""Scenarios 1 and 2: ingest through CreateEvent (unary) and CreateEvents (batch).

Raw baselines on the same database and tables (all triggers and indexes in place):
unary, one statement inserting the event and its 2 enforcements at the same concurrency;
batch, ids from the sequence then ``copy_records_to_table`` of the same rows in one
transaction. Repetitions alternate raw and ours so that drift of a noisy machine hits both.
"""

from __future__ import annotations

from datetime import UTC, datetime

from shared.gen.automation.v1 import event_pb2, event_pb2_grpc

from . import workload
from .fixture import Cluster, channel, services
from .load import ClosedResult, closed_loop
from .report import Row, median, percentile, progress, spread
from .settings import Settings

TRIGGER = "bench.ingest"
RULES = ["bench.ingest_a", "bench.ingest_b"]

EVENT_COLUMNS = ["id", "trigger", "trigger_ref", "payload", "source_ref", "created"]
ENFORCEMENT_COLUMNS = [
    "rule",
    "rule_ref",
    "trigger_ref",
    "config",
    "event",
    "payload",
    "condition",
    "conditions",
    "created",
]


def summary(
    name: str, raw: list[ClosedResult], ours: list[ClosedResult], items: bool, extra: str = ""
) -> tuple[Row, float]:
    def rate(r: ClosedResult) -> float:
        return r.item_rate if items else r.rate

    raw_rates = [rate(r) for r in raw]
    our_rates = [rate(r) for r in ours]
    lat = [x for r in ours for x in r.latencies]
    raw_lat = [x for r in raw for x in r.latencies]
    notes = (
        f"median of {len(ours)} x {ours[0].elapsed:.0f}s; spread raw {spread(raw_rates)}, ours {spread(our_rates)}; "
        f"raw p50/p99 {percentile(raw_lat, 50) * 1000:.2f}/{percentile(raw_lat, 99) * 1000:.2f} ms{extra}"
    )
    row = Row(name, median(raw_rates), median(our_rates), percentile(lat, 50), percentile(lat, 99), notes)
    return row, median(our_rates)


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url = await cluster.fresh_database("ingest")
    rows: list[Row] = []
    async with services(url) as svc:
        target = await svc.start_api()
        async with channel(target) as ch:
            ids = await workload.define(ch, TRIGGER, RULES)
            stub: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
            pool = await workload.raw_pool(url, max(s.unary_concurrency))
            try:
                rule_ids = [ids[r] for r in RULES]
                one = event_pb2.CreateEventRequest(event=workload.new_event(TRIGGER))

                async def ours_unary() -> int:
                    response = await stub.CreateEvent(one, timeout=30)
                    assert len(response.enforcements) == 2
                    return 1

                async def raw_unary() -> int:
                    got = await pool.fetch(
                        workload.RAW_EVENT_WITH_ENFORCEMENTS,
                        ids[TRIGGER],
                        TRIGGER,
                        workload.PAYLOAD_JSON,
                        workload.SOURCE,
                        workload.RAW_CONFIG,
                        rule_ids,
                        RULES,
                    )
                    assert len(got) == 2
                    return 1

                # Warm up both paths (connections, prepared statements, channel).
                await closed_loop(ours_unary, 4, 0.3)
                await closed_loop(raw_unary, 4, 0.3)
                unary_c16 = 0.0
                for c in s.unary_concurrency:
                    raw: list[ClosedResult] = []
                    ours: list[ClosedResult] = []
                    for rep in range(s.reps):
                        progress(f"ingest unary c={c} rep {rep + 1}/{s.reps}")
                        raw.append(await closed_loop(raw_unary, c, s.rep_s))
                        ours.append(await closed_loop(ours_unary, c, s.rep_s))
                    row, ours_rate = summary(f"ingest-unary c={c}", raw, ours, items=False)
                    row.notes += "; raw = 1 CTE statement per event (pool of c)"
                    if c == 16:
                        unary_c16 = ours_rate
                    rows.append(row)

                batch = event_pb2.CreateEventsRequest(events=[workload.new_event(TRIGGER)] * s.batch_size)

                async def ours_batch() -> int:
                    response = await stub.CreateEvents(batch, timeout=60)
                    assert len(response.receipts) == s.batch_size
                    return s.batch_size

                async def raw_batch() -> int:
                    async with pool.acquire() as conn, conn.transaction():
                        event_ids = await conn.fetchval(
                            "SELECT array(SELECT nextval('event_id_seq') FROM generate_series(1, $1))", s.batch_size
                        )
                        now = datetime.now(UTC)
                        await conn.copy_records_to_table(
                            "event",
                            columns=EVENT_COLUMNS,
                            records=[
                                (i, ids[TRIGGER], TRIGGER, workload.PAYLOAD_JSON, workload.SOURCE, now)
                                for i in event_ids
                            ],
                        )
                        await conn.copy_records_to_table(
                            "enforcement",
                            columns=ENFORCEMENT_COLUMNS,
                            records=[
                                (
                                    rid,
                                    ref,
                                    TRIGGER,
                                    workload.RAW_CONFIG,
                                    i,
                                    workload.PAYLOAD_JSON,
                                    "all",
                                    "[]",
                                    now,
                                )
                                for i in event_ids
                                for rid, ref in zip(rule_ids, RULES, strict=True)
                            ],
                        )
                    return s.batch_size

                await closed_loop(ours_batch, 1, 0.1, max_calls=1)
                await closed_loop(raw_batch, 1, 0.1, max_calls=1)
                raw_b: list[ClosedResult] = []
                ours_b: list[ClosedResult] = []
                for rep in range(s.reps):
                    progress(f"ingest batch rep {rep + 1}/{s.reps}")
                    raw_b.append(await closed_loop(raw_batch, s.batch_concurrency, s.rep_s))
                    ours_b.append(await closed_loop(ours_batch, s.batch_concurrency, s.rep_s))
                vs_unary = ""
                if unary_c16:
                    vs_unary = f"; {median([r.item_rate for r in ours_b]) / unary_c16:.1f}x unary c=16"
                row, _ = summary(f"ingest-batch {s.batch_size}/call", raw_b, ours_b, items=True, extra=vs_unary)
                row.notes += (
                    f"; events/s, {s.batch_concurrency} calls in flight; p50/p99 per call; "
                    "raw = nextval + 2 x copy_records_to_table in 1 tx"
                )
                rows.append(row)
            finally:
                await pool.close()
    await cluster.drop(url)
    return rows
