"""WebhookService: deliveries the web service received at POST /webhooks/{key}.

The api owns webhook secrets: it finds the trigger by the key, checks the signature against
the raw body itself (constant time), and stores the event through EventService's own path,
so a delivery is matched, stored and handed off exactly as CreateEvent's events are. The web
service only answers the sender once this call has returned, that is after the commit.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from datetime import UTC, datetime
from typing import Any

from services.api import validate
from services.api._rpc import rpc
from services.api.auth import Unauthenticated
from services.api.servicers.events import EventService
from services.api.servicers.requests import Context
from services.api.store import NewEvent, Store
from shared import limits
from shared.errors import NotFound, Violations
from shared.gen.automation.v1 import webhook_pb2, webhook_pb2_grpc

log = logging.getLogger(__name__)

KEY = re.compile(r"wh_[0-9a-f]{32}")
SIGNATURE_HEADERS = ("x-hub-signature-256", "x-signature")
NEVER_STORED = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-hub-signature",
        "x-hub-signature-256",
        "x-signature",
        "x-gitlab-token",
        "x-api-key",
    }
)
"""Headers that carry credentials or signatures: used to verify, never stored."""
_HEADERS_KEPT_BYTES = 32 * 1024
"""Header text kept in an event's config, at most (config is bounded at 64 KiB)."""
_UNKNOWN = "no enabled webhook has this key"


def signature_of(secret: str, body: bytes) -> str:
    """The signature a sender puts in X-Hub-Signature-256: ``sha256=`` and the hex HMAC."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookService(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(self, store: Store, events: EventService) -> None:
        self._store = store
        self._events = events

    @rpc
    async def DeliverWebhook(
        self, request: webhook_pb2.DeliverWebhookRequest, context: Context
    ) -> webhook_pb2.DeliverWebhookResponse:
        if not KEY.fullmatch(request.key):
            raise NotFound(_UNKNOWN)
        v = Violations()
        if len(request.body) > limits.MAX_WEBHOOK_BODY_BYTES:
            v.add("body", f"must be at most {limits.MAX_WEBHOOK_BODY_BYTES:,} bytes, got {len(request.body):,}")
        if len(request.headers) > limits.MAX_WEBHOOK_HEADERS:
            v.add("headers", f"may hold at most {limits.MAX_WEBHOOK_HEADERS}, got {len(request.headers)}")
        for i, h in enumerate(request.headers[: limits.MAX_WEBHOOK_HEADERS]):
            validate.text(v, f"headers[{i}].name", h.name, limits.MAX_LABEL, required=True)
            validate.text(v, f"headers[{i}].value", h.value, limits.MAX_WEBHOOK_HEADER_VALUE)
        validate.text(v, "source_ip", request.source_ip, limits.MAX_LABEL)
        validate.text(v, "delivery_id", request.delivery_id, limits.MAX_DELIVERY_ID)
        payload = validate.json_object(v, "payload", request.payload, limits.MAX_PAYLOAD_BYTES)
        v.raise_if_any()

        hook = await self._store.rules.webhook(request.key)
        if not hook.enabled:
            raise NotFound(_UNKNOWN)  # the same answer as an unknown key: nothing to probe
        headers = {h.name.lower(): h.value for h in request.headers}
        verified = False
        if hook.secret is not None:
            given = next((headers[name] for name in SIGNATURE_HEADERS if name in headers), "")
            if not given:
                log.warning(
                    "webhook of %s refused: the delivery is not signed",
                    hook.trigger_ref,
                    extra={"trigger_ref": hook.trigger_ref},
                )
                raise Unauthenticated("the delivery is not signed (X-Hub-Signature-256)", reason="WEBHOOK_SIGNATURE")
            expected = signature_of(hook.secret, request.body)
            if not hmac.compare_digest(expected.encode(), given.strip().lower().encode()):
                log.warning(
                    "webhook of %s refused: the signature does not match the body",
                    hook.trigger_ref,
                    extra={"trigger_ref": hook.trigger_ref},
                )
                raise Unauthenticated("the signature does not match the body", reason="WEBHOOK_SIGNATURE")
            verified = True

        new = NewEvent(
            trigger_ref=hook.trigger_ref,
            payload=payload,
            config=_config(request, headers, verified),
            source_ref="webhook",
            request_id=f"webhook:{hook.trigger_id}:{request.delivery_id}" if request.delivery_id else None,
            config_in_fingerprint=False,
        )
        result = await self._events.create_one(new)
        return webhook_pb2.DeliverWebhookResponse(
            event_id=result.event.id,
            enforcement_ids=[e.id for e in result.enforcements],
            trigger_ref=hook.trigger_ref,
            replayed=result.replayed,
            hmac_verified=verified,
        )


def _config(request: webhook_pb2.DeliverWebhookRequest, headers: dict[str, str], verified: bool) -> dict[str, Any]:
    """The event's config: where and how the delivery came, as the original system kept it."""
    kept: dict[str, str] = {}
    room = _HEADERS_KEPT_BYTES
    for name, value in sorted(headers.items()):
        if name in NEVER_STORED:
            continue
        room -= len(name) + len(value)
        if room < 0:
            break
        kept[name] = value
    return {
        "source": "webhook",
        "webhook_key": request.key,
        "received_at": datetime.now(UTC).isoformat(),
        "headers": kept,
        "source_ip": request.source_ip,
        "user_agent": headers.get("user-agent", ""),
        "hmac_verified": verified,
    }
