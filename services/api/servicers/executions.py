"""ExecutionService: the executions resolutions requested."""

from __future__ import annotations

import logging
from typing import Any

from services.api import convert, validate
from services.api._rpc import rpc
from services.api.servicers.requests import (
    Context,
    check_filters,
    may_reveal,
    page_of,
    shown_executions,
    status_filter,
    time_range_of,
)
from services.api.store import Page, Store, page_size
from shared.gen.automation.v1 import (
    execution_pb2,
    execution_pb2_grpc,
)

log = logging.getLogger(__name__)


class ExecutionService(execution_pb2_grpc.ExecutionServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    @rpc
    async def GetExecution(
        self, request: execution_pb2.GetExecutionRequest, context: Context
    ) -> execution_pb2.Execution:
        id_ = validate.id_or_raise("id", request.id)
        reveal = may_reveal(request.reveal)
        (execution,), revealed = await shown_executions(
            self._store, [await self._store.executions.get(id_)], reveal=reveal
        )
        await revealed.audit(self._store, (execution.id,))
        return convert.execution(execution)

    @rpc
    async def ListExecutions(
        self, request: execution_pb2.ListExecutionsRequest, context: Context
    ) -> execution_pb2.ListExecutionsResponse:
        check_filters(request, refs=("action_ref",), ids=("enforcement",))
        size = page_size(request.page_size)
        start, end = time_range_of("created", request.created)
        status = status_filter(request.status, convert.EXECUTION_STATUS_NAME)
        reveal = may_reveal(request.reveal)
        filters: dict[str, Any] = {
            "enforcement": request.enforcement if request.HasField("enforcement") else None,
            "action_ref": request.action_ref,
            "status": status,
            "created_from": start,
            "created_to": end,
        }
        page = await self._store.executions.list(size, request.page_token, **filters)
        items, revealed = await shown_executions(self._store, page.items, reveal=reveal)
        executions, token = page_of(Page(items, page.next_token, page.token_after), convert.execution)
        response = execution_pb2.ListExecutionsResponse(executions=executions, next_page_token=token)
        if request.count_matching:
            counted = await self._store.executions.count(**filters)
            response.matching_count, response.matching_count_more = counted.n, counted.more
            response.matching_count_stopped = counted.stopped
        await revealed.audit(self._store, (x.id for x in executions))
        return response
