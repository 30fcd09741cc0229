"""Executions (read side; ResolveEnforcement creates them)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from shared.errors import NotFound

from ._paging import Count, Paged, Where
from .types import JSON, Execution, Page, columns

_EXECUTION = columns(Execution)
# Enforcement ids come with the executions (no time bound is known: an enforcement may wait
# days for its resolution), so on TimescaleDB each chunk's primary key index is probed once.
_SOURCES = """
SELECT x.id, e.trigger_ref, e.payload, e.created
  FROM execution x JOIN enforcement e ON e.id = x.enforcement
 WHERE x.id = ANY($1::bigint[])"""


class Source(NamedTuple):
    """What an execution's config was rendered from: its enforcement's trigger, payload and
    time (which schema version masks it)."""

    trigger_ref: str
    payload: dict[str, JSON]
    created: datetime


class Executions(Paged):
    """Reads executions."""

    async def get(self, id_: int) -> Execution:
        row = await self._read_fetchrow(f"SELECT {_EXECUTION} FROM execution WHERE id = $1", id_)
        if row is None:
            raise NotFound(f"execution {id_} not found")
        return Execution(*row)

    def listing(
        self,
        *,
        enforcement: int | None = None,
        action_ref: str = "",
        status: str = "",
        created_from: datetime | None = None,
        created_to: datetime | None = None,
    ) -> Where:
        """The filters of the list (what its page tokens are bound to, and what a count counts)."""
        where = Where()
        if enforcement is not None:
            where.add("enforcement = {}", enforcement)
        if action_ref:
            where.add("action_ref = {}", action_ref)
        if status:
            where.add("status = {}::execution_status", status)
        if created_from is not None:
            where.add("created >= {}", created_from)
        if created_to is not None:
            where.add("created < {}", created_to)
        return where

    async def list(self, size: int, token: str, **filters: Any) -> Page[Execution]:
        """A page of executions, newest first; ``filters`` are those of ``listing``."""
        where = self.listing(**filters)
        return await self._page(f"SELECT {_EXECUTION} FROM execution", where, token, size, Execution)

    async def count(self, **filters: Any) -> Count:
        """How many executions match ``filters`` (those of ``listing``), at most MAX_COUNT."""
        return await self._count("execution", self.listing(**filters))

    async def sources(self, ids: Sequence[int]) -> dict[int, Source]:
        """By execution id, what each of ``ids`` was rendered from: one statement for a page
        (on the primary: an execution read there has its enforcement there). An execution
        whose enforcement is gone (retention, or none) is not in the answer."""
        if not ids:
            return {}
        rows = await self._fetch(_SOURCES, sorted(set(ids)))
        return {row["id"]: Source(row["trigger_ref"], row["payload"], row["created"]) for row in rows}
