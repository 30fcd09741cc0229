"""AnalyticsService: event and enforcement volume over time."""

from __future__ import annotations

import logging

from services.api import convert
from services.api._rpc import rpc
from services.api.servicers.requests import (
    Context,
    check_filters,
    status_filter,
    volume_range,
    volume_width,
)
from services.api.store import Store
from shared.gen.automation.v1 import (
    analytics_pb2,
    analytics_pb2_grpc,
)

log = logging.getLogger(__name__)


class AnalyticsService(analytics_pb2_grpc.AnalyticsServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    @rpc
    async def QueryEventVolume(
        self, request: analytics_pb2.QueryEventVolumeRequest, context: Context
    ) -> analytics_pb2.QueryEventVolumeResponse:
        check_filters(request, refs=("trigger_ref",))
        start, end = volume_range(request.range)
        width = volume_width(request.bucket_hours)
        rows = await self._store.analytics.event_volume(start, end, request.trigger_ref, width)
        response = analytics_pb2.QueryEventVolumeResponse()
        convert.fill_event_volume(response.buckets, rows)
        return response

    @rpc
    async def QueryEnforcementVolume(
        self, request: analytics_pb2.QueryEnforcementVolumeRequest, context: Context
    ) -> analytics_pb2.QueryEnforcementVolumeResponse:
        check_filters(request, refs=("rule_ref",))
        start, end = volume_range(request.range)
        width = volume_width(request.bucket_hours)
        status = status_filter(request.status, convert.ENFORCEMENT_STATUS_NAME)
        rows = await self._store.analytics.enforcement_volume(start, end, request.rule_ref, status, width)
        response = analytics_pb2.QueryEnforcementVolumeResponse()
        convert.fill_enforcement_volume(response.buckets, rows)
        return response
