"""Executions (read side; ResolveEnforcement creates them)."""

from __future__ import annotations

from datetime import datetime

from shared.errors import NotFound

from ._paging import Paged, Where
from .types import Execution, Page, columns

_EXECUTION = columns(Execution)


class Executions(Paged):
    """Reads executions."""

    async def get(self, id_: int) -> Execution:
        row = await self._read_fetchrow(f"SELECT {_EXECUTION} FROM execution WHERE id = $1", id_)
        if row is None:
            raise NotFound(f"execution {id_} not found")
        return Execution(*row)

    async def list(
        self,
        size: int,
        token: str,
        *,
        enforcement: int | None = None,
        action_ref: str = "",
        status: str = "",
        created_from: datetime | None = None,
        created_to: datetime | None = None,
    ) -> Page[Execution]:
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
        return await self._page(f"SELECT {_EXECUTION} FROM execution", where, token, size, Execution)
