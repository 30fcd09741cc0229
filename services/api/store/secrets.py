"""The secret paths of the schema versions that stored records were checked against (or that
were in effect when they were stored): what reads mask (``servicers/requests.py`` ``shown``).

Every version of every trigger's schema is kept in ``trigger_schema_version`` (migration 0019,
written by a trigger on ``trigger``, kept after the trigger is deleted). A version's paths are
collected from its schema once (``secrets.secret_paths``) and cached per (trigger id,
version): a version never changes. Which version masks a record:

- a record with a ``schema_version`` (an event checked in 'warn' or 'enforce' mode): that
  version of its trigger ref (of the incarnation in effect at its ``created``, should the ref
  have been deleted and defined again);
- otherwise (mode 'off', enforcements): the version in effect at its ``created``, and the
  oldest one known for a record older than all of them.
"""

from __future__ import annotations

import asyncio
import bisect
import json
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.api import secrets

from ._db import Repo

_VERSIONS = """
SELECT trigger_ref, trigger_id, schema_version, since FROM trigger_schema_version
 WHERE trigger_ref = ANY($1::text[]) ORDER BY trigger_ref, since, trigger_id, schema_version"""
_SCHEMAS = """
SELECT trigger_id, schema_version, out_schema FROM trigger_schema_version
 WHERE (trigger_id, schema_version) IN (SELECT * FROM unnest($1::bigint[], $2::int[]))"""
# Every version that marks anything secret, of one trigger ref or of all: a payload search
# must not probe any of them (search.py). The text test only narrows what is fetched; the
# paths are collected from the schemas as for masking.
_MARKED = """
SELECT trigger_id, schema_version FROM trigger_schema_version
 WHERE ($1::text = '' OR trigger_ref = $1) AND strpos(out_schema::text, 'x-secret') > 0"""
_MAX_CACHED = 4096
"""Schema versions whose secret paths are kept; the least recently used go first."""
_INLINE_BYTES = 4096
"""Schemas (JSON text) up to this size are walked on the event loop; larger ones in a thread."""

Key = tuple[str, int | None, datetime]
"""What a record is masked by: its trigger ref, the schema version it was checked against
(None: not checked) and when it was stored."""
Paths = tuple[secrets.Path, ...]


def _collect(schema: Any) -> Paths:
    # A stored schema compiled when it was stored; marks refused then cannot be here, and if
    # a later change of the rules refuses one, what was collected still masks.
    found, _problems = secrets.secret_paths(schema, "out_schema")
    return found


class SchemaVersions(Repo):
    """Secret paths by schema version."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self._paths: OrderedDict[tuple[int, int], Paths] = OrderedDict()

    async def secret_paths(self, keys: Sequence[Key]) -> list[Paths]:
        """The secret paths masking each record's payload (empty: nothing to mask)."""
        refs = sorted({k[0] for k in keys})
        if not refs:
            return []
        versions: dict[str, list[tuple[datetime, int, int]]] = {}
        for row in await self._fetch(_VERSIONS, refs):
            versions.setdefault(row["trigger_ref"], []).append((row["since"], row["trigger_id"], row["schema_version"]))
        if not versions:
            return [() for _ in keys]
        chosen = [_version(versions.get(ref, []), version, created) for ref, version, created in keys]
        await self._load(sorted({c for c in chosen if c is not None and c not in self._paths}))
        out: list[Paths] = []
        for c in chosen:
            paths = self._paths.get(c, ()) if c is not None else ()
            if c in self._paths:
                self._paths.move_to_end(c)  # type: ignore[arg-type]
            out.append(paths)
        return out

    async def marked(self, trigger_ref: str = "") -> Paths:
        """Every path any schema version of ``trigger_ref`` (empty: of any trigger, including
        deleted ones, whose events are still stored) marks secret."""
        versions = [(r["trigger_id"], r["schema_version"]) for r in await self._fetch(_MARKED, trigger_ref)]
        await self._load(sorted({v for v in versions if v not in self._paths}))
        return tuple(dict.fromkeys(p for v in versions for p in self._paths.get(v, ())))

    async def _load(self, missing: list[tuple[int, int]]) -> None:
        """Collects and caches the secret paths of these (trigger id, version)s."""
        if not missing:
            return
        rows = await self._fetch(_SCHEMAS, [m[0] for m in missing], [m[1] for m in missing])
        for row in rows:
            schema = row["out_schema"]
            if schema is None:
                found: Paths = ()
            elif len(json.dumps(schema)) > _INLINE_BYTES:
                found = await asyncio.to_thread(_collect, schema)
            else:
                found = _collect(schema)
            self._paths[(row["trigger_id"], row["schema_version"])] = found
        while len(self._paths) > _MAX_CACHED:
            self._paths.popitem(last=False)


def _version(rows: list[tuple[datetime, int, int]], version: int | None, created: datetime) -> tuple[int, int] | None:
    """The (trigger id, version) masking a record, of its ref's versions ordered by ``since``."""
    if not rows:
        return None
    candidates = rows if version is None else [r for r in rows if r[2] == version] or rows
    at = bisect.bisect_right([r[0] for r in candidates], created)
    _since, trigger_id, v = candidates[at - 1] if at else candidates[0]
    return trigger_id, v
