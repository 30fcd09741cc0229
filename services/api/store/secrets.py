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
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.api import secrets

from ._db import Repo

# One row at least (the database's time), whether or not any ref has versions.
_VERSIONS = """
SELECT n.read_at, v.trigger_ref, v.trigger_id, v.schema_version, v.since
  FROM (SELECT now() AS read_at) n
  LEFT JOIN trigger_schema_version v ON v.trigger_ref = ANY($1::text[])
 ORDER BY v.trigger_ref, v.since, v.trigger_id, v.schema_version"""
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
"""Schema versions whose secret paths are kept, and refs whose version lists are; the least
recently used go first."""
SETTLED = timedelta(seconds=10)
"""A version row is visible this long after its ``since`` (the writing transaction's start):
the tails' own assumption (``servicers/tails.py`` WINDOW), as writes to ``trigger`` are single
statements bounded by the statement timeout. So a ref's version list read at database time T
holds every version that can mask a record stored before T - SETTLED."""
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
        # By ref: (settled before, its versions as (since, trigger id, version) by since).
        self._versions: OrderedDict[str, tuple[datetime, list[tuple[datetime, int, int]]]] = OrderedDict()
        self.reads = 0
        """Statements run so far (the bench's and the tests' measure of batching)."""

    async def secret_paths(self, keys: Sequence[Key]) -> list[Paths]:
        """The secret paths masking each record's payload (empty: nothing to mask).

        At most two statements for any number of records, and none for records stored more
        than SETTLED before a ref's version list was last read (cached) whose versions' paths
        are cached: a page, a batch of a tail, costs what one record does."""
        if not keys:
            return []
        stale = sorted({ref for ref, _v, created in keys if not self._settled(ref, created)})
        lists = {ref: self._versions[ref][1] for ref, _v, _c in keys if ref not in stale}
        if stale:
            self.reads += 1
            rows = await self._fetch(_VERSIONS, stale)
            read_at: datetime = rows[0]["read_at"]
            found: dict[str, list[tuple[datetime, int, int]]] = {ref: [] for ref in stale}
            for row in rows:
                if row["trigger_ref"] is not None:
                    found[row["trigger_ref"]].append((row["since"], row["trigger_id"], row["schema_version"]))
            for ref, versions in found.items():
                self._versions[ref] = (read_at - SETTLED, versions)
                self._versions.move_to_end(ref)
            while len(self._versions) > _MAX_CACHED:
                self._versions.popitem(last=False)
            lists.update(found)
        chosen = [_version(lists[ref], version, created) for ref, version, created in keys]
        known = {c: self._paths[c] for c in chosen if c is not None and c in self._paths}
        known.update(await self._load(sorted({c for c in chosen if c is not None and c not in known})))
        self._keep(known)
        return [known.get(c, ()) if c is not None else () for c in chosen]

    def _settled(self, ref: str, created: datetime) -> bool:
        """Whether the cached version list of ``ref`` holds every version that can mask a
        record stored at ``created``."""
        cached = self._versions.get(ref)
        return cached is not None and created < cached[0]

    async def marked(self, trigger_ref: str = "") -> Paths:
        """Every path any schema version of ``trigger_ref`` (empty: of any trigger, including
        deleted ones, whose events are still stored) marks secret."""
        versions = [(r["trigger_id"], r["schema_version"]) for r in await self._fetch(_MARKED, trigger_ref)]
        known = {v: self._paths[v] for v in versions if v in self._paths}
        known.update(await self._load(sorted({v for v in versions if v not in known})))
        self._keep(known)
        return tuple(dict.fromkeys(p for v in versions for p in known.get(v, ())))

    async def _load(self, missing: list[tuple[int, int]]) -> dict[tuple[int, int], Paths]:
        """The secret paths of these (trigger id, version)s, collected from their schemas."""
        if not missing:
            return {}
        self.reads += 1
        loaded: dict[tuple[int, int], Paths] = {}
        for row in await self._fetch(_SCHEMAS, [m[0] for m in missing], [m[1] for m in missing]):
            schema = row["out_schema"]
            if schema is None:
                paths: Paths = ()
            elif len(json.dumps(schema)) > _INLINE_BYTES:
                paths = await asyncio.to_thread(_collect, schema)
            else:
                paths = _collect(schema)
            loaded[(row["trigger_id"], row["schema_version"])] = paths
        return loaded

    def _keep(self, known: dict[tuple[int, int], Paths]) -> None:
        """Caches what a call used (most recently used last); answers come from ``known``, so
        an eviction here never unmasks what the call returns."""
        for c, paths in known.items():
            self._paths[c] = paths
            self._paths.move_to_end(c)
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
