"""The TimescaleDB side of the schema: hypertables, compression, retention, continuous aggregates.

Tests marked ``timescale`` need the extension (set TEST_DATABASE_URL to a TimescaleDB server, or
run where a Docker engine answers); ``timescale_licensed`` the Timescale-licensed edition
(compression, continuous aggregates, policies); ``timescale_apache`` the Apache-licensed edition
(hypertables and drop_chunks only: retention is the api's). The conftest skips them, with the
reason, elsewhere. The file check and the volume-view test run on every database.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from google.protobuf.struct_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp

from services.api import migrate
from services.api.server import ApiServer
from services.api.store import NewEvent, Resolution, Store
from services.api.store._db import CUSTOM_PLAN
from services.api.store.analytics import ENFORCEMENTS, HOUR, volume_query
from services.web.session import COOKIE
from shared.config import ApiConfig
from shared.gen.automation.v1 import common_pb2, condition_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel, eventually, new_event, struct, web_service
from tests.integration.plans import explain_prepared

HOOK = "core.webhook"


async def setup_rule(store: Store) -> None:
    await store.rules.create_trigger(HOOK, "", "", None, None)
    await store.rules.create_rule(
        ref="demo.rule",
        label="",
        description="",
        trigger_ref=HOOK,
        action_ref="core.echo",
        action_params={"p": "{{ event.payload.p }}"},
        conditions=[],
        condition="all",
        enabled=True,
    )


async def insert_old(conn: asyncpg.Connection, age: str) -> tuple[int, int]:
    """An event and its pending enforcement, ``age`` old, written with an explicit created."""
    row = await conn.fetchrow(
        f"""
        WITH ev AS (
            INSERT INTO event (trigger, trigger_ref, payload, created)
            SELECT id, ref, '{{"p": 1}}', now() - interval '{age}' FROM trigger WHERE ref = $1
            RETURNING id, created
        )
        INSERT INTO enforcement (rule, rule_ref, trigger_ref, config, event, created)
        SELECT r.id, r.ref, r.trigger_ref, '{{"p": 1}}', ev.id, ev.created FROM rule r, ev WHERE r.ref = 'demo.rule'
        RETURNING event, id
        """,
        HOOK,
    )
    assert row is not None
    return row["event"], row["id"]


async def job_id(conn: asyncpg.Connection, proc: str, table: str) -> int:
    value = await conn.fetchval(
        "SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = $1 AND hypertable_name = $2", proc, table
    )
    assert isinstance(value, int), f"no {proc} job on {table}"
    return value


@pytest.mark.timescale
async def test_event_and_enforcement_are_hypertables_with_daily_chunks(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT hypertable_name, column_name, time_interval FROM timescaledb_information.dimensions "
        "WHERE hypertable_schema = 'public' ORDER BY hypertable_name"
    )
    dims = {r["hypertable_name"]: (r["column_name"], r["time_interval"]) for r in rows}
    assert dims["event"] == ("created", timedelta(days=1))
    assert dims["enforcement"] == ("created", timedelta(days=1))
    assert dims["execution_history"][0] == "time"
    assert dims["worker_history"][0] == "time"


@pytest.mark.timescale_licensed
async def test_compression_is_segmented_by_trigger_and_rule(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT hypertable::text AS h, segmentby FROM timescaledb_information.hypertable_compression_settings"
    )
    settings = {r["h"]: r["segmentby"] for r in rows}
    assert settings["event"] == "trigger_ref"
    assert settings["enforcement"] == "rule_ref"


@pytest.mark.timescale_licensed
@pytest.mark.parametrize("table", ["event", "enforcement"])
async def test_compression_after_7_days_and_retention_of_90_days(conn: asyncpg.Connection, table: str) -> None:
    rows = await conn.fetch(
        "SELECT proc_name, config->>'compress_after' AS compress_after, config->>'drop_after' AS drop_after "
        "FROM timescaledb_information.jobs WHERE hypertable_name = $1 ORDER BY proc_name",
        table,
    )
    assert [(r["proc_name"], r["compress_after"], r["drop_after"]) for r in rows] == [
        ("policy_compression", "7 days", None),
        ("policy_retention", None, "90 days"),
    ]


@pytest.mark.timescale_licensed
async def test_volume_views_are_real_time_continuous_aggregates(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates ORDER BY view_name"
    )
    assert [(r["view_name"], r["materialized_only"]) for r in rows] == [
        ("enforcement_volume_hourly", False),
        ("enforcement_volume_minute", False),
        ("event_volume_hourly", False),
        ("event_volume_minute", False),
    ]
    policies = await conn.fetch(
        "SELECT proc_name, schedule_interval, config->>'start_offset' AS start, config->>'end_offset' AS end, "
        "config->>'drop_after' AS drop FROM timescaledb_information.jobs "
        "WHERE hypertable_name LIKE '%\\_minute' ORDER BY hypertable_name, proc_name"
    )
    assert [(r["proc_name"], r["schedule_interval"], r["start"], r["end"], r["drop"]) for r in policies] == [
        ("policy_refresh_continuous_aggregate", timedelta(minutes=1), "04:00:00", "00:01:00", None),
        ("policy_retention", timedelta(days=1), None, None, "1 day"),
    ] * 2


@pytest.mark.timescale_licensed
async def test_recent_hours_are_read_from_the_minute_views_and_older_from_the_hourly(
    store: Store, conn: asyncpg.Connection
) -> None:
    await setup_rule(store)
    assert await store.analytics.views() == "recent"
    # One event in an hour only the hourly views serve, one in an hour the minute views serve,
    # one in the current hour; their enforcements, the oldest resolved.
    for age in ("7 hours", "1 hour", "0 seconds"):
        await insert_old(conn, age)
    await conn.execute(
        "UPDATE enforcement SET status = 'disabled', resolved_at = now() WHERE created < now() - interval '2 hours'"
    )
    # Materialized, as their policies would; an event after that is still counted (real time).
    await _unschedule_refreshes(conn)
    for view in (
        "event_volume_hourly",
        "enforcement_volume_hourly",
        "event_volume_minute",
        "enforcement_volume_minute",
    ):
        await conn.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, now() - interval '1 minute')")
    await insert_old(conn, "0 seconds")

    hour = "extract(epoch FROM date_bin(interval '1 hour', created, 'epoch'))::bigint"
    events = {r[0]: r[1] for r in await conn.fetch(f"SELECT {hour}, count(*) FROM event GROUP BY 1")}
    enforcements = {
        (r[0], r[1]): r[2]
        for r in await conn.fetch(f"SELECT {hour}, status::text, count(*) FROM enforcement GROUP BY 1, 2")
    }
    assert len(events) == 3 and sum(events.values()) == 4
    now = datetime.now(UTC)
    start, end = now - timedelta(hours=23), now + timedelta(hours=1)
    assert {v.bucket: v.event_count for v in await store.analytics.event_volume(start, end)} == events
    assert {
        (v.bucket, v.status): v.enforcement_count for v in await store.analytics.enforcement_volume(start, end)
    } == enforcements
    days = await store.analytics.event_volume(start - timedelta(days=1), end, width=timedelta(days=1))
    assert sum(v.event_count for v in days) == 4


async def _unschedule_refreshes(conn: asyncpg.Connection) -> None:
    """Stops the scheduler's refreshes of the volume views (the per-minute ones run every
    minute): one running beside the test's own is refused ("due to a concurrent refresh")."""
    await conn.execute(
        "SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs "
        "WHERE proc_name = 'policy_refresh_continuous_aggregate'"
    )


def _raw_rows_read(plan: dict[str, Any], chunks: set[str]) -> int:
    """Rows the plan's scans of ``chunks`` returned or filtered out."""
    own = 0
    if plan.get("Relation Name") in chunks:
        own = (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)) * plan.get("Actual Loops", 1)
    return own + sum(_raw_rows_read(child, chunks) for child in plan.get("Plans", []))


@pytest.mark.timescale_licensed
async def test_a_volume_read_after_a_burst_counts_no_row_the_views_hold(store: Store, conn: asyncpg.Connection) -> None:
    """The views' real-time parts compare ``time_bucket(created)`` with the range: planned
    generically (the session's default) that bounds no index and excludes no chunk, and every
    row above the hourly view's watermark (a burst's) was read and filtered out at every load."""
    await setup_rule(store)
    await conn.execute(
        """
        WITH ev AS (
            INSERT INTO event (trigger, trigger_ref, payload, created)
            SELECT t.id, t.ref, '{}', now() - interval '40 minutes' + g * interval '1 second'
              FROM trigger t, generate_series(1, 2000) g WHERE t.ref = $1 RETURNING id, created
        )
        INSERT INTO enforcement (rule, rule_ref, trigger_ref, config, event, created)
        SELECT r.id, r.ref, r.trigger_ref, '{}', ev.id, ev.created FROM rule r, ev WHERE r.ref = 'demo.rule'
        """,
        HOOK,
    )
    await insert_old(conn, "5 hours")
    await _unschedule_refreshes(conn)
    # The hourly views as of 3 hours ago (their watermark below the hours they serve; the
    # minute views serve the rest), the minute views as of a minute ago.
    for view, upto in (
        ("event_volume_hourly", "3 hours"),
        ("enforcement_volume_hourly", "3 hours"),
        ("event_volume_minute", "1 minute"),
        ("enforcement_volume_minute", "1 minute"),
    ):
        await conn.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, now() - interval '{upto}')")
    await conn.execute("ANALYZE enforcement")
    chunks = {
        r[0]
        for r in await conn.fetch(
            "SELECT chunk_name FROM timescaledb_information.chunks WHERE hypertable_name = 'enforcement'"
        )
    }

    now = datetime.now(UTC)
    query = volume_query("recent", ENFORCEMENTS, now - timedelta(hours=24), now, HOUR, [], now)
    assert query is not None
    sql, args = query
    # As the store runs it (a custom plan), then as a generic plan would run it.
    assert _raw_rows_read(await _explained_under(conn, sql, args, CUSTOM_PLAN), chunks) == 0
    generic = "SET LOCAL plan_cache_mode = force_generic_plan"
    assert _raw_rows_read(await _explained_under(conn, sql, args, generic), chunks) >= 2000
    assert sum(r[3] for r in await conn.fetch(sql, *args)) == 2001


async def _explained_under(conn: asyncpg.Connection, sql: str, args: list[Any], setting: str) -> dict[str, Any]:
    """The executed plan of ``sql`` as a prepared statement in a transaction that ran ``setting``."""
    async with conn.transaction():
        await conn.execute(setting)
        [doc] = await explain_prepared(conn, sql, args, analyze=True)
    plan: dict[str, Any] = doc["Plan"]
    return plan


async def resolve_one(store: Store, enf_id: int, many: bool) -> Resolution:
    """Through ``resolve`` or, as ResolveEnforcements does, ``resolve_many``."""
    if not many:
        return await store.enforcements.resolve(enf_id, "processed")
    (outcome,) = await store.enforcements.resolve_many([(enf_id, "processed")])
    assert isinstance(outcome, Resolution)
    return outcome


@pytest.mark.timescale_licensed
@pytest.mark.parametrize("many", [False, True], ids=["one", "many"])
async def test_resolving_an_enforcement_in_a_compressed_chunk(
    store: Store, conn: asyncpg.Connection, many: bool
) -> None:
    await setup_rule(store)
    event_id, enf_id = await insert_old(conn, "10 days")
    compressed = await conn.fetch(
        "SELECT compress_chunk(c)::text FROM show_chunks('enforcement', older_than => INTERVAL '7 days') c"
    )
    await conn.execute("SELECT compress_chunk(c) FROM show_chunks('event', older_than => INTERVAL '7 days') c")
    assert len(compressed) == 1
    assert await conn.fetchval(
        "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks "
        "WHERE hypertable_name = 'enforcement' AND range_end < now() - interval '7 days'"
    )
    pending = await store.enforcements.get(enf_id)
    assert (pending.status, pending.event) == ("created", event_id)
    assert (await store.events.get(event_id)).payload == {"p": 1}

    resolution = await resolve_one(store, enf_id, many)
    assert resolution.enforcement.status == "processed" and resolution.enforcement.resolved_at is not None
    assert resolution.execution is not None
    assert (resolution.execution.action_ref, resolution.execution.config, resolution.execution.enforcement) == (
        "core.echo",
        {"p": 1},
        enf_id,
    )
    assert (await store.enforcements.get(enf_id)).status == "processed"
    assert await conn.fetchval("SELECT count(*) FROM enforcement_dispatch WHERE enforcement = $1", enf_id) == 0
    again = await resolve_one(store, enf_id, many)
    assert again.replayed is True and again.execution == resolution.execution


@pytest.mark.timescale_licensed
async def test_resolutions_go_on_when_compressed_chunks_hold_a_backlog(store: Store, conn: asyncpg.Connection) -> None:
    """An executor back after 10 days: 12,000 enforcements of that day compressed (12 batches),
    one in 50 still pending. A set-wise resolution leaves rows that may be compressed to the
    per-row path, which decompresses one batch per row: before, the set-wise UPDATE decompressed
    every batch with a pending row (on the 90-day store: 1.4M rows, 15 s a call, then refused),
    and so did the per-row UPDATE as a generic plan."""
    await setup_rule(store)
    await conn.execute(
        """
        INSERT INTO enforcement (rule, rule_ref, trigger_ref, config, event, status, payload, created, resolved_at)
        SELECT r.id, r.ref, r.trigger_ref, '{"p": 1}', g,
               CASE WHEN g % 50 = 0 THEN 'created' ELSE 'processed' END::enforcement_status, '{"p": 1}', t,
               CASE WHEN g % 50 = 0 THEN NULL ELSE t END
          FROM rule r, generate_series(1, 12000) g,
               LATERAL (SELECT date_trunc('day', now()) - interval '10 days' + g * interval '1 second' AS t) s
         WHERE r.ref = 'demo.rule'"""
    )
    await conn.execute("SELECT compress_chunk(c) FROM show_chunks('enforcement', older_than => INTERVAL '7 days') c")
    old = [r["id"] for r in await conn.fetch("SELECT enforcement AS id FROM enforcement_dispatch ORDER BY 1")]
    assert len(old) == 240
    [fresh] = (await store.events.create_many([NewEvent(HOOK, {"p": 2})]))[0].enforcements

    results = await store.enforcements.resolve_many([(fresh.id, "processed"), *((i, "disabled") for i in old[:20])])
    assert [getattr(r, "enforcement", r) for r in results] == [
        await store.enforcements.get(i) for i in [fresh.id, *old[:20]]
    ]
    assert [r.enforcement.status for r in results if isinstance(r, Resolution)] == ["processed"] + ["disabled"] * 20
    assert await conn.fetchval("SELECT count(*) FROM enforcement_dispatch") == 220
    # The 20 old rows share one batch: its 1,000 rows left the compressed part, the rest stayed.
    decompressed = 0
    for chunk in await conn.fetch("SELECT c::text FROM show_chunks('enforcement', older_than => INTERVAL '7 days') c"):
        decompressed += await conn.fetchval(f"SELECT count(*) FROM ONLY {chunk[0]}")
    assert 0 < decompressed <= 1000


@pytest.mark.timescale_licensed
async def test_retention_drops_old_chunks_and_keeps_recent_rows(store: Store, conn: asyncpg.Connection) -> None:
    await setup_rule(store)
    old_event, old_enf = await insert_old(conn, "100 days")
    [recent] = await store.events.create_many([NewEvent(HOOK, {"p": 2})])
    assert await conn.fetchval("SELECT count(*) FROM show_chunks('event', older_than => INTERVAL '90 days')") == 1

    for table in ("event", "enforcement"):
        await conn.execute(f"CALL run_job({await job_id(conn, 'policy_retention', table)})")

    assert await conn.fetchval("SELECT count(*) FROM show_chunks('event', older_than => INTERVAL '90 days')") == 0
    assert await conn.fetchval("SELECT count(*) FROM show_chunks('enforcement', older_than => INTERVAL '90 days')") == 0
    assert await conn.fetchval("SELECT count(*) FROM event WHERE id = $1", old_event) == 0
    assert await conn.fetchval("SELECT count(*) FROM enforcement WHERE id = $1", old_enf) == 0
    assert (await store.events.get(recent.event.id)).payload == {"p": 2}
    [enf] = recent.enforcements
    assert (await store.enforcements.get(enf.id)).event == recent.event.id
    assert (await store.enforcements.resolve(enf.id, "processed")).execution is not None


@pytest.mark.timescale_licensed
async def test_replay_reads_and_fires_over_compressed_chunks(
    store: Store, conn: asyncpg.Connection, stubs: Stubs
) -> None:
    """ReplayRule over real channels across a range whose chunks are compressed: it finds the
    old events, fires their enforcements once, and a second run finds them existing."""
    await setup_rule(store)
    old = [await insert_event(conn, "10 days", {"p": n}) for n in range(3)]
    await conn.execute("SELECT compress_chunk(c) FROM show_chunks('event', older_than => INTERVAL '7 days') c")
    await conn.execute("SELECT compress_chunk(c) FROM show_chunks('enforcement', older_than => INTERVAL '7 days') c")
    assert await conn.fetchval(
        "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks "
        "WHERE hypertable_name = 'event' AND range_end < now() - interval '7 days'"
    )
    rule = await stubs.rules.CreateRule(
        rule_pb2.CreateRuleRequest(
            rule=rule_pb2.Rule(
                ref="demo.late",
                trigger_ref=HOOK,
                action_ref="core.echo",
                action_params=struct({"p": "{{ event.payload.p }}"}),
                conditions=[
                    condition_pb2.RuleCondition(
                        field="p", operator=condition_pb2.CONDITION_OPERATOR_GREATERTHAN, value=Value(number_value=0)
                    )
                ],
            )
        )
    )
    start = Timestamp()
    start.FromDatetime(datetime.now(UTC) - timedelta(days=30))
    request = rule_pb2.ReplayRuleRequest(
        rule=rule_pb2.RuleSource(ref=rule.ref), created=common_pb2.TimeRange(start=start), fire=True
    )

    first = [m async for m in stubs.rules.ReplayRule(request)]
    matches = [m.match for m in first if m.HasField("match")]
    assert [m.event_id for m in matches] == [old[2], old[1]]  # newest first; p=0 does not match
    assert [dict(m.config) for m in matches] == [{"p": 2}, {"p": 1}]
    assert all(m.HasField("enforcement_id") and not m.existed for m in matches)
    summary = first[-1].summary
    assert (summary.scanned, summary.matched, summary.fired, summary.truncated) == (3, 2, 2, False)

    again = [m async for m in stubs.rules.ReplayRule(request)]
    assert [(m.match.enforcement_id, m.match.existed) for m in again if m.HasField("match")] == [
        (m.enforcement_id, True) for m in matches
    ]
    assert again[-1].summary.fired == 0
    fired = await conn.fetch("SELECT event, config FROM enforcement WHERE rule_ref = 'demo.late' ORDER BY event")
    assert [(r["event"], json.loads(r["config"])) for r in fired] == [(old[1], {"p": 1}), (old[2], {"p": 2})]


async def insert_event(conn: asyncpg.Connection, age: str, payload: dict[str, Any]) -> int:
    """An event ``age`` old, written with an explicit created (no enforcement)."""
    value = await conn.fetchval(
        f"""
        INSERT INTO event (trigger, trigger_ref, payload, created)
        SELECT id, ref, $2::text::jsonb, now() - interval '{age}' FROM trigger WHERE ref = $1 RETURNING id""",
        HOOK,
        json.dumps(payload),
    )
    assert isinstance(value, int)
    return value


COMPRESSED_UNTIL = (
    "SELECT max(range_end) FROM timescaledb_information.chunks WHERE hypertable_name = 'event' AND is_compressed"
)


async def compress_old(conn: asyncpg.Connection) -> None:
    """Compresses every chunk older than 7 days, as the compression policy does."""
    for table in ("event", "enforcement"):
        await conn.execute(f"SELECT compress_chunk(c) FROM show_chunks('{table}', older_than => INTERVAL '7 days') c")
    assert await conn.fetchval(
        "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks "
        "WHERE hypertable_name IN ('event', 'enforcement') AND range_end < now() - interval '7 days'"
    )


@pytest.mark.timescale_licensed
async def test_a_search_without_a_range_covers_the_events_not_yet_compressed(
    store: Store, conn: asyncpg.Connection, stubs: Stubs
) -> None:
    """Compressed chunks have no payload index: without `created` a search covers the days
    after the newest compressed chunk and says from when; with a range it searches that."""
    await setup_rule(store)
    old = await insert_event(conn, "10 days", {"repo": "x"})
    await compress_old(conn)
    (recent,) = [
        r.event_id
        for r in (
            await stubs.events.CreateEvents(
                event_pb2.CreateEventsRequest(events=[new_event(HOOK, {"repo": "x"}), new_event(HOOK, {"repo": "y"})])
            )
        ).receipts[:1]
    ]
    boundary = await conn.fetchval(COMPRESSED_UNTIL)

    answer = await stubs.events.ListEvents(
        event_pb2.ListEventsRequest(payload_contains=struct({"repo": "x"}), count_matching=True)
    )
    assert [e.id for e in answer.events] == [recent]
    assert answer.matching_count == 1
    assert answer.searched_from.ToDatetime(tzinfo=UTC) == boundary

    # A range given is searched as asked, compressed days included, and nothing is said.
    month = common_pb2.TimeRange()
    month.start.FromDatetime(datetime.now(UTC) - timedelta(days=30))
    ranged = await stubs.events.ListEvents(
        event_pb2.ListEventsRequest(payload_contains=struct({"repo": "x"}), created=month, count_matching=True)
    )
    assert [e.id for e in ranged.events] == [recent, old]
    assert ranged.matching_count == 2
    assert not ranged.HasField("searched_from")
    until = common_pb2.TimeRange()
    until.end.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    ended = await stubs.events.ListEvents(
        event_pb2.ListEventsRequest(payload_contains=struct({"repo": "x"}), created=until)
    )
    assert [e.id for e in ended.events] == [recent, old]
    # Lists without a payload filter cover every day, as before.
    listed = await stubs.events.ListEvents(event_pb2.ListEventsRequest(trigger_ref=HOOK))
    assert old in [e.id for e in listed.events] and not listed.HasField("searched_from")


@pytest.mark.timescale_licensed
async def test_compressed_event_batches_without_a_reemission_are_skipped_unread(
    store: Store, conn: asyncpg.Connection, stubs: Stubs
) -> None:
    """Migration 0022's min/max on reemit_of: a batch of events none of which is a
    re-emission is left compressed by a lookup of re-emissions (an automatic bloom filter of
    all-NULL values matched everything, and each batch was decompressed); a batch holding one
    is still read, and the lookup finds it."""
    await setup_rule(store)
    plain = [await insert_event(conn, "10 days", {"p": n}) for n in range(3)]
    reemitted = await conn.fetchval(
        "INSERT INTO event (trigger, trigger_ref, payload, created, reemit_of) "
        "SELECT id, ref, '{}', now() - interval '20 days', $2 FROM trigger WHERE ref = $1 RETURNING id",
        HOOK,
        plain[0],
    )
    await compress_old(conn)

    chunk = await conn.fetchval(
        "SELECT format('%I.%I', chunk_schema, chunk_name) FROM timescaledb_information.chunks "
        "WHERE hypertable_name = 'event' AND is_compressed AND range_start <= now() - interval '10 days' "
        "AND range_end > now() - interval '10 days'"
    )

    async def lookup(of: int) -> tuple[int, int]:
        """Rows decompressed and then filtered out, and compressed batches left out unread,
        when this chunk is searched for the re-emissions of ``of``."""
        sql = f"EXPLAIN (ANALYZE, FORMAT JSON) SELECT id FROM {chunk} WHERE reemit_of = $1"
        [plan] = json.loads(await conn.fetchval(sql, of))
        scan = plan["Plan"]
        assert scan["Custom Plan Provider"] == "ColumnarScan", scan
        [batches] = scan["Plans"]
        assert "_ts_meta_v2_min_reemit_of" in batches["Filter"] and "bloom" not in batches["Filter"]
        return int(scan.get("Rows Removed by Filter", 0)), int(batches.get("Rows Removed by Filter", 0))

    assert await lookup(plain[1]) == (0, 1)  # the one batch, left compressed
    found = await conn.fetch("SELECT id FROM event WHERE reemit_of = $1", plain[0])
    assert [r["id"] for r in found] == [reemitted]


@pytest.mark.timescale_licensed
async def test_the_console_says_what_a_search_covered_and_shows_a_compressed_event(
    store: Store, conn: asyncpg.Connection, api: ApiServer
) -> None:
    """The events page says a search without a range covered only the uncompressed days; an
    event's page on a compressed day lists its enforcements."""
    await setup_rule(store)
    event, enforcement = await insert_old(conn, "10 days")
    await compress_old(conn)
    target = f"127.0.0.1:{api.port}"
    async with (
        channel(target, token=TOKENS["webhook"]) as ch,
        web_service(target, ch) as url,
        httpx.AsyncClient(base_url=url, cookies={COOKIE: TOKENS["viewer"]}, timeout=30) as viewer,
    ):
        searched = await viewer.get("/events", params={"payload": '{"p": 1}'})
        assert searched.status_code == 200
        boundary = await conn.fetchval(COMPRESSED_UNTIL)
        assert f'data-searched-from="{boundary.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")}"' in searched.text
        assert "Pick a time range to search them" in searched.text
        assert f'href="/events/{event}"' not in searched.text
        ranged = await viewer.get(
            "/events",
            params={"payload": '{"p": 1}', "from": (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M")},
        )
        assert f'href="/events/{event}"' in ranged.text and "Searched the last" not in ranged.text
        page = await viewer.get(f"/events/{event}")
        assert page.status_code == 200
        assert f'href="/enforcements/{enforcement}"' in page.text


# ---- the Apache-licensed edition -----------------------------------------------------------------------


@pytest.mark.timescale_apache
async def test_apache_edition_has_no_policies_and_plain_volume_views(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SHOW timescaledb.license") == "apache"
    assert await conn.fetch("SELECT job_id FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL") == []
    assert await conn.fetch("SELECT view_name FROM timescaledb_information.continuous_aggregates") == []
    kinds = await conn.fetch(
        "SELECT relname::text, relkind::text FROM pg_class "
        "WHERE relname IN ('event_volume_hourly', 'enforcement_volume_hourly') ORDER BY 1"
    )
    assert [(r[0], r[1]) for r in kinds] == [("enforcement_volume_hourly", "v"), ("event_volume_hourly", "v")]
    compressed = await conn.fetch(
        "SELECT hypertable_name::text FROM timescaledb_information.hypertables WHERE compression_enabled"
    )
    assert compressed == []


@pytest.mark.timescale_apache
async def test_apache_edition_retention_is_the_apis(
    store: Store, conn: asyncpg.Connection, api_config: ApiConfig
) -> None:
    """No retention policy there: the api's maintenance drops chunks past 90 days itself (on its
    first round), and what remains still reads and resolves."""
    await setup_rule(store)
    old_event, old_enf = await insert_old(conn, "100 days")
    [recent] = await store.events.create_many([NewEvent(HOOK, {"p": 2})])
    assert await conn.fetchval("SELECT count(*) FROM show_chunks('event', older_than => INTERVAL '90 days')") == 1
    assert await conn.fetchval("SELECT count(*) FROM enforcement_dispatch WHERE enforcement = $1", old_enf) == 1

    async def gone() -> bool | None:
        chunks = await conn.fetchval(
            "SELECT count(*) FROM (SELECT show_chunks('event', older_than => INTERVAL '90 days') "
            "UNION ALL SELECT show_chunks('enforcement', older_than => INTERVAL '90 days')) c"
        )
        orphan = await conn.fetchval("SELECT count(*) FROM enforcement_dispatch WHERE enforcement = $1", old_enf)
        return True if chunks == 0 and orphan == 0 else None

    server = ApiServer(api_config)
    await server.start()
    try:
        await eventually(gone, what="chunks past 90 days dropped by the api")
    finally:
        await server.stop()
    assert await conn.fetchval("SELECT count(*) FROM event WHERE id = $1", old_event) == 0
    assert (await store.events.get(recent.event.id)).payload == {"p": 2}
    [enf] = recent.enforcements
    assert (await store.enforcements.resolve(enf.id, "processed")).execution is not None


# ---- runs on every database -------------------------------------------------------------------------


async def test_volume_views_show_a_just_inserted_row(store: Store) -> None:
    await setup_rule(store)
    [created] = await store.events.create_many([NewEvent(HOOK, {"p": 1})])
    [enf] = created.enforcements
    hour = created.event.created.replace(minute=0, second=0, microsecond=0)
    start, end = hour - timedelta(hours=1), hour + timedelta(hours=2)
    bucket = int(hour.timestamp())  # buckets come as whole seconds since the epoch

    events = await store.analytics.event_volume(start, end)
    assert [(v.bucket, v.trigger_ref, v.event_count) for v in events] == [(bucket, HOOK, 1)]
    enforcements = await store.analytics.enforcement_volume(start, end, rule_ref="demo.rule")
    assert [(v.bucket, v.rule_ref, v.status, v.enforcement_count) for v in enforcements] == [
        (bucket, "demo.rule", "created", 1)
    ]
    await store.enforcements.resolve(enf.id, "disabled")
    after = await store.analytics.enforcement_volume(start, end, status="disabled")
    assert [(v.status, v.enforcement_count) for v in after] == [("disabled", 1)]
    assert await store.analytics.enforcement_volume(start, end, status="created") == []
    assert await store.analytics.event_volume(start, end, trigger_ref="other.trigger") == []


async def test_wider_volume_buckets_sum_the_hours_inside_the_range(store: Store, conn: asyncpg.Connection) -> None:
    await setup_rule(store)
    # Days ahead: above any continuous aggregate's watermark, so every edition reads them live.
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=3)
    offsets = [1, 3, 3, 5, 25]  # hours after midnight
    for hours in offsets:
        await conn.execute(
            """
            WITH ev AS (
                INSERT INTO event (trigger, trigger_ref, payload, created)
                SELECT id, ref, '{}', $2 FROM trigger WHERE ref = $1 RETURNING id, created
            )
            INSERT INTO enforcement (rule, rule_ref, trigger_ref, config, event, created)
            SELECT r.id, r.ref, r.trigger_ref, '{}', ev.id, ev.created FROM rule r, ev WHERE r.ref = 'demo.rule'
            """,
            HOOK,
            day + timedelta(hours=hours, minutes=30),
        )

    def at(hours: int) -> int:
        return int((day + timedelta(hours=hours)).timestamp())

    def events(rows: list[Any]) -> list[tuple[int, int]]:
        return [(v.bucket, v.event_count) for v in rows]

    whole = (day, day + timedelta(days=2))
    assert events(await store.analytics.event_volume(*whole)) == [
        (at(h), n) for h, n in [(1, 1), (3, 2), (5, 1), (25, 1)]
    ]
    four = timedelta(hours=4)
    assert events(await store.analytics.event_volume(*whole, width=four)) == [(at(0), 3), (at(4), 1), (at(24), 1)]
    days = await store.analytics.event_volume(*whole, width=timedelta(days=1))
    assert [(v.bucket, v.trigger_ref, v.event_count) for v in days] == [(at(0), HOOK, 4), (at(24), HOOK, 1)]
    # A range starting inside a bucket: the bucket keeps its start and sums only the hours inside.
    assert events(await store.analytics.event_volume(day + timedelta(hours=2), whole[1], width=four)) == [
        (at(0), 2),
        (at(4), 1),
        (at(24), 1),
    ]
    assert await store.analytics.event_volume(*whole, trigger_ref="other.trigger", width=four) == []

    enforcements = await store.analytics.enforcement_volume(*whole, width=timedelta(days=1))
    assert [(v.bucket, v.rule_ref, v.status, v.enforcement_count) for v in enforcements] == [
        (at(0), "demo.rule", "created", 4),
        (at(24), "demo.rule", "created", 1),
    ]
    assert await store.analytics.enforcement_volume(*whole, status="disabled", width=four) == []


_TIMESCALE_CALL = re.compile(
    r"\b(create_hypertable|add_\w+_policy|compress_chunk|time_bucket|timescaledb[._]\w*|by_range|"
    r"CREATE\s+EXTENSION|show_chunks|drop_chunks|run_job)\b",
    re.IGNORECASE,
)


def _code(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def _guarded_block(sql: str) -> str:
    """The body of the migration's one DO block, which must be all of its code; or of its one
    function (0016's and 0023's, which the runner calls after every run) and the call of it."""
    code = _code(sql)
    block = re.search(r"DO \$migration\$(.*)\$migration\$;", code, re.DOTALL)
    function = re.search(
        r"CREATE OR REPLACE FUNCTION (\w+)\(\) RETURNS void LANGUAGE plpgsql AS \$migration\$(.*)\$migration\$;",
        code,
        re.DOTALL,
    )
    if block is None:
        assert function is not None
        block = function
        outside = code[: block.start()] + code[block.end() :]
        assert outside.strip() == f"SELECT {function.group(1)}();"
        assert f"{function.group(1)}()" in migrate.LAYOUT
        inside = block.group(2)
        assert _TIMESCALE_CALL.search(inside)
        return inside
    outside = code[: block.start()] + code[block.end() :]
    assert outside.strip() == ""
    inside = block.group(1)
    assert _TIMESCALE_CALL.search(inside)
    return inside


def test_timescaledb_statements_stay_inside_the_marked_do_block() -> None:
    migrations = migrate.load()
    for m in migrations:
        if not m.name.startswith("timescaledb"):
            assert not _TIMESCALE_CALL.search(_code(m.sql)), f"{m.name} uses TimescaleDB outside its marked migrations"
    [ts, *later] = [m for m in migrations if m.name.startswith("timescaledb")]
    assert ts.name == "timescaledb"
    inside = _guarded_block(ts.sql)
    # Every TimescaleDB statement comes after the branch that returns without the extension.
    fallback_end = inside.index("RETURN;")
    assert not _TIMESCALE_CALL.search(inside[:fallback_end].split("IF NOT use_timescaledb THEN", 1)[1])
    assert inside.index("CREATE EXTENSION IF NOT EXISTS timescaledb") > fallback_end
    # Later ones change what 0005 made, only once they found the extension installed.
    assert [m.name for m in later] == [
        "timescaledb_reads",
        "timescaledb_edition",
        "timescaledb_event_sparse_index",
        "timescaledb_recent_volume",
    ]
    for m in later:
        inside = _guarded_block(m.sql)
        fallback_end = inside.index("RETURN;")
        assert "FROM pg_extension WHERE extname = 'timescaledb'" in inside[:fallback_end]
        assert not _TIMESCALE_CALL.search(inside[:fallback_end]), m.name
