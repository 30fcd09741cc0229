"""CloudEventService: CloudEvents the web service received at POST /cloudevents/{key}.

The same path as a webhook delivery (``webhooks.py``): the trigger is found by its webhook key,
the request's signature is checked with the trigger's secret against the raw body, and the
events are stored through EventService's own batch path (all or nothing), answered after the
commit. What a CloudEvent becomes is ``services/api/cloudevents.py``'s one mapping; the key
chose the trigger, so a CloudEvent's ``type`` is kept in its config, not matched to a ref.
"""

from __future__ import annotations

from datetime import UTC, datetime

from services.api import cloudevents, validate
from services.api._rpc import rpc
from services.api.servicers.events import MAX_BATCH, EventService
from services.api.servicers.requests import Context
from services.api.servicers.webhooks import KEY, Checked, kept_headers, verify
from services.api.store import Store
from shared import limits
from shared.errors import InvalidArgument, NotFound, Violations
from shared.gen.automation.v1 import cloudevent_pb2, cloudevent_pb2_grpc

_UNKNOWN = "no enabled webhook has this key"
SOURCE = "cloudevents"
"""``config.source`` of an event that came by HTTP."""


class CloudEventService(cloudevent_pb2_grpc.CloudEventServiceServicer):
    def __init__(self, store: Store, events: EventService) -> None:
        self._store = store
        self._events = events

    @rpc
    async def DeliverCloudEvents(
        self, request: cloudevent_pb2.DeliverCloudEventsRequest, context: Context
    ) -> cloudevent_pb2.DeliverCloudEventsResponse:
        if not KEY.fullmatch(request.key):
            raise NotFound(_UNKNOWN)
        if not 1 <= len(request.events) <= MAX_BATCH:
            raise InvalidArgument.one("events", f"must hold 1 to {MAX_BATCH} events, got {len(request.events)}")
        v = Violations()
        if len(request.body) > limits.MAX_WEBHOOK_BODY_BYTES:
            v.add("body", f"must be at most {limits.MAX_WEBHOOK_BODY_BYTES:,} bytes, got {len(request.body):,}")
        if len(request.headers) > limits.MAX_WEBHOOK_HEADERS:
            v.add("headers", f"may hold at most {limits.MAX_WEBHOOK_HEADERS}, got {len(request.headers)}")
        for i, h in enumerate(request.headers[: limits.MAX_WEBHOOK_HEADERS]):
            validate.text(v, f"headers[{i}].name", h.name, limits.MAX_LABEL, required=True)
            validate.text(v, f"headers[{i}].value", h.value, limits.MAX_WEBHOOK_HEADER_VALUE)
        validate.text(v, "source_ip", request.source_ip, limits.MAX_LABEL)
        v.raise_if_any()

        hook = await self._store.rules.webhook(request.key)
        if not hook.enabled:
            raise NotFound(_UNKNOWN)  # the same answer as an unknown key: nothing to probe
        headers = {h.name.lower(): h.value for h in request.headers}
        checked = (
            verify(hook.trigger_ref, hook.secret, headers, request.body, {})
            if hook.secret is not None
            else Checked("", "")
        )
        received = {
            "source": SOURCE,
            "webhook_key": request.key,
            "received_at": datetime.now(UTC).isoformat(),
            "headers": kept_headers(headers),
            "source_ip": request.source_ip,
            "hmac_verified": bool(checked.scheme),
            "signature_scheme": checked.scheme,
        }
        new = [
            cloudevents.to_event(v, f"events[{i}]", ce, hook.trigger_ref, received)
            for i, ce in enumerate(request.events)
        ]
        v.raise_if_any()
        receipts = await self._events.create_batch([n for n in new if n is not None])
        return cloudevent_pb2.DeliverCloudEventsResponse(
            receipts=receipts,
            trigger_ref=hook.trigger_ref,
            hmac_verified=bool(checked.scheme),
            signature_scheme=checked.scheme,
        )
