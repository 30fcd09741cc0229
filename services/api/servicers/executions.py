"""ExecutionService: the executions resolutions requested."""

from __future__ import annotations

import logging

from services.api import convert, validate
from services.api._rpc import rpc
from services.api.servicers.requests import (
    Context,
    check_filters,
    page_of,
    status_filter,
    time_range_of,
)
from services.api.store import Store, page_size
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
        return convert.execution(await self._store.executions.get(validate.id_or_raise("id", request.id)))

    @rpc
    async def ListExecutions(
        self, request: execution_pb2.ListExecutionsRequest, context: Context
    ) -> execution_pb2.ListExecutionsResponse:
        check_filters(request, refs=("action_ref",), ids=("enforcement",))
        size = page_size(request.page_size)
        start, end = time_range_of("created", request.created)
        status = status_filter(request.status, convert.EXECUTION_STATUS_NAME)
        page = await self._store.executions.list(
            size,
            request.page_token,
            enforcement=request.enforcement if request.HasField("enforcement") else None,
            action_ref=request.action_ref,
            status=status,
            created_from=start,
            created_to=end,
        )
        executions, token = page_of(page, convert.execution)
        return execution_pb2.ListExecutionsResponse(executions=executions, next_page_token=token)
