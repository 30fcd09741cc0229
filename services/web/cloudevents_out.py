"""``GET /cloudevents/stream``: the api's tails as CloudEvents over Server-Sent Events, for a
consumer that follows enforcements (or events) with a CloudEvents SDK instead of gRPC.

``?kind=enforcements`` (filters ``rule_ref``, ``trigger_ref``, ``status``, ``event``) or
``?kind=events`` (filters ``trigger_ref``, ``source_ref``, ``rule_ref``). Each SSE message's
``data`` is one CloudEvent in the JSON format (what a structured-mode HTTP request's body would
be, ``application/cloudevents+json``), its ``id`` the tail's cursor: a client that reconnects
with ``Last-Event-ID`` resumes after the last event it received, with nothing repeated and
nothing missed (the tail's guarantee). The first message carries only an ``id`` (the start
position), so a reconnect before any event still resumes from where the stream began.

Authentication is an api token (``Authorization: Bearer``), and the tail is opened with it:
the api's roles (viewer or operator) and its per-principal stream share apply to the consumer,
never the web service's own rights. Streams count against the same per-token and total budgets
as the console's live pages (``live.Live.admit``).

The status is decided before the stream starts: the tail is opened with ``announce_start``
and the answer waits for its first message, so a bad token, filter or cursor is an HTTP error
(401, 403, 400), not a 200 that ends at once. A cursor the api no longer resumes is refused
(400, or 410 when it expired): unlike a console page, which starts afresh, a consumer that
asked to resume must learn that it missed events.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.web.live import RECONNECT_MS, Live
from services.web.render import STATUS_BY_NAME
from services.web.session import usable
from shared import limits
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, event_pb2
from shared.gen.io.cloudevents.v1 import cloudevents_pb2

log = logging.getLogger("services.web.cloudevents")

FILTERS = {
    "events": ("trigger_ref", "source_ref", "rule_ref"),
    "enforcements": ("rule_ref", "trigger_ref", "status", "event"),
}
MAX_CURSOR = 16 * 1024
"""Characters of the longest cursor the api issues (and so of a Last-Event-ID we pass on)."""
_AT_OPEN = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 410,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}
_LATER = frozenset({429, 503})
RETRY_AFTER_S = 5


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return not kind or kind in ("application/json", "text/json") or kind.endswith("+json")


def structured(event: cloudevents_pb2.CloudEvent) -> dict[str, Any]:
    """A Protobuf Format CloudEvent in the JSON format (the structured mode's body): attributes
    by their JSON types, JSON data as ``data``, other data as ``data_base64``."""
    out: dict[str, Any] = {
        "specversion": event.spec_version,
        "id": event.id,
        "source": event.source,
        "type": event.type,
    }
    for name, value in sorted(event.attributes.items()):
        kind = value.WhichOneof("attr")
        if kind == "ce_timestamp":
            out[name] = value.ce_timestamp.ToJsonString()
        elif kind == "ce_bytes":
            out[name] = base64.b64encode(value.ce_bytes).decode()
        elif kind is not None:
            out[name] = getattr(value, kind)
    content_type = str(out.get("datacontenttype", ""))
    data = event.WhichOneof("data")
    if data == "text_data" and _is_json(content_type):
        try:
            out["data"] = json.loads(event.text_data)
        except ValueError:
            out["data"] = event.text_data  # not JSON after all: a string is still a JSON value
    elif data == "text_data":
        out["data"] = event.text_data
    elif data == "binary_data":
        out["data_base64"] = base64.b64encode(event.binary_data).decode()
    elif data == "proto_data":
        out["data_base64"] = base64.b64encode(event.proto_data.value).decode()
    return out


def bearer(request: Request) -> str:
    """The token of an ``Authorization: Bearer`` header; empty when there is none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and usable(token) else ""


def _message(cursor: str, event: cloudevents_pb2.CloudEvent | None) -> bytes:
    lines = [f"id: {cursor}"]
    if event is not None:
        lines.append("data: " + json.dumps(structured(event), ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


class CloudEventStream:
    """The endpoint; shares the console's live-stream budgets and api stubs through ``live``."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def _request(self, request: Request, cursor: str) -> tuple[str, Any] | Response:
        """The tail to open (its kind and request message), or the 400 that refuses it."""
        query = request.query_params
        kind = query.get("kind", "")
        if kind not in FILTERS:
            return _error(400, "kind: must be enforcements or events")
        allowed = FILTERS[kind]
        unknown = sorted({name for name in query if name != "kind" and name not in allowed})
        if unknown:
            # A misspelt filter would otherwise follow everything.
            return _error(400, f"{unknown[0][:40]}: unknown parameter; {kind} take {', '.join(allowed)}")
        fields: dict[str, Any] = {}
        for name in allowed:
            value = query.get(name, "")
            if len(value) > limits.MAX_FILTER_TEXT:
                return _error(400, f"{name}: at most {limits.MAX_FILTER_TEXT} characters")
            if not value:
                continue
            if name == "status":
                if value not in STATUS_BY_NAME:
                    return _error(400, f"status: must be one of {', '.join(STATUS_BY_NAME)}")
                fields[name] = STATUS_BY_NAME[value]
            elif name == "event":
                if not value.isdigit() or not 0 < int(value) < 2**63:
                    return _error(400, "event: must be a positive whole number")
                fields[name] = int(value)
            else:
                fields[name] = value
        common: dict[str, Any] = {
            "cursor": cursor,
            "announce_start": True,
            "format": common_pb2.TAIL_FORMAT_CLOUDEVENTS,
        }
        if kind == "events":
            return kind, event_pb2.TailEventsRequest(**common, **fields)
        return kind, enforcement_pb2.TailEnforcementsRequest(**common, **fields)

    async def stream(self, request: Request) -> Response:
        token = bearer(request)
        challenge = {"WWW-Authenticate": 'Bearer realm="cloudevents"'}
        if not token:
            return _error(401, "an api token is required: Authorization: Bearer <token>", **challenge)
        cursor = request.headers.get("last-event-id", "").strip()
        if len(cursor) > MAX_CURSOR or not cursor.isascii():
            return _error(400, f"Last-Event-ID: not a cursor of this service (at most {MAX_CURSOR} ASCII characters)")
        asked = self._request(request, cursor)
        if isinstance(asked, Response):
            return asked
        kind, message = asked
        console = self.live.console
        try:
            user = await console.sessions.verify(token)
        except grpc.aio.AioRpcError as exc:
            log.info("cloudevents stream: the api could not check a token (%s)", exc.code().name)
            return _error(503, "the api is unavailable; try again", **{"Retry-After": str(RETRY_AFTER_S)})
        if user is None:
            return _error(401, "the api does not accept this token", **challenge)
        admitted = self.live.admit(user)
        if isinstance(admitted, Response):
            return admitted
        release = admitted
        api = console.api
        call = (
            api.events.TailEvents(message, metadata=user.metadata)
            if kind == "events"
            else api.enforcements.TailEnforcements(message, metadata=user.metadata)
        )
        messages = self.live.messages(request, call)

        async def done() -> None:
            release()
            await messages.aclose()

        try:
            first = await anext(messages)
            while first is None:  # heartbeats while the api takes the start: still before the status
                first = await anext(messages)
        except (grpc.aio.AioRpcError, StopAsyncIteration) as exc:
            await done()
            return self._refused(user.token, exc)
        except BaseException:
            await done()
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                yield f"retry: {RECONNECT_MS}\n\n".encode()
                yield _message(first.cursor, None)  # the start position
                try:
                    async for item in messages:
                        if item is None:
                            yield b": heartbeat\n\n"
                        elif item.HasField("cloud_event"):
                            yield _message(item.cursor, item.cloud_event)
                except grpc.aio.AioRpcError as exc:
                    yield self._ended(user.token, exc)
            finally:
                with contextlib.suppress(Exception):
                    await done()

        # The background task counts the stream out when the body never started (a client
        # gone before the first byte); both steps are idempotent.
        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(done),
        )

    def _refused(self, token: str, exc: BaseException) -> Response:
        if not isinstance(exc, grpc.aio.AioRpcError):
            return _error(503, "the api ended the tail at once; try again", **{"Retry-After": str(RETRY_AFTER_S)})
        code = exc.code()
        status = _AT_OPEN.get(code, 503)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            self.live.console.sessions.forget(token)
        details = (exc.details() or code.name)[:500]
        if status in _LATER:
            return _error(status, details, **{"Retry-After": str(RETRY_AFTER_S)})
        return _error(status, details)

    def _ended(self, token: str, exc: grpc.aio.AioRpcError) -> bytes:
        """The last message of a stream the api ended: a comment when reconnecting helps (the
        api is away), else an ``error`` event saying why (reconnecting would be refused)."""
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            return b": the api is away; reconnect with Last-Event-ID\n\n"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            self.live.console.sessions.forget(token)
        payload = json.dumps({"code": code.name, "message": (exc.details() or "")[:500]}, ensure_ascii=True)
        return f"event: error\ndata: {payload}\n\n".encode()


__all__ = ["CloudEventStream", "bearer", "structured"]
