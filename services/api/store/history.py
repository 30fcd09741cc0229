"""History of executions and workers (written by database triggers, read here)."""

from __future__ import annotations

from datetime import datetime

from shared.errors import InvalidArgument

from ._paging import Paged, Where
from .types import HistoryRecord, Page, columns

# The entity types that have history, and their tables. Events never change and an
# enforcement changes once (resolved_at), so neither has history.
TABLES = {"execution": "execution_history", "worker": "worker_history"}
_RECORD = columns(HistoryRecord)


class History(Paged):
    """Reads history records."""

    async def list(
        self,
        entity_type: str,
        size: int,
        token: str,
        *,
        entity_id: int | None = None,
        operation: str = "",
        changed_field: str = "",
        time_from: datetime | None = None,
        time_to: datetime | None = None,
    ) -> Page[HistoryRecord]:
        table = TABLES.get(entity_type)
        if table is None:
            raise InvalidArgument.one(
                "entity_type", f"only {' and '.join(sorted(TABLES))} have history (got {entity_type!r})"
            )
        where = Where()
        if entity_id is not None:
            where.add("entity_id = {}", entity_id)
        if operation:
            where.add("operation = {}", operation)
        if changed_field:
            where.add("{} = ANY(changed_fields)", changed_field)
        if time_from is not None:
            where.add("time >= {}", time_from)
        if time_to is not None:
            where.add("time < {}", time_to)
        return await self._page(f"SELECT {_RECORD} FROM {table}", where, token, size, HistoryRecord, "time")
