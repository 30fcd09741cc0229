"""``POST /cloudevents/{key}``: CloudEvents over the CloudEvents 1.0 HTTP protocol binding, in
its three modes, decoded here into the Protobuf Format's messages and stored by the api
(``CloudEventService.DeliverCloudEvents``) under the key's trigger, all or nothing; answered
202 only after the commit, 503 with Retry-After whenever the api cannot store them.

- binary mode: the context attributes in ``ce-*`` headers (values percent-decoded), the body is
  the data, its Content-Type the ``datacontenttype``;
- structured mode: ``application/cloudevents+json``, one event as a JSON object (``data`` as
  JSON, or ``data_base64``);
- batch mode: ``application/cloudevents-batch+json``, a JSON array of such objects (1 to 1,000).

Authentication is a webhook's: the key (a trigger's ``webhook_key``, enabled) and, when the
trigger has a secret, a signature of the raw body in one of the webhook schemes, checked by the
api. Or, on ``POST /cloudevents`` (no key), the api token of a sensor (``Authorization: Bearer``):
the events go to the api's ``Publish``/``PublishBatch`` under that token, so its role, its ingest
rate and each event's ``type`` -> trigger mapping are the api's, as for a gRPC producer.
``OPTIONS`` answers the abuse-protection handshake of the CloudEvents HTTP Web Hook spec
(``WebHook-Request-Origin`` -> ``WebHook-Allowed-Origin``) for an enabled key; a callback URL is
never fetched (the handshake is answered synchronously).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any
from urllib.parse import unquote

import grpc
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from services.web.bodies import Budget, TooLarge, TooSlow, declared_length, read_body
from services.web.cloudevents_out import bearer
from services.web.edge import client_address
from services.web.webhooks import KEY, RETRY_AFTER_S, SIGNATURE_HEADERS, KnownKeys
from shared import limits
from shared.config import WebConfig
from shared.errors import error_reason
from shared.gen.automation.v1 import (
    cloudevent_pb2,
    cloudevent_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)
from shared.gen.io.cloudevents.v1 import cloudevents_pb2

log = logging.getLogger("services.web")

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUIRED = ("id", "source", "specversion", "type")
MAX_HEADER_ATTRIBUTES = 50
"""``ce-*`` headers of one binary-mode request (the api takes 50 attributes per event)."""
_INT32 = (-(2**31), 2**31 - 1)
_TRANSIENT = frozenset(
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


class Refused(Exception):
    """A request refused before the api is asked: HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _value(attr: cloudevents_pb2.CloudEvent.CloudEventAttributeValue, value: Any, name: str) -> None:
    """A JSON attribute value in its CloudEvents type (the JSON format's mapping)."""
    if isinstance(value, bool):
        attr.ce_boolean = value
    elif isinstance(value, int) and _INT32[0] <= value <= _INT32[1]:
        attr.ce_integer = value
    elif isinstance(value, str):
        attr.ce_string = value
    else:
        raise Refused(400, f"the attribute {name[:24]!r} must be a string, a boolean or a 32-bit integer")


def from_structured(event: Any, where: str) -> cloudevents_pb2.CloudEvent:
    """One event of the JSON Event Format (structured or batch mode) as the Protobuf Format's."""
    if not isinstance(event, dict):
        raise Refused(400, f"{where} must be a JSON object")
    for name in REQUIRED:
        if not isinstance(event.get(name), str):
            raise Refused(400, f"{where} lacks the required attribute {name!r} (a string)")
    ce = cloudevents_pb2.CloudEvent(
        id=event["id"], source=event["source"], spec_version=event["specversion"], type=event["type"]
    )
    if "data" in event and "data_base64" in event:
        raise Refused(400, f"{where} has both data and data_base64")
    for name, value in event.items():
        if name in REQUIRED or name in ("data", "data_base64") or value is None:
            continue
        _value(ce.attributes[name], value, name)
    if isinstance(event.get("data_base64"), str):
        try:
            ce.binary_data = base64.b64decode(event["data_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise Refused(400, f"{where}: data_base64 is not base64") from None
    elif "data" in event:
        data = event["data"]
        content_type = str(event.get("datacontenttype") or "application/json")
        is_json = content_type.split(";")[0].strip().lower().endswith("json")
        # JSON data is carried as its JSON text; a string under another type is that text.
        ce.text_data = data if isinstance(data, str) and not is_json else json.dumps(data)
    return ce


def from_binary(headers: dict[str, str], body: bytes) -> cloudevents_pb2.CloudEvent:
    """A binary-mode request as a CloudEvent: ``ce-*`` headers and the body as its data."""
    attributes: dict[str, str] = {}
    for name, value in headers.items():
        if name.startswith("ce-"):
            # Header values are percent-encoded UTF-8 (HTTP binding 3.1.3.2).
            attributes[name[3:]] = unquote(value, errors="strict")
    if len(attributes) > MAX_HEADER_ATTRIBUTES:
        raise Refused(400, f"at most {MAX_HEADER_ATTRIBUTES} ce- headers are accepted")
    missing = [f"ce-{n}" for n in REQUIRED if n not in attributes]
    if missing:
        raise Refused(
            400,
            f"not a CloudEvent: {', '.join(missing)} missing (binary mode), or send Content-Type "
            f"{STRUCTURED} or {BATCH}",
        )
    ce = cloudevents_pb2.CloudEvent(
        id=attributes.pop("id"),
        source=attributes.pop("source"),
        spec_version=attributes.pop("specversion"),
        type=attributes.pop("type"),
    )
    if "content-type" in headers:
        ce.attributes["datacontenttype"].ce_string = headers["content-type"]
    for name, value in attributes.items():
        ce.attributes[name].ce_string = value
    if body:
        ce.binary_data = body
    return ce


def decode(headers: dict[str, str], body: bytes) -> list[cloudevents_pb2.CloudEvent]:
    """The CloudEvents of one request, whichever mode it uses."""
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in (STRUCTURED, BATCH):
        return [from_binary(headers, body)]
    try:
        value = json.loads(body)
    except RecursionError:
        raise Refused(400, "the JSON body is nested too deep") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused(400, f"the body is not JSON: {str(exc)[:120]}") from None
    if kind == STRUCTURED:
        return [from_structured(value, "the event")]
    if not isinstance(value, list) or not 1 <= len(value) <= limits.MAX_BATCH:
        raise Refused(400, f"a batch is a JSON array of 1 to {limits.MAX_BATCH} events")
    return [from_structured(event, f"events[{i}]") for i, event in enumerate(value)]


class CloudEvents:
    """The CloudEvents endpoint, handing requests to the api with the service's own credentials."""

    def __init__(
        self,
        config: WebConfig,
        stub: cloudevent_pb2_grpc.CloudEventServiceAsyncStub,
        hooks: webhook_pb2_grpc.WebhookServiceAsyncStub,
        budget: Budget,
        events: event_pb2_grpc.EventServiceAsyncStub,
    ) -> None:
        self._config = config
        self._stub = stub
        self._events = events
        self._keys = KnownKeys(hooks, config.known_key_s, config.rpc_timeout_s)
        # Shared with the webhook endpoint: one bound on the bodies the process holds.
        self.budget = budget

    async def handshake(self, request: Request) -> Response:
        """The abuse-protection handshake: an enabled key allows the asking origin."""
        key = request.path_params["key"]
        origin = request.headers.get("webhook-request-origin", "")
        if not KEY.fullmatch(key):
            return _error(404, "no enabled webhook has this key")
        try:
            await self._keys.signed(key)
        except grpc.aio.AioRpcError as exc:
            return _refusal(key, exc)
        headers = {"Allow": "POST, OPTIONS"}
        if origin:
            headers["WebHook-Allowed-Origin"] = origin[: limits.MAX_LABEL]
            headers["WebHook-Allowed-Rate"] = "*"
        return Response(status_code=200, headers=headers)

    async def deliver(self, request: Request) -> Response:
        key = request.path_params["key"]
        if not KEY.fullmatch(key):
            return _error(404, "no enabled webhook has this key")
        try:
            signed = await self._keys.signed(key)
        except grpc.aio.AioRpcError as exc:
            return _refusal(key, exc)
        if signed and not any(h in request.headers for h in SIGNATURE_HEADERS):
            return _error(401, "the request is not signed (webhook-signature, Stripe-Signature or X-Hub-Signature-256)")
        declared = declared_length(request)
        if declared is not None and declared > limits.MAX_WEBHOOK_BODY_BYTES:
            return _error(413, f"the body may be at most {limits.MAX_WEBHOOK_BODY_BYTES:,} bytes")
        claim = declared if declared is not None else limits.MAX_WEBHOOK_BODY_BYTES
        if not self.budget.claim(claim):
            return _error(503, "too many deliveries in flight; retry later", **{"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await self._deliver(request, key)
        except ClientDisconnect:
            log.info("cloudevents %s: the sender hung up before its body arrived", key[:12])
            return Response(status_code=400)
        finally:
            self.budget.release(claim)

    async def _deliver(self, request: Request, key: str) -> Response:
        config = self._config
        headers = {n.lower(): v for n, v in request.headers.items()}
        try:
            try:
                body = await read_body(request, limits.MAX_WEBHOOK_BODY_BYTES, config.read_deadline_s)
            except TooLarge as exc:
                raise Refused(413, f"the body may be at most {exc.limit:,} bytes") from None
            except TooSlow as exc:
                raise Refused(408, str(exc)) from None
            try:
                events = decode(headers, body)
            except UnicodeDecodeError:
                raise Refused(400, "a ce- header is not percent-encoded UTF-8") from None
        except Refused as exc:
            log.info("cloudevents %s refused: %d %s", key[:12], exc.status, exc)
            return _error(exc.status, str(exc))
        message = cloudevent_pb2.DeliverCloudEventsRequest(
            key=key,
            body=body,
            headers=[webhook_pb2.WebhookHeader(name=n, value=v) for n, v in headers.items()][
                : limits.MAX_WEBHOOK_HEADERS
            ],
            source_ip=client_address(request, config.trusted_proxies)[: limits.MAX_LABEL],
            events=events,
        )
        try:
            answer: cloudevent_pb2.DeliverCloudEventsResponse = await self._stub.DeliverCloudEvents(
                message, timeout=config.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return _refusal(key, exc)
        return JSONResponse(
            {
                "trigger_ref": answer.trigger_ref,
                "hmac_verified": answer.hmac_verified,
                "signature_scheme": answer.signature_scheme,
                "events": [
                    {"event_id": r.event_id, "enforcement_ids": list(r.enforcement_ids), "replayed": r.replayed}
                    for r in answer.receipts
                ],
            },
            status_code=202,
        )

    async def publish(self, request: Request) -> Response:
        """``POST /cloudevents`` with a sensor's api token: stored by the api's Publish (one
        event) or PublishBatch (a batch), all or nothing, under the caller's own principal."""
        token = bearer(request)
        if not token:
            return _error(
                401,
                "an api token is required: Authorization: Bearer <token> (or POST to /cloudevents/{webhook key})",
                **{"WWW-Authenticate": 'Bearer realm="cloudevents"'},
            )
        declared = declared_length(request)
        if declared is not None and declared > limits.MAX_WEBHOOK_BODY_BYTES:
            return _error(413, f"the body may be at most {limits.MAX_WEBHOOK_BODY_BYTES:,} bytes")
        claim = declared if declared is not None else limits.MAX_WEBHOOK_BODY_BYTES
        if not self.budget.claim(claim):
            return _error(503, "too many deliveries in flight; retry later", **{"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await self._publish(request, token)
        except ClientDisconnect:
            log.info("cloudevents: the sender hung up before its body arrived")
            return Response(status_code=400)
        finally:
            self.budget.release(claim)

    async def _publish(self, request: Request, token: str) -> Response:
        headers = {n.lower(): v for n, v in request.headers.items()}
        try:
            try:
                body = await read_body(request, limits.MAX_WEBHOOK_BODY_BYTES, self._config.read_deadline_s)
            except TooLarge as exc:
                raise Refused(413, f"the body may be at most {exc.limit:,} bytes") from None
            except TooSlow as exc:
                raise Refused(408, str(exc)) from None
            try:
                events = decode(headers, body)
            except UnicodeDecodeError:
                raise Refused(400, "a ce- header is not percent-encoded UTF-8") from None
        except Refused as exc:
            return _error(exc.status, str(exc))
        auth = (("authorization", f"Bearer {token}"),)
        timeout = self._config.rpc_timeout_s
        try:
            if len(events) == 1 and headers.get("content-type", "").split(";")[0].strip() != BATCH:
                one: event_pb2.PublishResponse = await self._events.Publish(events[0], metadata=auth, timeout=timeout)
                receipts = [one.receipt]
            else:
                many: event_pb2.PublishBatchResponse = await self._events.PublishBatch(
                    cloudevents_pb2.CloudEventBatch(events=events), metadata=auth, timeout=timeout
                )
                receipts = list(many.receipts)
        except grpc.aio.AioRpcError as exc:
            return _token_refusal(exc)
        return JSONResponse(
            {
                "events": [
                    {"event_id": r.event_id, "enforcement_ids": list(r.enforcement_ids), "replayed": r.replayed}
                    for r in receipts
                ]
            },
            status_code=202,
        )


def _token_refusal(exc: grpc.aio.AioRpcError) -> Response:
    """The HTTP answer to the api refusing a token's CloudEvents."""
    code, details = exc.code(), exc.details() or ""
    status = {
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.FAILED_PRECONDITION: 409,
        grpc.StatusCode.ALREADY_EXISTS: 409,
    }.get(code)
    if status is not None:
        return _error(status, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _error(429, details, **{"Retry-After": str(RETRY_AFTER_S)})
    if code not in _TRANSIENT:
        log.error("cloudevents: the api answered %s %s", code.name, details)
    return _error(503, "the events could not be stored now; retry later", **{"Retry-After": str(RETRY_AFTER_S)})


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
    if code not in _TRANSIENT:
        log.error("cloudevents %s: the api refused this service: %s %s", key[:12], code.name, details)
    else:
        log.warning("cloudevents %s: the api could not store them: %s %s", key[:12], code.name, details)
    return _error(503, "the events could not be stored now; retry later", **{"Retry-After": str(RETRY_AFTER_S)})
