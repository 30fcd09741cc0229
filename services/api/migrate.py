"""The migration runner: ``python -m services.api migrate``.

Applies the numbered files of ``migrations/`` in order, each in its own transaction unless its
first line is ``-- migrate: no-transaction`` (for statements PostgreSQL or TimescaleDB refuse to
run in a transaction block, such as ``refresh_continuous_aggregate``). Every applied file is
recorded with its SHA-256 checksum; a file edited after it was applied stops the runner before
it changes anything. A session advisory lock makes concurrent runners (several api replicas
starting at once) take turns: the second finds nothing left to do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

# migrations/ beside the code (the repository, or /app in the image, where the project is
# installed in editable mode so the code runs from there whatever the working directory);
# MIGRATIONS_DIR names another place.
MIGRATIONS_DIR = Path(os.environ.get("MIGRATIONS_DIR") or Path(__file__).resolve().parents[2] / "migrations")
NO_TRANSACTION = "-- migrate: no-transaction"
LAYOUT = ("automation_timescaledb_layout()", "automation_timescaledb_recent_volume()")
"""Made by 0016 and 0023, called in this order after every run: the licensed TimescaleDB
layout, where it is missing."""
# Any fixed number serves, as long as nothing else in the database uses it.
_LOCK_KEY = 0x6D696772617465  # "migrate"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    checksum   TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""
_APPLIED = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
_RECORD = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"


# Earlier texts of applied migrations, still accepted: each later edit only added a branch for
# a case where the earlier text failed, so no database applied the earlier text in that case, and
# one that applied it is as migrated as with today's file. 0005 and 0014 gained their branches
# for TimescaleDB's Apache-licensed edition (the earlier texts failed there: "functionality not
# supported under the current apache license").
_EARLIER_CHECKSUMS = {
    (5, "953e374b732fff42018ff567d5aa6452e1b3d71a0d0db88cec708deffc84c9fc"),
    (14, "e4becb264416a968c38fc940bde30724ff749750ad02ca283069b60aca38c2ec"),
}


class MigrationError(RuntimeError):
    """The migrations on disk and in the database disagree."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        return not self.sql.lstrip().startswith(NO_TRANSACTION)


def load(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Reads the migration files, refusing stray names and duplicate versions."""
    if not directory.is_dir():
        raise MigrationError(f"no migrations directory at {directory} (set MIGRATIONS_DIR to where migrations/ is)")
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        version = int(m.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is used twice")
        found[version] = Migration(version, m.group(2), path.read_text())
    return [found[v] for v in sorted(found)]


_DOLLAR = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


def split_statements(sql: str) -> list[str]:
    """The statements of a script, split at semicolons outside quotes, comments and $$ bodies."""
    statements: list[str] = []
    start = i = 0
    n = len(sql)
    while i < n:
        ch = sql[i]
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif ch in "'\"":
            escapes = ch == "'" and i > 0 and sql[i - 1] in "eE"
            i += 1
            while i < n:
                if escapes and sql[i] == "\\":
                    i += 2
                    continue
                if sql[i] == ch:
                    if sql.startswith(ch, i + 1):
                        i += 2
                        continue
                    break
                i += 1
            i += 1
        elif (
            ch == "$" and (tag := _DOLLAR.match(sql, i)) and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_"))
        ):
            end = sql.find(tag.group(), tag.end())
            i = n if end < 0 else end + len(tag.group())
        elif ch == ";":
            statements.append(sql[start:i])
            i += 1
            start = i
        else:
            i += 1
    statements.append(sql[start:])
    return [s for s in statements if _has_code(s)]


def _has_code(statement: str) -> bool:
    text = re.sub(r"--[^\n]*|/\*.*?\*/", "", statement, flags=re.S)
    return bool(text.strip())


def _check_applied(migrations: list[Migration], applied: list[asyncpg.Record]) -> None:
    by_version = {m.version: m for m in migrations}
    for row in applied:
        m = by_version.get(row["version"])
        if m is None:
            raise MigrationError(
                f"the database has migration {row['version']:04d}_{row['name']} that is not on "
                "disk: this code is older than the database"
            )
        if m.checksum != row["checksum"] and (m.version, row["checksum"]) not in _EARLIER_CHECKSUMS:
            raise MigrationError(
                f"migration {m.version:04d}_{m.name}.sql was edited after it was applied "
                "(checksum differs); add a new migration instead of changing an applied one"
            )


async def pending(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, directory: Path = MIGRATIONS_DIR
) -> list[Migration]:
    """The migrations not yet applied; raises MigrationError when applied ones were edited."""
    migrations = load(directory)
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied = await conn.fetch(_APPLIED) if exists else []
    _check_applied(migrations, applied)
    done = {r["version"] for r in applied}
    return [m for m in migrations if m.version not in done]


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Applies every pending migration; returns those it applied (none when up to date)."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        todo = await pending(conn, directory)
        for m in todo:
            log.info("applying migration %04d_%s", m.version, m.name)
            if m.transactional:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(_RECORD, m.version, m.name, m.checksum)
            else:
                # Several statements sent in one query run as one implicit transaction, which
                # is what CREATE INDEX CONCURRENTLY and the like refuse: send them one by one.
                for statement in split_statements(m.sql):
                    await conn.execute(statement)
                await conn.execute(_RECORD, m.version, m.name, m.checksum)
        if not todo:
            log.info("migrations are up to date")
        for layout in LAYOUT:
            if await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", layout):
                # Idempotent, and a no-op but on a licensed TimescaleDB still in the Apache
                # layout: a database that moved edition after 0016 was applied is completed here.
                await conn.execute(f"SELECT {layout}")
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def migrate_url(url: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Connects to ``url`` and applies every pending migration."""
    conn = await asyncpg.connect(url)
    try:
        return await migrate(conn, directory)
    finally:
        await conn.close()
