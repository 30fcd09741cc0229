"""HistoryService: the recorded changes of executions and workers."""

from __future__ import annotations

import logging

from services.api import convert, validate
from services.api._rpc import rpc
from services.api.servicers.requests import (
    Context,
    may_reveal,
    page_of,
    shown_history,
    time_range_of,
)
from services.api.store import Page, Store, page_size
from services.api.store.history import TABLES as HISTORY_TABLES
from shared import limits
from shared.errors import (
    Violations,
    brief,
)
from shared.gen.automation.v1 import (
    history_pb2,
    history_pb2_grpc,
)

log = logging.getLogger(__name__)


class HistoryService(history_pb2_grpc.HistoryServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    @rpc
    async def ListHistory(
        self, request: history_pb2.ListHistoryRequest, context: Context
    ) -> history_pb2.ListHistoryResponse:
        v = Violations()
        if request.entity_type not in HISTORY_TABLES:
            v.add(
                "entity_type",
                f"only {' and '.join(sorted(HISTORY_TABLES))} have history (got {brief(request.entity_type)})",
            )
        validate.text(v, "changed_field", request.changed_field, limits.MAX_FILTER_TEXT)
        if request.operation and request.operation not in ("INSERT", "UPDATE", "DELETE"):
            v.add("operation", "must be INSERT, UPDATE or DELETE")
        if request.HasField("entity_id") and request.entity_id <= 0:
            v.add("entity_id", "must be a positive id")
        v.raise_if_any()
        reveal = may_reveal(request.reveal)
        size = page_size(request.page_size)
        start, end = time_range_of("time", request.time)
        page = await self._store.history.list(
            request.entity_type,
            size,
            request.page_token,
            entity_id=request.entity_id if request.HasField("entity_id") else None,
            operation=request.operation,
            changed_field=request.changed_field,
            time_from=start,
            time_to=end,
        )
        items, revealed = await shown_history(self._store, request.entity_type, page.items, reveal=reveal)
        records, token = page_of(Page(items, page.next_token, page.token_after), convert.history)
        await revealed.audit(self._store, (r.entity_id for r in records))
        return history_pb2.ListHistoryResponse(records=records, next_page_token=token)
