"""The audit trail's servicer: ListAuditRecords, validated and paged as every other list is.

The records themselves are written by the store, in the transaction of each audited change,
with the ``Actor`` the servicers of those changes pass (``servicers.requests.actor_of_call``).
"""

from __future__ import annotations

from typing import Any

from services.api import convert
from services.api._rpc import rpc
from services.api.servicers.requests import Context, check_filters, page_of, shown_audit, time_range_of
from services.api.store import Page, Store, page_size
from services.api.store.audit import ENTITY_TYPES
from shared.errors import InvalidArgument, brief
from shared.gen.automation.v1 import audit_pb2, audit_pb2_grpc


class AuditService(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    @rpc
    async def ListAuditRecords(
        self, request: audit_pb2.ListAuditRecordsRequest, context: Context
    ) -> audit_pb2.ListAuditRecordsResponse:
        if request.entity_type and request.entity_type not in ENTITY_TYPES:
            raise InvalidArgument.one(
                "entity_type", f"must be empty or one of {', '.join(ENTITY_TYPES)} (got {brief(request.entity_type)})"
            )
        check_filters(request, texts=("entity_ref", "principal", "rpc"), ids=("entity_id",))
        size = page_size(request.page_size)
        start, end = time_range_of("time", request.time)
        filters: dict[str, Any] = {
            "entity_type": request.entity_type,
            "entity_ref": request.entity_ref,
            "entity_id": request.entity_id if request.HasField("entity_id") else None,
            "principal": request.principal,
            "rpc": request.rpc,
            "time_from": start,
            "time_to": end,
        }
        page = await self._store.audit.list(size, request.page_token, **filters)
        page = Page(await shown_audit(self._store, page.items), page.next_token, page.token_after)
        records, token = page_of(page, convert.audit_record)
        response = audit_pb2.ListAuditRecordsResponse(records=records, next_page_token=token)
        if request.count_matching:
            counted = await self._store.audit.count(**filters)
            response.matching_count, response.matching_count_more = counted.n, counted.more
            response.matching_count_stopped = counted.stopped
        return response
