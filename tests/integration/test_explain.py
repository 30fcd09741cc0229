"""Every list query the store issues uses an index: no sequential scan of event or enforcement.

The tables get 50,000 events and 100,000 enforcements (COPY, then ANALYZE): enough that the
planner picks a sequential scan wherever no index fits. The statements are captured from the
repositories themselves (``tools.bench.capture``), for every combination of the filters the
RPCs expose, for the first page and with a page token, and explained twice: with the values
bound (the custom plan) and as a generic plan (``plan_cache_mode = force_generic_plan``), which
is what a prepared statement may settle on after a few executions.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from services.api.store._db import PLANNER_SETTINGS
from services.api.store._paging import SEARCH, encode_token
from tests.integration.plans import explain_prepared
from tools.bench import read
from tools.bench.capture import list_enforcements_sql, list_events_sql

EVENTS = 50_000
SMALL_CHUNK = 1_000
SMALL_WALK = 5_000
"""A chunk small enough that walking it in time order costs about what its GIN index would."""
"""Rows under which a chunk may be scanned whole (see test_list_queries_use_indexes)."""
BIG_TABLES = {"event", "enforcement"}


def _scans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _scans(child)


def _seq_scans(explained: Any) -> list[str]:
    doc = json.loads(explained) if isinstance(explained, str) else explained
    bad = []
    for node in _scans(doc[0]["Plan"]):
        relation = node.get("Relation Name", "")
        if node["Node Type"] == "Seq Scan" and (relation in BIG_TABLES or relation.startswith("_hyper_")):
            bad.append(relation)
    return bad


async def _explain_custom(conn: asyncpg.Connection, sql: str, args: Sequence[Any]) -> Any:
    return await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)


def _combinations(filters: dict[str, Any]) -> Iterator[dict[str, Any]]:
    names = list(filters)
    for n in range(len(names) + 1):
        for chosen in itertools.combinations(names, n):
            yield {k: filters[k] for k in chosen}


@pytest.fixture
async def shape(db_url: str) -> read.Shape:
    return await read.load(db_url, EVENTS)


async def test_list_queries_use_indexes(shape: read.Shape, conn: asyncpg.Connection) -> None:
    middle = EVENTS // 2
    token = encode_token(shape.created(middle), middle)
    window = {
        "created_from": shape.start + timedelta(days=5),
        "created_to": shape.start + timedelta(days=25),
    }
    event_filters = {
        "trigger_ref": read.TRIGGERS[1],
        "source_ref": read.SOURCES[2],
        "rule_ref": read.TARGETED_RULE,
        **window,
    }
    enforcement_filters = {
        "rule_ref": read.RULES[3],
        "event": middle,
        "status": "disabled",
        "trigger_ref": read.TRIGGERS[1],
        **window,
    }
    cases: list[tuple[str, str, Sequence[Any]]] = []
    for filters in _combinations(event_filters):
        for tok in ("", token):
            sql, args = await list_events_sql(100, tok, **filters)
            cases.append((f"ListEvents {sorted(filters)} token={bool(tok)}", sql, args))
    for filters in _combinations(enforcement_filters):
        for tok in ("", token):
            sql, args = await list_enforcements_sql(100, tok, **filters)
            cases.append((f"ListEnforcements {sorted(filters)} token={bool(tok)}", sql, args))
    # Every status the filter can take, alone: 'created' is rare, 'processed' most rows.
    for status in ("created", "processed"):
        sql, args = await list_enforcements_sql(100, "", status=status)
        cases.append((f"ListEnforcements status={status}", sql, args))

    # The control: with this much data, a filter no index serves is a sequential scan, which
    # this check sees.
    control = "SELECT id FROM enforcement WHERE payload->>'host' = $1"
    # On TimescaleDB the scan is reported per chunk of the hypertable.
    scanned = _seq_scans(await _explain_custom(conn, control, ["web-2"]))
    assert scanned and all(r == "enforcement" or r.startswith("_hyper_") for r in scanned), scanned

    # A chunk of a few hundred rows (the newest day's, on TimescaleDB) is read whole faster than
    # through an index, and PostgreSQL 17 plans it so: only larger relations must use an index.
    rows = {
        r["relname"]: r["reltuples"]
        for r in await conn.fetch("SELECT relname, reltuples FROM pg_class WHERE relname LIKE '\\_hyper\\_%'")
    }

    def big(relations: list[str]) -> list[str]:
        return [r for r in relations if rows.get(r, SMALL_CHUNK) >= SMALL_CHUNK]

    failures = []
    for name, sql, args in cases:
        if bad := big(_seq_scans(await _explain_custom(conn, sql, args))):
            failures.append(f"{name} (custom plan): Seq Scan on {bad}")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        try:
            if bad := big(_seq_scans(await explain_prepared(conn, sql, args))):
                failures.append(f"{name} (generic plan): Seq Scan on {bad}")
        finally:
            await conn.execute("RESET plan_cache_mode")
    assert len(cases) == 2 * 2**5 + 2 * 2**6 + 2
    assert not failures, "\n".join(failures)


def _index_names(explained: Any) -> set[str]:
    doc = json.loads(explained) if isinstance(explained, str) else explained
    return {node["Index Name"] for node in _scans(doc[0]["Plan"]) if "Index Name" in node}


async def test_payload_search_is_answered_by_the_payload_index(shape: read.Shape, conn: asyncpg.Connection) -> None:
    """ListEvents' payload_contains: a search for one repository of read.REPOS (50 of 50,000
    events, spread over the range) reads the GIN index of migration 0021 (on TimescaleDB, each
    chunk's copy of it), alone and with the other filters, a page token or a time window, with
    the settings the store runs a search under (``SEARCH``: custom plans) and with the values
    bound; no filter combination scans the table.

    The control: the generic plan the api's other lists run under walks the created index and
    filters every payload (it cannot know that the value is rare), which is why searches are
    planned with their values."""
    middle = EVENTS // 2
    token = encode_token(shape.created(middle), middle)
    rare = json.dumps({"repo": {"name": read.repo_of(7)}})
    window = {"created_from": shape.start + timedelta(days=5), "created_to": shape.start + timedelta(days=25)}
    others: list[dict[str, Any]] = [{}, {"trigger_ref": read.TRIGGERS[3]}, {"source_ref": read.SOURCES[1]}, window]
    # As in test_list_queries_use_indexes: a chunk of a few hundred rows may be read whole.
    rows = {
        r["relname"]: r["reltuples"]
        for r in await conn.fetch("SELECT relname, reltuples FROM pg_class WHERE relname LIKE '\\_hyper\\_%'")
    }
    hypertable = bool(rows)
    failures = []
    checked = 0
    for filters in others:
        for tok in ("", token):
            sql, args = await list_events_sql(100, tok, payload_contains=rare, **filters)
            assert "payload @>" in sql
            name = f"payload_contains + {sorted(filters)} token={bool(tok)}"
            for plan in ("bound", "the store's"):
                if plan == "bound":
                    explained = await _explain_custom(conn, sql, args)
                else:
                    # As the store runs it: its session's generic-plan setting, then SEARCH.
                    async with conn.transaction():
                        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                        await conn.execute(SEARCH)
                        explained = await explain_prepared(conn, sql, args)
                checked += 1
                used = _index_names(explained)
                # On TimescaleDB a chunk of this fixture's size (~1,600 rows) may be walked in
                # time order instead: 2.19's planner (the Apache edition's stand-in image) does
                # so for the unfiltered first page; 2.28's reads the payload index.
                walked = {i.removesuffix("_event_created_idx") for i in used if i.endswith("_event_created_idx")}
                small = hypertable and walked and all(rows.get(c, SMALL_WALK) < SMALL_WALK for c in walked)
                if not any(i.endswith("event_payload_path_idx") for i in used) and not small:
                    failures.append(f"{name} ({plan} plan): indexes {sorted(used)}, not the payload index")
                if bad := [r for r in _seq_scans(explained) if rows.get(r, SMALL_CHUNK) >= SMALL_CHUNK]:
                    failures.append(f"{name} ({plan} plan): Seq Scan on {bad}")
    # The control, on plain PostgreSQL: what the generic plan would have done.
    if not hypertable:
        sql, args = await list_events_sql(100, "", payload_contains=rare)
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        try:
            assert _index_names(await explain_prepared(conn, sql, args)) == {"event_created_idx"}
        finally:
            await conn.execute("RESET plan_cache_mode")
    # The count of a search (count_matching) reads the same index.
    count_sql = "SELECT count(*) FROM (SELECT 1 FROM event WHERE payload @> $1::text::jsonb LIMIT 1001) m"
    if not any(
        i.endswith("event_payload_path_idx") for i in _index_names(await _explain_custom(conn, count_sql, [rare]))
    ):
        failures.append("the count of a search does not read the payload index")
    assert checked == 16
    assert not failures, "\n".join(failures)


# ---- TimescaleDB: a list page must not visit every chunk ---------------------------------------

STEADY_EVENTS = 9_000  # 100 a day over 90 days: every day a chunk, 83 of them compressed
MOST_CHUNKS = 8
"""Chunk scans one page of 100 may run; every filter below matches well over 12 rows a day."""


def _executed_chunks(plan: dict[str, Any]) -> list[str]:
    """The chunks whose scan ran (nodes excluded at startup are absent; others never ran)."""
    return [
        node["Relation Name"]
        for node in _scans(plan)
        if node.get("Relation Name", "").startswith("_hyper_") and node.get("Actual Loops", 0) > 0
    ]


def _sorted_decompressions(plan: dict[str, Any]) -> list[str]:
    """Compressed chunks decompressed whole and then sorted (instead of merged in order)."""
    return [
        child.get("Relation Name", "?")
        for node in _scans(plan)
        if node["Node Type"] == "Sort" and node.get("Actual Loops", 0) > 0
        for child in node.get("Plans", [])
        if child.get("Custom Plan Provider") in ("ColumnarScan", "DecompressChunk")
    ]


async def _edition(db_url: str) -> str:
    conn = await asyncpg.connect(db_url)
    try:
        return str(await conn.fetchval("SHOW timescaledb.license"))
    finally:
        await conn.close()


@pytest.mark.timescale
async def test_list_pages_on_90_chunks_visit_few_of_them(db_url: str) -> None:
    """The api's generic plans (its session settings) on 90 one-day chunks, 83 compressed by the
    project's own policy: a first page, a page deep in the compressed range and a page inside a
    time window each run a handful of chunk scans. Without the plain bound on ``created`` that
    the keyset condition carries, a deep page ran one scan per chunk newer than its cursor; with
    the compressed order of 0005 ('created DESC, id'), each compressed chunk a page reached was
    decompressed whole and sorted (migration 0014 orders it as the lists do)."""
    from tools.bench import steady

    shape = await read.load(db_url, STEADY_EVENTS, days=steady.DAYS)
    await steady.run_policies(db_url)
    counts = await steady.chunk_counts(db_url)
    # The Apache-licensed edition has no compression: the same 90 chunks, none compressed, and
    # the same few chunk scans are expected of every page.
    compressed = 82 if await _edition(db_url) == "timescale" else 0
    assert counts["event"][0] >= 90 and counts["event"][1] >= compressed, counts
    assert counts["enforcement"][0] >= 90 and counts["enforcement"][1] >= compressed, counts

    deep = STEADY_EVENTS // 2  # 45 days back: compressed on the licensed edition
    token = encode_token(shape.created(deep), deep)
    window = {"created_from": shape.start + timedelta(days=20), "created_to": shape.start + timedelta(days=40)}
    event_filters: list[dict[str, Any]] = [
        {},
        {"trigger_ref": read.TRIGGERS[1]},
        {"source_ref": read.SOURCES[2]},
        {"rule_ref": read.TARGETED_RULE},
        window,
        {"trigger_ref": read.TRIGGERS[2], **window},
    ]
    enforcement_filters: list[dict[str, Any]] = [
        {},
        {"rule_ref": read.RULES[3]},
        {"status": "disabled"},
        {"trigger_ref": read.TRIGGERS[2]},
        window,
        {"rule_ref": read.RULES[5], "status": "processed"},
    ]
    conn = await asyncpg.connect(db_url, server_settings=PLANNER_SETTINGS)
    try:
        failures = []
        checked = 0
        for kind, filters_list in (("event", event_filters), ("enforcement", enforcement_filters)):
            capture = list_events_sql if kind == "event" else list_enforcements_sql
            for filters in filters_list:
                for tok in ("", token):
                    sql, args = await capture(100, tok, **filters)
                    doc = (await explain_prepared(conn, sql, args, analyze=True))[0]
                    ran = _executed_chunks(doc["Plan"])
                    checked += 1
                    if not ran or len(ran) > MOST_CHUNKS:
                        failures.append(f"{kind} {sorted(filters)} token={bool(tok)}: {len(ran)} chunk scans ran")
                    if sorts := _sorted_decompressions(doc["Plan"]):
                        failures.append(f"{kind} {sorted(filters)} token={bool(tok)}: sorted whole chunks {sorts}")
        assert checked == 24
        assert not failures, "\n".join(failures)
    finally:
        await conn.close()


@pytest.mark.timescale
async def test_get_by_id_on_90_chunks_searches_one_day(db_url: str) -> None:
    """GetEvent / GetEnforcement carry only an id. On 90 one-day chunks (83 compressed) the store
    first searches the chunk that the chunks' smallest ids place the id in (one day and an hour
    before it), then everywhere: a row stored with an explicit old ``created`` is found too."""
    from services.api.store import Store, create_pool
    from services.api.store._chunks import SLACK
    from tools.bench import steady

    shape = await read.load(db_url, STEADY_EVENTS, days=steady.DAYS)
    await steady.run_policies(db_url)
    store = Store(await create_pool(db_url, 1, 4))
    conn = await asyncpg.connect(db_url, server_settings=PLANNER_SETTINGS)
    try:
        for kind, repo in (("event", store.events), ("enforcement", store.enforcements)):
            for id_ in (2, STEADY_EVENTS // 2, STEADY_EVENTS - 1):
                if kind == "enforcement":
                    id_ *= 2
                bounds = await repo.by_id.finder.bounds(id_)
                assert bounds is not None, (kind, id_)
                row = await repo.get(id_)
                assert row.id == id_
                assert bounds[0] <= row.created < bounds[1], (kind, id_, bounds, row.created)
                assert bounds[1] - bounds[0] <= timedelta(days=1) + SLACK
                plan = (await explain_prepared(conn, repo.by_id.within, (id_, *bounds), analyze=True))[0]["Plan"]
                ran = _executed_chunks(plan)
                # The window is the id's chunk and the last SLACK of the one before it, when
                # there is one (id 2 lies in the first chunk): exactly the chunks it overlaps run.
                overlapped = await conn.fetchval(
                    "SELECT count(*) FROM timescaledb_information.chunks "
                    "WHERE hypertable_name = $1 AND range_start < $3 AND range_end > $2",
                    kind,
                    *bounds,
                )
                assert overlapped in (1, 2) and len(set(ran)) == overlapped, (kind, id_, bounds, ran)
            # The control: by id alone, every chunk is searched.
            [everywhere] = await explain_prepared(conn, repo.by_id.everywhere, (STEADY_EVENTS // 2,), analyze=True)
            assert len(_executed_chunks(everywhere["Plan"])) >= 80

        # Stored by SQL with an explicit created 40 days back, after every other row: its id
        # places it in the newest chunk, where it is not, and the search everywhere finds it.
        odd = await conn.fetchval(
            "INSERT INTO event (trigger, trigger_ref, payload, created) "
            "SELECT trigger, trigger_ref, payload, now() - interval '40 days' FROM event WHERE id = 1 RETURNING id"
        )
        assert odd > STEADY_EVENTS
        bounds = await store.events.by_id.finder.bounds(odd)
        assert bounds is not None and bounds[0] > shape.created(STEADY_EVENTS) - timedelta(days=2)
        found = await store.events.get(odd)
        assert found.id == odd and found.created < bounds[0]
    finally:
        await conn.close()
        await store.close()
