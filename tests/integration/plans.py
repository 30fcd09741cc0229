"""Plans of the store's statements as a prepared statement runs them.

EXPLAIN of a statement with bind parameters always plans it with their values; to see the plan
a prepared statement settles on (generic under ``plan_cache_mode = force_generic_plan``, which
the store's sessions set), the statement is PREPAREd and EXPLAINed as EXECUTE with literals.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg


def literal(value: Any) -> str:
    """``value`` as an SQL string literal (EXECUTE takes no bind parameters)."""
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text.replace("'", "''") + "'"


async def explain_prepared(
    conn: asyncpg.Connection, sql: str, args: Sequence[Any], *, analyze: bool = False
) -> list[dict[str, Any]]:
    """EXPLAIN (FORMAT JSON) of ``sql`` PREPAREd with its parameters' types and EXECUTEd with
    ``args``, under the connection's settings; with ``analyze``, run and measured."""
    stmt = await conn.prepare(sql)
    types = ", ".join(t.name if t.schema == "pg_catalog" else f"{t.schema}.{t.name}" for t in stmt.get_parameters())
    await conn.execute(f"PREPARE q ({types}) AS {sql}")
    try:
        options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
        explained = await conn.fetchval(f"EXPLAIN ({options}) EXECUTE q({', '.join(literal(a) for a in args)})")
    finally:
        await conn.execute("DEALLOCATE q")
    doc: list[dict[str, Any]] = json.loads(explained)
    return doc
