"""The migration runner and the schema it produces, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from services.api import migrate
from services.api.migrate import MigrationError

ALL = migrate.load()


async def _rows(url: str) -> list[tuple[int, str, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
        return [(r["version"], r["name"], r["checksum"]) for r in rows]
    finally:
        await conn.close()


async def _fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _copy_with(tmp_path: Path, extra: dict[str, str]) -> Path:
    """A migrations directory holding the real files plus ``extra`` ones."""
    directory = tmp_path / "migrations"
    directory.mkdir()
    for path in migrate.MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(path, directory / path.name)
    for name, sql in extra.items():
        (directory / name).write_text(sql)
    return directory


async def test_applies_every_migration_to_an_empty_database(empty_db_url: str) -> None:
    applied = await migrate.migrate_url(empty_db_url)
    assert [m.version for m in applied] == [m.version for m in ALL]
    assert [m.version for m in ALL] == list(range(1, 24))
    assert await _rows(empty_db_url) == [(m.version, m.name, m.checksum) for m in ALL]
    assert await _fetchval(empty_db_url, "SELECT to_regclass('enforcement') IS NOT NULL") is True


async def test_earlier_texts_of_the_edition_migrations_count_as_applied(empty_db_url: str) -> None:
    """0005 and 0014 gained branches for TimescaleDB's Apache edition (where their earlier texts
    failed): a database that applied an earlier text is up to date, not "edited"."""
    await migrate.migrate_url(empty_db_url)
    conn = await asyncpg.connect(empty_db_url)
    try:
        for version, checksum in sorted(migrate._EARLIER_CHECKSUMS):
            await conn.execute("UPDATE schema_migrations SET checksum = $2 WHERE version = $1", version, checksum)
        assert await migrate.pending(conn) == []
        await conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 5")
        with pytest.raises(MigrationError, match=r"0005_timescaledb\.sql was edited"):
            await migrate.pending(conn)
    finally:
        await conn.close()


def test_a_missing_migrations_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match=r"no migrations directory at .*MIGRATIONS_DIR"):
        migrate.load(tmp_path / "nowhere")


async def test_reapplying_is_a_no_op(empty_db_url: str) -> None:
    await migrate.migrate_url(empty_db_url)
    before = await _rows(empty_db_url)
    assert await migrate.migrate_url(empty_db_url) == []
    assert await _rows(empty_db_url) == before


async def test_pending_lists_only_unapplied_migrations(empty_db_url: str, tmp_path: Path) -> None:
    await migrate.migrate_url(empty_db_url)
    directory = _copy_with(tmp_path, {"0100_extra.sql": "CREATE TABLE extra (x int);"})
    conn = await asyncpg.connect(empty_db_url)
    try:
        assert [m.version for m in await migrate.pending(conn, directory)] == [100]
        assert await migrate.pending(conn) == []
    finally:
        await conn.close()


async def test_edited_migration_stops_the_runner_before_it_changes_anything(empty_db_url: str, tmp_path: Path) -> None:
    await migrate.migrate_url(empty_db_url)
    conn = await asyncpg.connect(empty_db_url)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
    finally:
        await conn.close()
    before = await _rows(empty_db_url)
    directory = _copy_with(tmp_path, {"0100_extra.sql": "CREATE TABLE extra (x int);"})
    with pytest.raises(MigrationError, match=r"0001_core\.sql was edited after it was applied"):
        await migrate.migrate_url(empty_db_url, directory)
    assert await _rows(empty_db_url) == before
    assert await _fetchval(empty_db_url, "SELECT to_regclass('extra') IS NULL") is True


async def test_migration_missing_from_disk_is_refused(empty_db_url: str, tmp_path: Path) -> None:
    await migrate.migrate_url(empty_db_url)
    conn = await asyncpg.connect(empty_db_url)
    try:
        await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', 'abc')")
    finally:
        await conn.close()
    directory = _copy_with(tmp_path, {"0100_extra.sql": "CREATE TABLE extra (x int);"})
    with pytest.raises(MigrationError, match=r"9999_future that is not on disk"):
        await migrate.migrate_url(empty_db_url, directory)
    assert await _fetchval(empty_db_url, "SELECT to_regclass('extra') IS NULL") is True
    assert await _fetchval(empty_db_url, "SELECT count(*) FROM schema_migrations") == len(ALL) + 1


async def test_concurrent_runners_apply_each_migration_once(empty_db_url: str) -> None:
    first, second = await asyncio.gather(migrate.migrate_url(empty_db_url), migrate.migrate_url(empty_db_url))
    assert len(first) + len(second) == len(ALL)
    assert sorted(m.version for m in [*first, *second]) == [m.version for m in ALL]
    rows = await _rows(empty_db_url)
    assert [r[0] for r in rows] == [m.version for m in ALL]


async def test_no_transaction_migration_runs_statements_outside_a_transaction(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_table.sql").write_text("CREATE TABLE t (x int, y int);\n")
    (tmp_path / "0002_index.sql").write_text(
        "-- migrate: no-transaction\n"
        "-- Two statements; each must run on its own.\n"
        "CREATE INDEX CONCURRENTLY t_x_idx ON t (x);\n"
        "CREATE INDEX CONCURRENTLY t_y_idx ON t (y); -- trailing comment\n"
    )
    applied = await migrate.migrate_url(empty_db_url, tmp_path)
    assert [(m.version, m.transactional) for m in applied] == [(1, True), (2, False)]
    valid = await _fetchval(
        empty_db_url,
        "SELECT array_agg(c.relname::text ORDER BY c.relname) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 't'::regclass AND i.indisvalid",
    )
    assert valid == ["t_x_idx", "t_y_idx"]
    assert [r[0] for r in await _rows(empty_db_url)] == [1, 2]


async def test_failing_transactional_migration_leaves_nothing_half_written(empty_db_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (x int);\n")
    (tmp_path / "0002_broken.sql").write_text(
        "CREATE TABLE half (x int);\nINSERT INTO half VALUES (1);\nSELECT 1 / 0;\n"
    )
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate.migrate_url(empty_db_url, tmp_path)
    assert await _fetchval(empty_db_url, "SELECT to_regclass('half') IS NULL") is True
    assert await _fetchval(empty_db_url, "SELECT to_regclass('ok') IS NOT NULL") is True
    assert [r[0] for r in await _rows(empty_db_url)] == [1]
    # Fixed, it applies on the next run.
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE half (x int);\n")
    assert [m.version for m in await migrate.migrate_url(empty_db_url, tmp_path)] == [2]


@pytest.mark.parametrize("name", ["1_short.sql", "0001-dash.sql", "0001_Upper.sql"])
def test_badly_named_file_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"named NNNN_name\.sql"):
        migrate.load(tmp_path)


def test_duplicate_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 2;")
    with pytest.raises(MigrationError, match="version 1 is used twice"):
        migrate.load(tmp_path)


def test_split_statements_respects_quotes_comments_and_dollar_bodies() -> None:
    sql = (
        "-- migrate: no-transaction\n"
        "CREATE TABLE a (s text DEFAULT 'x;y''z');\n"
        '/* c; */ CREATE TABLE "odd;name" (x int);\n'
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; $body$;\n"
        "DO $$ BEGIN PERFORM 1; END $$;\n"
        "SELECT E'a\\';b';\n"
        "-- the end;\n"
    )
    statements = [s.strip() for s in migrate.split_statements(sql)]
    assert len(statements) == 5
    assert statements[0].endswith("CREATE TABLE a (s text DEFAULT 'x;y''z')")
    assert statements[1] == '/* c; */ CREATE TABLE "odd;name" (x int)'
    assert statements[2] == "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; $body$"
    assert statements[3] == "DO $$ BEGIN PERFORM 1; END $$"
    assert statements[4] == "SELECT E'a\\';b'"


# ---- the schema the migrations produce -----------------------------------------------------------


async def _columns(conn: asyncpg.Connection, relation: str) -> dict[str, tuple[str, bool]]:
    rows = await conn.fetch(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, NOT a.attnotnull AS nullable "
        "FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY a.attnum",
        relation,
    )
    return {r["attname"]: (r["type"], r["nullable"]) for r in rows}


@pytest.mark.parametrize(
    "table",
    [
        "trigger",
        "rule",
        "event",
        "enforcement",
        "execution",
        "worker",
        "execution_history",
        "worker_history",
        "schema_migrations",
        "enforcement_dispatch",
        "ingest_request",
        "api_secret",
        "api_token",
        "audit_log",
    ],
)
async def test_table_exists(conn: asyncpg.Connection, table: str) -> None:
    assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", table) == "r"


async def test_schema_migrations_columns(conn: asyncpg.Connection) -> None:
    assert list(await _columns(conn, "schema_migrations")) == ["version", "name", "checksum", "applied_at"]


async def test_api_secret_columns_and_key_length(conn: asyncpg.Connection) -> None:
    assert await _columns(conn, "api_secret") == {
        "name": ("text", False),
        "value": ("bytea", False),
        "created": ("timestamp with time zone", False),
    }
    # The migration leaves it empty: the api creates its key on first need.
    assert await conn.fetchval("SELECT count(*) FROM api_secret") == 0
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO api_secret (name, value) VALUES ('short', $1)", bytes(31))


async def test_audit_log_columns_and_constraints(conn: asyncpg.Connection) -> None:
    assert await _columns(conn, "audit_log") == {
        "id": ("bigint", False),
        "time": ("timestamp with time zone", False),
        "principal": ("text", False),
        "rpc": ("text", False),
        "entity_type": ("text", False),
        "entity_id": ("bigint", True),
        "entity_ref": ("text", True),
        "change": ("jsonb", False),
    }
    insert = "INSERT INTO audit_log (principal, rpc, entity_type, change) VALUES ('p', 'r', $1, $2::jsonb)"
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(insert, "worker", "{}")
    # 0019: reveals of events' secret fields are recorded; 0020: of executions'.
    await conn.execute(insert, "execution", '{"revealed": [1]}')
    await conn.execute(insert, "event", '{"revealed": [1]}')
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(insert, "rule", "[]")
    await conn.execute(insert, "rule", "{}")
    # Records are never changed.
    with pytest.raises(asyncpg.RestrictViolationError, match="cannot be changed"):
        await conn.execute("UPDATE audit_log SET principal = 'someone else'")


async def test_audit_log_indexes_serve_newest_first_lists(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("SELECT indexdef FROM pg_indexes WHERE tablename = 'audit_log' ORDER BY indexname")
    definitions = {r["indexdef"].split(" USING btree ")[1] for r in rows}
    assert definitions == {
        "(id)",
        '("time" DESC, id DESC)',
        '(entity_type, entity_ref, "time" DESC, id DESC)',
        '(principal, "time" DESC, id DESC)',
    }


@pytest.mark.parametrize("table", ["rule", "trigger"])
async def test_rules_and_triggers_name_who_changed_them_last(conn: asyncpg.Connection, table: str) -> None:
    assert (await _columns(conn, table))["updated_by"] == ("text", True)


async def test_event_has_no_updated_column(conn: asyncpg.Connection) -> None:
    columns = await _columns(conn, "event")
    assert "updated" not in columns
    assert set(columns) == {
        "id",
        "trigger",
        "trigger_ref",
        "config",
        "payload",
        "source",
        "source_ref",
        "rule",
        "rule_ref",
        "created",
        "reemit_of",
        # 0017: the schema version it was checked against, and its problems in 'warn' mode.
        "schema_version",
        "schema_errors",
    }


async def test_enforcement_has_resolved_at_and_no_updated_column(conn: asyncpg.Connection) -> None:
    columns = await _columns(conn, "enforcement")
    assert "updated" not in columns
    assert columns["resolved_at"] == ("timestamp with time zone", True)
    assert columns["created"] == ("timestamp with time zone", False)


@pytest.mark.parametrize("table", ["event", "enforcement"])
async def test_primary_key_is_id_and_created(conn: asyncpg.Connection, table: str) -> None:
    key = await conn.fetchval(
        "SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_constraint c "
        "CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord) "
        "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
        "WHERE c.conrelid = $1::regclass AND c.contype = 'p'",
        table,
    )
    assert key == ["id", "created"]


async def test_no_foreign_key_points_at_event_or_enforcement(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        "SELECT conname FROM pg_constraint WHERE contype = 'f' "
        "AND confrelid IN ('event'::regclass, 'enforcement'::regclass)"
    )
    assert rows == []
    # The soft references are plain BIGINT columns.
    assert (await _columns(conn, "enforcement"))["event"] == ("bigint", True)
    assert (await _columns(conn, "execution"))["enforcement"] == ("bigint", True)


@pytest.mark.parametrize(
    ("table", "column", "target"),
    [
        ("enforcement", "rule", "rule"),
        ("event", "trigger", "trigger"),
        ("event", "rule", "rule"),
        ("rule", "trigger", "trigger"),
    ],
)
async def test_foreign_keys_set_null_on_delete(conn: asyncpg.Connection, table: str, column: str, target: str) -> None:
    rows = await conn.fetch(
        "SELECT c.confrelid::regclass::text AS target, c.confdeltype::text AS on_delete FROM pg_constraint c "
        "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey) "
        "WHERE c.conrelid = $1::regclass AND c.contype = 'f' AND a.attname = $2",
        table,
        column,
    )
    assert [(r["target"], r["on_delete"]) for r in rows] == [(target, "n")]


async def test_resolved_at_check_exists(conn: asyncpg.Connection) -> None:
    definition = await conn.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'enforcement'::regclass AND conname = 'enforcement_resolved_at_iff_resolved'"
    )
    assert definition is not None
    assert "resolved_at IS NULL" in definition and "'created'" in definition


async def test_pending_index_is_partial_on_created_status(conn: asyncpg.Connection) -> None:
    definition = await conn.fetchval(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indexrelid = to_regclass('enforcement_pending_idx')"
    )
    assert definition is not None
    assert "WHERE (status = 'created'::enforcement_status)" in definition


async def test_volume_views_have_the_documented_columns(conn: asyncpg.Connection) -> None:
    assert list(await _columns(conn, "event_volume_hourly")) == ["bucket", "trigger_ref", "event_count"]
    assert list(await _columns(conn, "enforcement_volume_hourly")) == [
        "bucket",
        "rule_ref",
        "status",
        "enforcement_count",
    ]


async def test_no_history_tables_for_events_or_enforcements(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SELECT to_regclass('event_history')") is None
    assert await conn.fetchval("SELECT to_regclass('enforcement_history')") is None


async def test_0019_keeps_every_schema_version_from_the_ones_in_place(empty_db_url: str, tmp_path: Path) -> None:
    """Triggers defined before 0019 get their current schema as a version in effect since they
    were created; every later change of the schema (any writer) adds one; a delete keeps them."""
    before = tmp_path / "before"
    before.mkdir()
    for path in migrate.MIGRATIONS_DIR.glob("*.sql"):
        if int(path.name[:4]) < 19:
            shutil.copy(path, before / path.name)
    await migrate.migrate_url(empty_db_url, before)
    conn = await asyncpg.connect(empty_db_url)
    try:
        await conn.execute(
            "INSERT INTO trigger (ref, out_schema, created) VALUES ('a.b', '{\"x-secret\": false}', '2020-01-01+00')"
        )
        await migrate.migrate_url(empty_db_url)
        rows = "SELECT schema_version, out_schema::text, since FROM trigger_schema_version ORDER BY schema_version"
        (kept,) = await conn.fetch(rows)
        assert (kept[0], kept[1], kept[2].year) == (1, '{"x-secret": false}', 2020)
        await conn.execute("UPDATE trigger SET out_schema = '{}', schema_version = 2 WHERE ref = 'a.b'")
        await conn.execute("DELETE FROM trigger WHERE ref = 'a.b'")
        assert [(r[0], r[1]) for r in await conn.fetch(rows)] == [(1, '{"x-secret": false}'), (2, "{}")]
    finally:
        await conn.close()
