"""``POST /webhooks/{key}``: a delivery decoded here, checked and stored by the api, answered
202 only after the commit (503 with Retry-After whenever the api cannot store it)."""

from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qs

import grpc
from google.protobuf import json_format
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from services.web.bodies import Budget, TooLarge, TooSlow, declared_length, read_body
from services.web.edge import client_address
from shared import limits
from shared.config import WebConfig
from shared.errors import error_reason
from shared.gen.automation.v1 import webhook_pb2, webhook_pb2_grpc

log = logging.getLogger("services.web")

RETRY_AFTER_S = 5
"""What a 503 asks the sender to wait: the api or its database is away, usually briefly."""
DELIVERY_HEADERS = ("x-github-delivery", "idempotency-key")
SIGNATURE_HEADERS = ("webhook-signature", "svix-signature", "stripe-signature", "x-hub-signature-256", "x-signature")
"""A delivery to a webhook with a secret that has none of these is refused before its body is
read (the api checks the signature itself)."""
KEY = re.compile(r"wh_[0-9a-f]{32}")
_KNOWN_KEYS = 10_000
"""Keys remembered at once, at most (an entry is about 200 bytes)."""
# Transient for the sender: the api could not store the delivery, and a retry may succeed.
_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


class BadDelivery(Exception):
    """A delivery refused before the api is asked: HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def _body(request: Request, deadline_s: float) -> bytes:
    """The raw body, refused with 413 as soon as it passes the limit (never read whole first),
    408 when it has not all arrived within the deadline."""
    try:
        return await read_body(request, limits.MAX_WEBHOOK_BODY_BYTES, deadline_s)
    except TooLarge as exc:
        raise BadDelivery(413, f"the body may be at most {exc.limit:,} bytes") from None
    except TooSlow as exc:
        raise BadDelivery(408, str(exc)) from None


class KnownKeys:
    """Webhook keys the api said name an enabled webhook, remembered for a few seconds, so that
    a body is read only for a key worth reading it for and a known key costs no extra call.

    Asking the api (``check_only``) rather than keeping a copy of every key: the api stays the
    one place keys live (rotation and disabling take effect there at once: a remembered key only
    lets a body be read, the delivery itself is checked again). Unknown keys are not
    remembered: a key just enabled works at once, and keys are 128 random bits, so an unknown
    one is a mistake or a probe, answered by one cheap call instead of an upload."""

    def __init__(self, stub: webhook_pb2_grpc.WebhookServiceAsyncStub, ttl_s: float, timeout_s: float) -> None:
        self._stub = stub
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._known: OrderedDict[str, tuple[float, bool]] = OrderedDict()

    async def signed(self, key: str) -> bool:
        """Whether the key's webhook needs a signature; NOT_FOUND (AioRpcError) when the key
        names no enabled webhook, and any other api failure, raise."""
        now = time.monotonic()
        hit = self._known.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        answer: webhook_pb2.DeliverWebhookResponse = await self._stub.DeliverWebhook(
            webhook_pb2.DeliverWebhookRequest(key=key, check_only=True), timeout=self._timeout_s
        )
        if self._ttl_s > 0:
            self._known[key] = (now + self._ttl_s, answer.signature_required)
            self._known.move_to_end(key)
            while len(self._known) > _KNOWN_KEYS:
                self._known.popitem(last=False)
        return answer.signature_required


def payload_of(body: bytes, content_type: str) -> dict[str, Any]:
    """The event's payload: a JSON object, or the fields of a form (a field given twice is a
    list). 400 for anything else."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise BadDelivery(400, "the form is not UTF-8") from None
        return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}
    try:
        value = json.loads(body)
    except RecursionError:
        raise BadDelivery(400, "the JSON body is nested too deep") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadDelivery(400, f"the body is not JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise BadDelivery(400, f"the JSON body must be an object, not {type(value).__name__}")
    return value


class Webhooks:
    """The webhook endpoint, handing deliveries to the api with the service's own credentials."""

    def __init__(self, config: WebConfig, stub: webhook_pb2_grpc.WebhookServiceAsyncStub) -> None:
        self._config = config
        self._stub = stub
        self._keys = KnownKeys(stub, config.known_key_s, config.rpc_timeout_s)
        self.budget = Budget(config.body_budget_bytes)

    async def deliver(self, request: Request) -> Response:
        """Everything that can be refused without the body is refused before it is read:
        an unknown or disabled key, a missing signature, a declared size past the limit, and a
        delivery the body budget cannot hold now."""
        key = request.path_params["key"]
        if not KEY.fullmatch(key):
            return _error(404, "no enabled webhook has this key")
        try:
            signed = await self._keys.signed(key)
        except grpc.aio.AioRpcError as exc:
            return _refusal(key, exc)
        if signed and not any(h in request.headers for h in SIGNATURE_HEADERS):
            log.info("webhook %s refused: 401 not signed", key[:12])
            return _error(
                401, "the delivery is not signed (webhook-signature, Stripe-Signature or X-Hub-Signature-256)"
            )
        declared = declared_length(request)
        if declared is not None and declared > limits.MAX_WEBHOOK_BODY_BYTES:
            return _error(413, f"the body may be at most {limits.MAX_WEBHOOK_BODY_BYTES:,} bytes")
        claim = declared if declared is not None else limits.MAX_WEBHOOK_BODY_BYTES
        if not self.budget.claim(claim):
            log.warning(
                "webhook %s: 503, bodies in flight hold the whole budget (%d bytes)", key[:12], self.budget.held
            )
            return _error(503, "too many deliveries in flight; retry later", **{"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await self._deliver(request, key)
        except ClientDisconnect:
            # The sender hung up mid-body: nothing was stored and nobody is left to answer.
            log.info("webhook %s: the sender hung up before its body arrived", key[:12])
            return Response(status_code=400)
        finally:
            self.budget.release(claim)

    async def _deliver(self, request: Request, key: str) -> Response:
        config = self._config
        try:
            body = await _body(request, config.read_deadline_s)
            payload = payload_of(body, request.headers.get("content-type", "application/json"))
            message = webhook_pb2.DeliverWebhookRequest(
                key=key,
                body=body,
                headers=[webhook_pb2.WebhookHeader(name=n, value=v) for n, v in request.headers.items()][
                    : limits.MAX_WEBHOOK_HEADERS
                ],
                source_ip=client_address(request, config.trusted_proxies)[: limits.MAX_LABEL],
                delivery_id=next((request.headers[h] for h in DELIVERY_HEADERS if h in request.headers), ""),
            )
            try:
                json_format.ParseDict(payload, message.payload)
            except (json_format.ParseError, RecursionError, ValueError) as exc:
                raise BadDelivery(400, f"the body cannot be stored: {str(exc)[:120]}") from None
        except BadDelivery as exc:
            log.info("webhook %s refused: %d %s", key[:12], exc.status, exc)
            return _error(exc.status, str(exc))
        try:
            answer: webhook_pb2.DeliverWebhookResponse = await self._stub.DeliverWebhook(
                message, timeout=config.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return _refusal(key, exc)
        return JSONResponse(
            {
                "event_id": answer.event_id,
                "enforcement_ids": list(answer.enforcement_ids),
                "trigger_ref": answer.trigger_ref,
                "replayed": answer.replayed,
                "hmac_verified": answer.hmac_verified,
                "signature_scheme": answer.signature_scheme,
            },
            status_code=202,
        )


def _refusal(key: str, exc: grpc.aio.AioRpcError) -> Response:
    """The HTTP answer to an api refusal: the sender's fault (4xx), or 503 to retry later."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return _error(404, "no enabled webhook has this key")
    if code == grpc.StatusCode.UNAUTHENTICATED and error_reason(exc) == "WEBHOOK_SIGNATURE":
        return _error(401, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return _error(400, details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return _error(409, details)
    if code not in _UNAVAILABLE:
        # The web service's own credentials or role were refused: an operator must act, and
        # the sender must retry later; the body was not stored.
        log.error("webhook %s: the api refused this service: %s %s", key[:12], code.name, details)
    else:
        log.warning("webhook %s: the api could not store it: %s %s", key[:12], code.name, details)
    return _error(503, "the event could not be stored now; retry later", **{"Retry-After": str(RETRY_AFTER_S)})
