"""Live updates: Server-Sent Events fed by the api's tails.

A page names its stream (``/live/events?filters``, ``/live/enforcements?filters``, or
``/live/enforcements?id=N`` for one enforcement). The stream opens the api's tail with the
page's filters and ``announce_start``; once the tail's start position is taken it sends a
snapshot (the first page of the list, or the enforcement), then every change. So nothing
that changed between the page's render and the stream's start is missed: it is in the
snapshot or in the tail, and the browser applies both as idempotent replacements.

Each message carries the tail's cursor as its SSE ``id``. When the stream breaks (the api
restarts, the web service restarts, the network drops) the browser reconnects by itself with
``Last-Event-ID``, and the tail resumes from that cursor: no gap, no duplicate. A cursor the
api no longer accepts (expired, or for other filters) starts a fresh tail with a snapshot.

Messages are HTML fragments rendered here, with the same templates as the pages, so a row
that arrives live looks exactly like one that was rendered with the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from services.web.console import PAGE_SIZE, Console, Filters, Refused, positive_id
from services.web.render import STATUS_BY_NAME, STATUS_NAMES, macros
from services.web.session import User
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, event_pb2

log = logging.getLogger("services.web.live")

HEARTBEAT_S = 15.0
"""A comment line this often keeps proxies from closing an idle stream and finds dead clients."""
RECONNECT_MS = 2000
"""What the browser waits before reconnecting a broken stream."""
BUFFER = 64
"""Messages read ahead of a slow browser; past that the tail waits (gRPC flow control)."""
STARTED = enforcement_pb2.TailEnforcementsResponse.CHANGE_STARTED
RESOLVED = enforcement_pb2.TailEnforcementsResponse.CHANGE_RESOLVED
# Codes after which the browser should come back later (the api is away or restarting).
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
)


def sse(event: str, data: Any, cursor: str = "") -> bytes:
    lines = [f"event: {event}"]
    if cursor:
        lines.append(f"id: {cursor}")
    lines.append(f"data: {json.dumps(data, ensure_ascii=True)}")
    return ("\n".join(lines) + "\n\n").encode()


async def _ahead(call: Any, queue: asyncio.Queue[Any]) -> None:
    """Reads the tail into ``queue`` (bounded); ends with the call's error or None."""
    try:
        async for message in call:
            await queue.put(message)
        await queue.put(None)
    except grpc.aio.AioRpcError as exc:
        await queue.put(exc)


def _reemits(event: common_pb2.Event, of: int) -> bool:
    return event.HasField("reemit_of") and event.reemit_of == of


STREAMS_PER_SESSION = 6
"""Live streams one signed-in session may hold open (a person rarely has more pages open at
once; each stream is one api tail under their token)."""
STREAMS_TOTAL = 128
"""Live streams the web service holds in all: each is an api tail, and the api gives one
principal at most API_PRINCIPAL_STREAMS of those (16 by default)."""
BUSY_RETRY_S = 30
DISPATCH_POLL_S = 2.0
"""How often the Dispatch page's stream reads the dispatch state and the executors again: they
have no tail (leases and streams change without a row of their own), so the stream polls,
and sends only what changed."""


class Live:
    def __init__(self, console: Console, per_session: int | None = None, total: int | None = None) -> None:
        self.console = console
        self.per_session = per_session or STREAMS_PER_SESSION
        self.total = total or STREAMS_TOTAL
        self.open = 0
        self._by_session: dict[bytes, int] = {}

    def admit(self, user: User) -> Callable[[], None] | Response:
        """Counts a stream in (what counts it out), or the 429 that refuses it: one session
        opening live pages without end cannot take every api stream of the web service."""
        session = hashlib.sha256(user.token.encode()).digest()
        held = self._by_session.get(session, 0)
        if held >= self.per_session or self.open >= self.total:
            which = (
                f"this session has {held} live streams open, its share is {self.per_session}"
                if held >= self.per_session
                else f"the console has {self.open} live streams open, its limit is {self.total}"
            )
            log.info("live stream refused for %s: %s", user.name, which)
            return Response(
                f"too many live streams: {which}; close a page, then reload\n",
                status_code=429,
                headers={"Retry-After": str(BUSY_RETRY_S), "Cache-Control": "no-store"},
                media_type="text/plain",
            )
        self._by_session[session] = held + 1
        self.open += 1
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            self.open -= 1
            left = self._by_session[session] - 1
            if left:
                self._by_session[session] = left
            else:
                del self._by_session[session]

        return release

    def _stream(self, request: Request, user: User, body: AsyncIterator[bytes]) -> Response:
        admitted = self.admit(user)
        if isinstance(admitted, Response):
            return admitted
        release = admitted

        async def guarded() -> AsyncIterator[bytes]:
            try:
                yield f"retry: {RECONNECT_MS}\n\n".encode()
                try:
                    async for chunk in body:
                        yield chunk
                except grpc.aio.AioRpcError as exc:
                    yield self._ended(user, exc)
            finally:
                release()

        # The background task counts the stream out too when the body never started (a
        # browser gone before the first byte); release is idempotent.
        return StreamingResponse(
            guarded(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(release),
        )

    def _ended(self, user: User, exc: grpc.aio.AioRpcError) -> bytes:
        code = exc.code()
        if code in _TRANSIENT:
            log.info("live stream for %s broke (%s); the browser reconnects", user.name, code.name)
            return b": the api is away; reconnecting\n\n"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            self.console.sessions.forget(user.token)
        # Not worth reconnecting: the page says why and the script stops the stream.
        return sse("stop", {"code": code.name, "message": exc.details() or ""})

    async def messages(self, request: Request, call: Any) -> AsyncGenerator[Any]:
        """The tail's messages, with ``None`` for each heartbeat; raises the tail's error."""
        queue: asyncio.Queue[Any] = asyncio.Queue(BUFFER)
        reader = asyncio.create_task(_ahead(call, queue))
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    yield None
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            call.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _tail(self, request: Request, open_call: Any) -> AsyncIterator[Any]:
        """Messages of the tail from the browser's Last-Event-ID, or from a fresh start when
        it has none or the api refuses it."""
        cursor = request.headers.get("last-event-id", "")
        if len(cursor) > 16 * 1024 or not cursor.isascii():
            cursor = ""
        try:
            async for message in self.messages(request, open_call(cursor)):
                yield message
        except grpc.aio.AioRpcError as exc:
            stale = exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
            if not cursor or not stale:
                raise
            log.info("live: resuming from the browser's cursor was refused (%s); starting afresh", exc.code().name)
            async for message in self.messages(request, open_call("")):
                yield message

    # ---- events -----------------------------------------------------------------------------

    async def events(self, request: Request, user: User) -> Response:
        filters = Filters.of(request, ("trigger_ref", "source_ref", "rule_ref", "reemit_of"))
        console = self.console
        kw = console.call(user)
        fields: dict[str, Any] = {k: filters.values[k] for k in ("trigger_ref", "source_ref", "rule_ref")}
        # The tail has no reemit_of filter (re-emissions are rare): it is applied here.
        reemit_of = filters.id("reemit_of")
        listed = dict(fields, reemit_of=reemit_of) if reemit_of is not None else fields
        row = macros(console.env, "_rows.html").event_row

        def open_call(cursor: str) -> Any:
            req = event_pb2.TailEventsRequest(cursor=cursor, announce_start=not cursor, **fields)
            return console.api.events.TailEvents(req, metadata=user.metadata)

        async def body() -> AsyncIterator[bytes]:
            async for message in self._tail(request, open_call):
                if message is None:
                    yield b": heartbeat\n\n"
                elif message.start:
                    snapshot = await console.api.events.ListEvents(
                        event_pb2.ListEventsRequest(page_size=PAGE_SIZE, **listed), **kw
                    )
                    rows = [{"key": e.id, "html": str(row(e))} for e in reversed(snapshot.events)]
                    yield sse("rows", {"rows": rows, "snapshot": True}, message.cursor)
                elif reemit_of is None or _reemits(message.event, reemit_of):
                    e = message.event
                    yield sse("rows", {"rows": [{"key": e.id, "html": str(row(e))}]}, message.cursor)
                else:
                    yield f"id: {message.cursor}\n\n".encode()  # not shown: only the position moves

        return self._stream(request, user, body())

    # ---- enforcements -----------------------------------------------------------------------

    async def enforcements(self, request: Request, user: User) -> Response:
        console = self.console
        id_text = request.query_params.get("id", "")
        if id_text:
            if (id_ := positive_id(id_text)) is None:
                raise Refused(400, "id: must be a positive whole number")
            return await self._one(request, user, id_)
        filters = Filters.of(request, ("rule_ref", "trigger_ref", "status", "event"))
        status = filters.values["status"]
        if status and status not in STATUS_BY_NAME:
            raise Refused(400, f"status: must be one of {', '.join(STATUS_BY_NAME)}")
        fields = console.enforcement_filters(filters)
        kw = console.call(user)
        row = macros(console.env, "_rows.html").enforcement_row

        def open_call(cursor: str) -> Any:
            # Every change, whatever the page's status filter: a row leaving the filter (a
            # CREATED page's row being resolved) must be taken off the page.
            req = enforcement_pb2.TailEnforcementsRequest(cursor=cursor, announce_start=not cursor, **fields)
            return console.api.enforcements.TailEnforcements(req, metadata=user.metadata)

        def shown(e: common_pb2.Enforcement) -> dict[str, Any]:
            if status and STATUS_NAMES.get(e.status) != status:
                return {"key": e.id, "remove": True}
            return {"key": e.id, "html": str(row(e))}

        async def body() -> AsyncIterator[bytes]:
            async for message in self._tail(request, open_call):
                if message is None:
                    yield b": heartbeat\n\n"
                elif message.change == STARTED:
                    snapshot = await console.api.enforcements.ListEnforcements(
                        enforcement_pb2.ListEnforcementsRequest(
                            page_size=PAGE_SIZE,
                            status=STATUS_BY_NAME.get(status, 0),  # type: ignore[arg-type]
                            **fields,
                        ),
                        **kw,
                    )
                    rows = [shown(e) for e in reversed(snapshot.enforcements)]
                    yield sse("rows", {"rows": rows, "snapshot": True}, message.cursor)
                else:
                    yield sse("rows", {"rows": [shown(message.enforcement)]}, message.cursor)

        return self._stream(request, user, body())

    async def _one(self, request: Request, user: User, id_: int) -> Response:
        """One enforcement's page: its parts re-rendered whenever it changes."""
        console = self.console
        first = await console.enforcement_parts(user, id_)
        wanted: dict[str, Any] = {"rule_ref": first["e"].rule_ref}
        if first["e"].HasField("event"):
            wanted["event"] = first["e"].event
        module = macros(console.env, "_enforcement.html")

        def open_call(cursor: str) -> Any:
            req = enforcement_pb2.TailEnforcementsRequest(cursor=cursor, announce_start=not cursor, **wanted)
            return console.api.enforcements.TailEnforcements(req, metadata=user.metadata)

        async def parts() -> dict[str, Any]:
            fresh = await console.enforcement_parts(user, id_)
            return {
                "status": STATUS_NAMES.get(fresh["e"].status, ""),
                "parts": {
                    "overview": str(module.overview(fresh["e"])),
                    "metadata": str(module.metadata(fresh["e"])),
                    "executions": str(module.executions_part(fresh["executions"])),
                },
            }

        async def body() -> AsyncIterator[bytes]:
            async for message in self._tail(request, open_call):
                if message is None:
                    yield b": heartbeat\n\n"
                elif message.change == STARTED or message.enforcement.id == id_:
                    yield sse("parts", await parts(), message.cursor)
                else:
                    # Another enforcement of the same event and rule: only the position moves.
                    yield f"id: {message.cursor}\n\n".encode()

        return self._stream(request, user, body())

    # ---- dispatch ---------------------------------------------------------------------------

    async def dispatch(self, request: Request, user: User) -> Response:
        """The Dispatch page's parts (tiles, executors, leases, exhausted), read again every
        DISPATCH_POLL_S and sent when one changed."""
        console = self.console
        module = macros(console.env, "_dispatch.html")

        async def body() -> AsyncIterator[bytes]:
            sent: dict[str, str] = {}
            quiet = 0.0
            while True:
                fresh = await console.dispatch_parts(user)
                parts = {
                    "tiles": str(module.tiles(fresh["state"], fresh["oldest"])),
                    "executors": str(module.executors(fresh["executors"])),
                    "leases": str(module.leases(fresh["state"])),
                    "exhausted": str(module.exhausted(fresh["state"], user)),
                }
                changed = {k: v for k, v in parts.items() if sent.get(k) != v}
                if changed:
                    sent.update(changed)
                    quiet = 0.0
                    yield sse("parts", {"status": "", "parts": changed})
                elif quiet >= HEARTBEAT_S:
                    quiet = 0.0
                    yield b": heartbeat\n\n"
                await asyncio.sleep(DISPATCH_POLL_S)
                quiet += DISPATCH_POLL_S

        return self._stream(request, user, body())
