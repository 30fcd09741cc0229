"""``POST /webhooks/{key}``: a delivery decoded here, checked and stored by the api, answered
202 only after the commit (503 with Retry-After whenever the api cannot store it)."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs

import grpc
from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.web.bodies import TooLarge, read_body
from shared import limits
from shared.config import WebConfig
from shared.errors import error_reason
from shared.gen.automation.v1 import webhook_pb2, webhook_pb2_grpc

log = logging.getLogger("services.web")

RETRY_AFTER_S = 5
"""What a 503 asks the sender to wait: the api or its database is away, usually briefly."""
DELIVERY_HEADERS = ("x-github-delivery", "idempotency-key")
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


async def _body(request: Request) -> bytes:
    """The raw body, refused with 413 as soon as it passes the limit (never read whole first)."""
    try:
        return await read_body(request, limits.MAX_WEBHOOK_BODY_BYTES)
    except TooLarge as exc:
        raise BadDelivery(413, f"the body may be at most {exc.limit:,} bytes") from None


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

    async def deliver(self, request: Request) -> Response:
        config = self._config
        key = request.path_params["key"]
        try:
            body = await _body(request)
            payload = payload_of(body, request.headers.get("content-type", "application/json"))
            message = webhook_pb2.DeliverWebhookRequest(
                key=key,
                body=body,
                headers=[webhook_pb2.WebhookHeader(name=n, value=v) for n, v in request.headers.items()][
                    : limits.MAX_WEBHOOK_HEADERS
                ],
                source_ip=_source_ip(request, config),
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


def _source_ip(request: Request, config: WebConfig) -> str:
    if config.trusted_proxies and (forwarded := request.headers.get("x-forwarded-for")):
        return forwarded.split(",")[0].strip()[: limits.MAX_LABEL]
    return request.client.host if request.client else ""
