"""The audit trail (``audit_log``): who changed what through the api, when, and by which RPC.

A record is written by ``record`` on the connection of the change it describes, inside that
change's transaction, so that both commit or neither does: the repositories that change
audited things (``rules``, ``dispatch``, tokens) call it with the ``Actor`` their servicer
passes. Without an actor (code that calls the store directly) nothing is recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import asyncpg

from ._db import Connection, guarded
from ._paging import Count, Paged, Where
from .types import JSON, Actor, AuditRecord, Page, columns

ENTITY_TYPES = ("enforcement", "event", "execution", "rule", "token", "trigger")
"""What the trail records changes of (the CHECK of ``audit_log.entity_type``)."""

_RECORD = columns(AuditRecord)
# The change goes as text and is cast: the statement works on any connection, with or without
# the pool's JSON codecs.
_INSERT = """
INSERT INTO audit_log (principal, rpc, entity_type, entity_id, entity_ref, change)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb)"""


async def record(
    conn: Connection | asyncpg.Pool,
    actor: Actor,
    entity_type: str,
    entity_id: int | None,
    entity_ref: str | None,
    change: Mapping[str, JSON],
) -> None:
    """Writes one audit record. Give the connection whose transaction makes the change: the
    record then commits with it or not at all (given the pool, it commits on its own)."""
    if entity_type not in ENTITY_TYPES:
        raise ValueError(f"audit records are of {', '.join(ENTITY_TYPES)}, not {entity_type!r}")
    async with guarded():
        await conn.execute(
            _INSERT,
            actor.principal,
            actor.rpc,
            entity_type,
            entity_id,
            entity_ref,
            json.dumps(dict(change), separators=(",", ":")),
        )


def created(row: object, names: Iterable[str]) -> dict[str, JSON]:
    """The change of a create: the named fields of the created row."""
    return {name: getattr(row, name) for name in names}


def updated(old: object, new: object, names: Iterable[str]) -> dict[str, JSON]:
    """The change of an update: ``{"field": {"old": .., "new": ..}}`` of the named fields whose
    stored value differs."""
    out: dict[str, JSON] = {}
    for name in names:
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            out[name] = {"old": before, "new": after}
    return out


class Audit(Paged):
    """Reads the audit trail; ``record`` writes it."""

    record = staticmethod(record)

    async def revealed(self, actor: Actor, entity_type: str, ids: list[int]) -> None:
        """Records that a read showed the secret values of these events or enforcements in
        clear: one record per read, before the read answers (so no reveal goes unrecorded)."""
        await record(self._pool, actor, entity_type, None, None, {"revealed": ids})

    def listing(
        self,
        *,
        entity_type: str = "",
        entity_ref: str = "",
        entity_id: int | None = None,
        principal: str = "",
        rpc: str = "",
        time_from: datetime | None = None,
        time_to: datetime | None = None,
    ) -> Where:
        """The filters of the list (what its page tokens are bound to, and what a count
        counts); every given filter must hold."""
        where = Where()
        if entity_type:
            where.add("entity_type = {}", entity_type)
        if entity_ref:
            where.add("entity_ref = {}", entity_ref)
        if entity_id is not None:
            where.add("entity_id = {}", entity_id)
        if principal:
            where.add("principal = {}", principal)
        if rpc:
            where.add("rpc = {}", rpc)
        if time_from is not None:
            where.add("time >= {}", time_from)
        if time_to is not None:
            where.add("time < {}", time_to)
        return where

    async def list(self, size: int, token: str, **filters: Any) -> Page[AuditRecord]:
        """A page of records, newest first; ``filters`` are those of ``listing``."""
        where = self.listing(**filters)
        return await self._page(f"SELECT {_RECORD} FROM audit_log", where, token, size, AuditRecord, "time")

    async def count(self, **filters: Any) -> Count:
        """How many records match ``filters`` (those of ``listing``), at most MAX_COUNT."""
        return await self._count("audit_log", self.listing(**filters))
