"""WebhookService: deliveries the web service received at POST /webhooks/{key}.

The api owns webhook secrets: it finds the trigger by the key, checks the signature against
the raw body itself (constant time), and stores the event through EventService's own path,
so a delivery is matched, stored and handed off exactly as CreateEvent's events are. The web
service only answers the sender once this call has returned, that is after the commit.

Three signature schemes (README, Security):

- Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``; Svix's
  ``svix-*`` names too): ``v1,`` and the base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``.
- Stripe (``Stripe-Signature: t=...,v1=...``): the hex HMAC-SHA256 of ``{t}.{body}``.
- GitHub (``X-Hub-Signature-256``, or ``X-Signature`` in the same form): ``sha256=`` and the
  hex HMAC-SHA256 of the body alone.

The first two sign a timestamp: one outside ``TOLERANCE_S`` is refused, and inside it the
signed delivery id is the replay key. GitHub signs no timestamp, so its deliveries can only be
deduplicated by their (unsigned) delivery id. The replay cache is the ingest idempotency table
(``ingest_request``): the key is written by the event's own INSERT statement, so it holds
across replicas and restarts, and is kept ``REQUEST_ID_RETENTION_HOURS`` (at least 24 h, far
beyond the tolerance).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.api import validate
from services.api._rpc import rpc
from services.api.auth import Unauthenticated
from services.api.servicers import provenance
from services.api.servicers.events import EventService
from services.api.servicers.requests import Context
from services.api.store import NewEvent, Store
from shared import limits
from shared.errors import NotFound, Violations
from shared.gen.automation.v1 import webhook_pb2, webhook_pb2_grpc

log = logging.getLogger(__name__)

KEY = re.compile(r"wh_[0-9a-f]{32}")
TOLERANCE_S = 300
"""How far a signed timestamp may be from the api's clock, either way. Standard Webhooks and
Stripe both recommend 5 minutes: room for clock skew and a sender's queueing, while a captured
delivery stops being accepted soon after; inside the window its id is already stored."""
GITHUB_HEADERS = ("x-hub-signature-256", "x-signature")
STANDARD = "standard-webhooks"
STRIPE = "stripe"
GITHUB = "github"
STORED_HEADERS = frozenset(
    {
        "content-type",
        "user-agent",
        # GitHub, Gitea
        "x-github-event",
        "x-github-delivery",
        "x-github-hook-id",
        "x-github-hook-installation-target-id",
        "x-github-hook-installation-target-type",
        "x-gitea-event",
        "x-gitea-delivery",
        # GitLab
        "x-gitlab-event",
        "x-gitlab-event-uuid",
        "x-gitlab-webhook-uuid",
        "x-gitlab-instance",
        # Bitbucket
        "x-event-key",
        "x-request-uuid",
        "x-hook-uuid",
        # Standard Webhooks, Svix
        "webhook-id",
        "webhook-timestamp",
        "svix-id",
        "svix-timestamp",
        # Slack
        "x-slack-request-timestamp",
        "x-slack-retry-num",
        "x-slack-retry-reason",
        # generic
        "idempotency-key",
        "x-request-id",
    }
)
"""Headers kept in an event's config: an allow-list, because senders put credentials in
headers of every name (X-Auth-Token, Private-Token, X-Gitlab-Token, ...) and a deny-list
misses the next one; the config is shown to every viewer."""
_HEADERS_KEPT_BYTES = 32 * 1024
"""Header text kept in an event's config, at most (config is bounded at 64 KiB)."""
_UNKNOWN = "no enabled webhook has this key"


def signature_of(secret: str, body: bytes) -> str:
    """The signature a sender puts in X-Hub-Signature-256: ``sha256=`` and the hex HMAC."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def standard_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_`` and base64 is decoded (as the
    scheme's libraries do); any other secret is used as its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


def standard_signature_of(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """A ``webhook-signature`` value: ``v1,`` and the base64 HMAC of ``{id}.{timestamp}.{body}``."""
    mac = hmac.new(standard_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def stripe_signature_of(secret: str, timestamp: int, body: bytes) -> str:
    """A ``Stripe-Signature`` value: ``t=...,v1=`` and the hex HMAC of ``{t}.{body}`` (Stripe
    uses its ``whsec_`` secret as text)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


@dataclass(frozen=True, slots=True)
class Checked:
    """A delivery's verified signature: its scheme, and the id it is deduplicated by."""

    scheme: str
    delivery_id: str


def _refuse(trigger_ref: str, why: str) -> Unauthenticated:
    log.warning("webhook of %s refused: %s", trigger_ref, why, extra={"trigger_ref": trigger_ref})
    return Unauthenticated(why, reason="WEBHOOK_SIGNATURE")


def _fresh(trigger_ref: str, text: str, now: float) -> int:
    """The signed timestamp, refused when it is not a number or outside the tolerance."""
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise _refuse(trigger_ref, "the signed timestamp is not a number of seconds")
    stamp = int(text)
    if abs(now - stamp) > TOLERANCE_S:
        raise _refuse(
            trigger_ref,
            f"the signed timestamp is {int(now - stamp)} s from now; at most {TOLERANCE_S} s "
            "either way is accepted (replay protection: check the sender's clock)",
        )
    return stamp


def verify(trigger_ref: str, secret: str, headers: dict[str, str], body: bytes, payload: dict[str, Any]) -> Checked:
    """The delivery's signature under the first scheme whose headers it has; Unauthenticated
    (reason WEBHOOK_SIGNATURE) when none is there or it does not hold."""
    now = time.time()
    prefix = next((p for p in ("webhook-", "svix-") if f"{p}signature" in headers), None)
    if prefix is not None:
        msg_id = headers.get(f"{prefix}id", "")
        if not msg_id or len(msg_id) > limits.MAX_DELIVERY_ID or not msg_id.isprintable():
            raise _refuse(
                trigger_ref, f"{prefix}id must be given, printable, at most {limits.MAX_DELIVERY_ID} characters"
            )
        stamp = _fresh(trigger_ref, headers.get(f"{prefix}timestamp", ""), now)
        expected = standard_signature_of(secret, msg_id, stamp, body).encode()
        given = [s for s in headers[f"{prefix}signature"].split(" ") if s.startswith("v1,")]
        # Every candidate is compared: several are sent while a secret is being rotated.
        if not any([hmac.compare_digest(expected, s.encode()) for s in given]):
            raise _refuse(trigger_ref, "the signature does not match the id, timestamp and body")
        return Checked(STANDARD, msg_id)
    if "stripe-signature" in headers:
        items = [part.partition("=") for part in headers["stripe-signature"].split(",")]
        stamps = [v.strip() for k, _, v in items if k.strip() == "t"]
        if len(stamps) != 1:
            raise _refuse(trigger_ref, "Stripe-Signature must carry one t=")
        stamp = _fresh(trigger_ref, stamps[0], now)
        expected = stripe_signature_of(secret, stamp, body).partition(",v1=")[2].encode()
        given = [v.strip().lower() for k, _, v in items if k.strip() == "v1"]
        if not any([hmac.compare_digest(expected, s.encode()) for s in given]):
            raise _refuse(trigger_ref, "the signature does not match the timestamp and body")
        # Stripe retries an event with a new timestamp: its id (in the signed body) is what
        # repeats. A body without one is keyed by what was signed.
        event_id = payload.get("id")
        if isinstance(event_id, str) and event_id.startswith("evt_") and len(event_id) <= limits.MAX_DELIVERY_ID:
            return Checked(STRIPE, event_id)
        return Checked(STRIPE, f"t{stamp}.{hashlib.sha256(body).hexdigest()[:40]}")
    given_text = next((headers[name] for name in GITHUB_HEADERS if name in headers), "")
    if not given_text:
        raise _refuse(
            trigger_ref,
            "the delivery is not signed (webhook-signature, Stripe-Signature or X-Hub-Signature-256)",
        )
    if not hmac.compare_digest(signature_of(secret, body).encode(), given_text.strip().lower().encode()):
        raise _refuse(trigger_ref, "the signature does not match the body")
    # GitHub signs the body alone: the delivery id is the sender's word, used to deduplicate
    # redeliveries, not as replay protection.
    return Checked(GITHUB, "")


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
        if request.check_only:
            hook = await self._store.rules.webhook(request.key)
            if not hook.enabled:
                raise NotFound(_UNKNOWN)
            return webhook_pb2.DeliverWebhookResponse(
                trigger_ref=hook.trigger_ref, signature_required=hook.secret is not None
            )
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
        checked = (
            verify(hook.trigger_ref, hook.secret, headers, request.body, payload)
            if hook.secret is not None
            else Checked("", "")
        )
        delivery_id = checked.delivery_id or request.delivery_id
        if checked.scheme in (STANDARD, STRIPE):
            delivery_id = f"{checked.scheme}:{delivery_id}"
        new = NewEvent(
            trigger_ref=hook.trigger_ref,
            payload=payload,
            config=_config(request, headers, checked.scheme),
            source_ref=provenance.SOURCE_REF,
            request_id=f"{provenance.REQUEST_ID_PREFIX}{hook.trigger_id}:{delivery_id}" if delivery_id else None,
            config_in_fingerprint=False,
        )
        result = await self._events.create_one(new)
        return webhook_pb2.DeliverWebhookResponse(
            event_id=result.event.id,
            enforcement_ids=[e.id for e in result.enforcements],
            trigger_ref=hook.trigger_ref,
            replayed=result.replayed,
            hmac_verified=bool(checked.scheme),
            signature_scheme=checked.scheme,
            signature_required=hook.secret is not None,
        )


def kept_headers(headers: dict[str, str]) -> dict[str, str]:
    """The allow-listed headers of a delivery, at most ``_HEADERS_KEPT_BYTES`` of them."""
    kept: dict[str, str] = {}
    room = _HEADERS_KEPT_BYTES
    for name, value in sorted(headers.items()):
        if name not in STORED_HEADERS:
            continue
        room -= len(name) + len(value)
        if room < 0:
            break
        kept[name] = value
    return kept


def _config(request: webhook_pb2.DeliverWebhookRequest, headers: dict[str, str], scheme: str) -> dict[str, Any]:
    """The event's config: where and how the delivery came. Only allow-listed headers."""
    kept = kept_headers(headers)
    return {
        "source": provenance.SOURCE_REF,
        "webhook_key": request.key,
        "received_at": datetime.now(UTC).isoformat(),
        "headers": kept,
        "source_ip": request.source_ip,
        "user_agent": headers.get("user-agent", ""),
        "hmac_verified": bool(scheme),
        "signature_scheme": scheme,
    }
