"""The gRPC servicers: validate requests, call the data-access layer, convert the answers.

They hold no SQL and no business state; errors become canonical statuses in ``_rpc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from opentelemetry.trace import SpanKind

from services.api import convert, metrics, validate
from services.api import servicers_tails as tails
from services.api._rpc import current_rpc, rpc
from services.api.auth import current_principal
from services.api.dispatcher import Dispatcher, Handoff, Subscription
from services.api.store import Actor, CreatedEvent, Delivery, NewEvent, Page, Store, translate
from services.api.store._paging import page_size
from services.api.store.history import TABLES as HISTORY_TABLES
from shared import limits, tracing
from shared.batching import Batcher
from shared.config import ApiConfig
from shared.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Violations,
    brief,
)
from shared.gen.automation.v1 import (
    analytics_pb2,
    analytics_pb2_grpc,
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
)

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
MAX_BATCH = limits.MAX_BATCH
_RESOLVABLE = (common_pb2.ENFORCEMENT_STATUS_PROCESSED, common_pb2.ENFORCEMENT_STATUS_DISABLED)
MAX_VOLUME_RANGE = timedelta(days=90)


def _timestamp(field: str, t: timestamp_pb2.Timestamp) -> datetime:
    try:
        return convert.from_ts(t)
    except ValueError as exc:  # seconds outside years 1..9999, or nanos outside [0, 1e9)
        raise InvalidArgument.one(field, str(exc)) from None


def _time_range(field: str, r: common_pb2.TimeRange) -> tuple[datetime | None, datetime | None]:
    start = _timestamp(f"{field}.start", r.start) if r.HasField("start") else None
    end = _timestamp(f"{field}.end", r.end) if r.HasField("end") else None
    if start and end and start >= end:
        raise InvalidArgument.one(field, "start must be before end")
    return start, end


def _status_filter(value: int, names: Mapping[Any, str]) -> str:
    """A status filter's stored name; '' for UNSPECIFIED (0, any status)."""
    if value == 0:
        return ""
    if value not in names:
        raise InvalidArgument.one("status", f"unknown status {value}")
    return names[value]


def _key(request: Any, what: str) -> int | str:
    which = request.WhichOneof("key")
    if which == "id":
        return validate.id_or_raise("id", request.id)
    if which == "ref":
        return validate.ref_or_raise("ref", request.ref)
    raise InvalidArgument.one("key", f"give the {what}'s id or ref")


def _actor() -> Actor:
    """Who makes a change, by which RPC: what its audit record names."""
    return Actor(current_principal().name, current_rpc())


def _holder() -> str | None:
    """Whose leases the caller may resolve: its own (and unleased work); an operator's, any."""
    principal = current_principal()
    return None if principal.is_operator else principal.name


def _filters(request: Any, refs: tuple[str, ...] = (), texts: tuple[str, ...] = (), ids: tuple[str, ...] = ()) -> None:
    """Checks a list request's filters: refs must be possible refs, text is bounded and has no
    NUL, optional ids are positive."""
    v = Violations()
    for name in refs:
        validate.filter_ref(v, name, getattr(request, name))
    for name in texts:
        validate.text(v, name, getattr(request, name), limits.MAX_FILTER_TEXT)
    for name in ids:
        if request.HasField(name):
            validate.positive_id(v, name, getattr(request, name))
    v.raise_if_any()


M = TypeVar("M", bound=Message)
T = TypeVar("T")


def _page(page: Page[T], to_message: Callable[[T], M]) -> tuple[list[M], str]:
    """A page's messages, cut short (with a token to go on from there) before their encoded
    size would pass MAX_PAGE_BYTES, so that every default-configured client can receive it."""
    out: list[M] = []
    total = 0
    for item in page.items:
        message = to_message(item)
        total += message.ByteSize() + 8  # the repeated field's tag and length
        if total > limits.MAX_PAGE_BYTES and out:
            return out, page.cut(len(out)).next_token
        out.append(message)
    return out, page.next_token


def _fill_page(response: Message, repeated: Any, page: Page[T], fill: Callable[[Any, T], None]) -> str:
    """Adds a page's messages to ``repeated``, a field of ``response`` (its only field set yet),
    cut as ``_page`` cuts; returns the token to go on with.

    Filled in place, the messages are not copied into the response, and the size of the whole
    page is one call: their sizes plus 8 each can only pass the budget when that does."""
    add = repeated.add
    for item in page.items:
        fill(add(), item)
    n = len(repeated)
    if response.ByteSize() + 8 * n <= limits.MAX_PAGE_BYTES:
        return page.next_token
    total = 0
    for i, message in enumerate(repeated):
        total += message.ByteSize() + 8
        if total > limits.MAX_PAGE_BYTES and i:
            del repeated[i:]
            return page.cut(i).next_token
    return page.next_token


def _new_event(v: Violations, field: str, e: event_pb2.NewEvent) -> NewEvent:
    validate.ref(v, f"{field}.trigger_ref", e.trigger_ref)
    validate.ref(v, f"{field}.rule_ref", e.rule_ref, required=False)
    validate.text(v, f"{field}.request_id", e.request_id, limits.MAX_REQUEST_ID)
    validate.text(v, f"{field}.source_ref", e.source_ref, limits.MAX_SOURCE_REF)
    if e.HasField("source"):
        validate.positive_id(v, f"{field}.source", e.source)
    return NewEvent(
        trigger_ref=e.trigger_ref,
        payload=validate.json_object(v, f"{field}.payload", e.payload, limits.MAX_PAYLOAD_BYTES),
        config=(
            validate.json_object(v, f"{field}.config", e.config, limits.MAX_CONFIG_BYTES)
            if e.HasField("config")
            else None
        ),
        source=e.source if e.HasField("source") else None,
        source_ref=e.source_ref or None,
        rule_ref=e.rule_ref or None,
        request_id=e.request_id or None,
    )


def _traced(events: list[NewEvent]) -> list[NewEvent]:
    """``events`` carrying the current span's traceparent (once per call), stored with their
    enforcements: whoever takes one later, hand-off or claim, continues this trace."""
    trace = tracing.traceparent()
    if trace is None:
        return events
    return [dataclasses.replace(e, traceparent=trace) for e in events]


def _created_event(c: Any) -> event_pb2.CreateEventResponse:
    return event_pb2.CreateEventResponse(
        event=convert.event(c.event),
        enforcements=[convert.enforcement(x) for x in c.enforcements],
        replayed=c.replayed,
    )


class EventService(event_pb2_grpc.EventServiceServicer):
    def __init__(self, store: Store, dispatcher: Dispatcher, lease_s: float) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._lease_s = lease_s
        # Concurrent CreateEvent calls share statements: one goes at once while fewer than
        # two inserts are in flight; the rest gather and go together when one returns. Two,
        # not more: measured on 2 cores, unary ingest at 16 concurrent calls went from 857/s
        # with four to 1,153/s with two (bigger shared statements, fewer commits).
        self._coalescer: Batcher[NewEvent, CreatedEvent | DomainError] = Batcher(
            self._create_coalesced, max_batch=MAX_BATCH, max_calls=2
        )
        # Decided once: off, no event is looked at for a trace.
        self._tracing = tracing.enabled()

    async def _create_coalesced(self, new: list[NewEvent]) -> list[CreatedEvent | DomainError]:
        """Stores events of separate CreateEvent calls in one statement. If that fails, each
        is stored on its own (a statement is atomic: nothing of the failed one was written),
        so that one bad event fails only its own call, with its own error. Nothing here
        raises: every call gets exactly its own outcome."""
        if len(new) > 1:
            try:
                return list(await self._create(new, many=True))
            except Exception as exc:  # noqa: BLE001 - whatever failed, each event goes alone
                mapped = translate(exc)
                if isinstance(mapped, Unavailable):
                    # Not about any one event: the database is away for all of them.
                    return [Unavailable(mapped.message) for _ in new]
        out: list[CreatedEvent | DomainError] = []
        for one in new:
            try:
                out.extend(await self._create([one], many=False))
            except Exception as exc:
                mapped = translate(exc)
                if mapped is None:
                    log.exception("CreateEvent failed with an unexpected error")
                    mapped = DomainError("internal error; the server log has the details")
                out.append(mapped)
        return out

    async def create_one(self, new: NewEvent) -> CreatedEvent:
        """Stores one event as CreateEvent does (webhook deliveries too): gathered with other
        calls' events under load, alone when it has a request_id."""
        if self._tracing:
            # Here, in the call's own context: a gathered statement runs in another's.
            (new,) = _traced([new])
        if new.request_id:
            # A key is checked against the others of its statement; alone, its errors are its own.
            (result,) = await self._create([new], many=False)
            return result
        outcome = await self._coalescer.submit(new)
        if isinstance(outcome, DomainError):
            raise outcome
        return outcome

    async def _create(self, new: list[NewEvent], many: bool) -> list[CreatedEvent]:
        handoff = self._dispatcher.handoff(self._lease_s)
        try:
            results = await self._store.events.create_many(new, many=many, lease=handoff.reserve)
        except BaseException:
            handoff.cancel()
            raise
        # Committed: from here on nothing may fail the call (a caller told "error" would
        # retry and store the events twice). Hand-off, wake-ups and announcements are best
        # effort; polling and lease expiry cover anything they miss.
        try:
            await self._after_commit(results, handoff)
        except Exception:
            log.exception("after storing %d event(s): hand-off or announcement failed", len(results))
        return results

    async def _after_commit(self, results: list[CreatedEvent], handoff: Handoff) -> None:
        fresh = [r for r in results if not r.replayed]
        created = [e for r in fresh for e in r.enforcements]
        handed = handoff.taken
        traces = [r.traceparent for r in fresh for _ in r.enforcements] if self._tracing else []
        closed = handoff.deliver(created, traces)
        if closed is not None:
            handed = False
            # The stream closed while the insert ran: give its new leases back now (the
            # lease expiry covers a failure).
            with contextlib.suppress(Exception):
                await self._store.dispatch.release_stream(closed, "stream closed during hand-off")
        if created and not handed:
            self._dispatcher.wake(len(created))
        self._dispatcher.announce([r.event for r in fresh], created, [], leased=handed)

    @rpc
    async def CreateEvent(
        self, request: event_pb2.CreateEventRequest, context: Context
    ) -> event_pb2.CreateEventResponse:
        if not request.HasField("event"):
            raise InvalidArgument.one("event", "is required")
        v = Violations()
        new = _new_event(v, "event", request.event)
        v.raise_if_any()
        return _created_event(await self.create_one(new))

    @rpc
    async def CreateEvents(
        self, request: event_pb2.CreateEventsRequest, context: Context
    ) -> event_pb2.CreateEventsResponse:
        if not 1 <= len(request.events) <= MAX_BATCH:
            raise InvalidArgument.one("events", f"must hold 1 to {MAX_BATCH} events, got {len(request.events)}")
        v = Violations()
        new = [_new_event(v, f"events[{i}]", e) for i, e in enumerate(request.events)]
        v.raise_if_any()
        results = await self._create(_traced(new) if self._tracing else new, many=True)
        return event_pb2.CreateEventsResponse(
            receipts=[
                event_pb2.EventReceipt(
                    event_id=r.event.id,
                    created=convert.ts(r.event.created),
                    enforcement_ids=[e.id for e in r.enforcements],
                    rule_refs=[e.rule_ref for e in r.enforcements],
                    replayed=r.replayed,
                )
                for r in results
            ]
        )

    @rpc
    async def ReemitEvent(
        self, request: event_pb2.ReemitEventRequest, context: Context
    ) -> event_pb2.CreateEventResponse:
        id_ = validate.id_or_raise("id", request.id)
        v = Violations()
        validate.text(v, "request_id", request.request_id, limits.MAX_REQUEST_ID)
        v.raise_if_any()
        original = await self._store.events.get(id_)
        new = NewEvent(
            trigger_ref=original.trigger_ref,
            payload=original.payload,
            config=original.config,
            source=original.source,
            source_ref=original.source_ref,
            rule_ref=original.rule_ref,
            request_id=request.request_id or None,
            reemit_of=original.id,
            traceparent=tracing.traceparent(),
        )
        try:
            (result,) = await self._create([new], many=False)
        except InvalidArgument as exc:
            # The stored event is checked as a new one would be, and the errors name that
            # event's fields (event.request_id, event.payload): not fields of this request.
            for field, why in exc.violations:
                if field in ("request_id", "event.request_id"):
                    raise InvalidArgument.one("request_id", why) from None
            raise FailedPrecondition(
                f"event {original.id} cannot be re-emitted under the current rules: {exc.message}"
            ) from None
        except NotFound as exc:
            # Its trigger (or the rule it targeted) was deleted since: NOT_FOUND would say that
            # the event itself is unknown.
            raise FailedPrecondition(f"event {original.id} cannot be re-emitted: {exc.message}") from None
        return _created_event(result)

    @rpc
    async def GetEvent(self, request: event_pb2.GetEventRequest, context: Context) -> common_pb2.Event:
        return convert.event(await self._store.events.get(validate.id_or_raise("id", request.id)))

    @rpc
    async def ListEvents(self, request: event_pb2.ListEventsRequest, context: Context) -> event_pb2.ListEventsResponse:
        _filters(request, refs=("trigger_ref", "rule_ref"), texts=("source_ref",), ids=("reemit_of",))
        size = page_size(request.page_size)
        start, end = _time_range("created", request.created)
        page = await self._store.events.list(
            size,
            request.page_token,
            trigger_ref=request.trigger_ref,
            source_ref=request.source_ref,
            rule_ref=request.rule_ref,
            created_from=start,
            created_to=end,
            reemit_of=request.reemit_of if request.HasField("reemit_of") else None,
        )
        response = event_pb2.ListEventsResponse()
        response.next_page_token = _fill_page(response, response.events, page, convert.fill_event)
        return response

    @rpc
    async def TailEvents(self, request: event_pb2.TailEventsRequest, context: Context) -> Any:
        async for message in tails.tail_events(self._store, request):
            yield message


class EnforcementService(enforcement_pb2_grpc.EnforcementServiceServicer):
    def __init__(self, store: Store, dispatcher: Dispatcher, config: ApiConfig, shutdown: asyncio.Event) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._config = config
        self._shutdown = shutdown
        # Tracing on: every hand-out is a "dispatch" span in the trace of the enforcement's creation.
        self._tracer = tracing.tracer("services.api.dispatch")

    @rpc
    async def CreateEnforcement(
        self, request: enforcement_pb2.CreateEnforcementRequest, context: Context
    ) -> enforcement_pb2.CreateEnforcementResponse:
        v = Violations()
        validate.ref(v, "rule_ref", request.rule_ref)
        if request.HasField("event"):
            validate.positive_id(v, "event", request.event)
        validate.text(v, "request_id", request.request_id, limits.MAX_REQUEST_ID)
        payload = validate.json_object(v, "payload", request.payload, limits.MAX_PAYLOAD_BYTES)
        config = (
            validate.json_object(v, "config", request.config, limits.MAX_CONFIG_BYTES)
            if request.HasField("config")
            else None
        )
        v.raise_if_any()
        enforcement, replayed = await self._store.enforcements.create(
            rule_ref=request.rule_ref,
            event=request.event if request.HasField("event") else None,
            payload=payload,
            config=config,
            request_id=request.request_id or None,
        )
        if not replayed:
            self._dispatcher.wake(1)
            self._dispatcher.announce([], [enforcement], [])
        return enforcement_pb2.CreateEnforcementResponse(
            enforcement=convert.enforcement(enforcement), replayed=replayed
        )

    @rpc
    async def GetEnforcement(
        self, request: enforcement_pb2.GetEnforcementRequest, context: Context
    ) -> common_pb2.Enforcement:
        return convert.enforcement(await self._store.enforcements.get(validate.id_or_raise("id", request.id)))

    @rpc
    async def ListEnforcements(
        self, request: enforcement_pb2.ListEnforcementsRequest, context: Context
    ) -> enforcement_pb2.ListEnforcementsResponse:
        _filters(request, refs=("rule_ref", "trigger_ref"), ids=("event",))
        size = page_size(request.page_size)
        start, end = _time_range("created", request.created)
        status = _status_filter(request.status, convert.ENFORCEMENT_STATUS_NAME)
        page = await self._store.enforcements.list(
            size,
            request.page_token,
            rule_ref=request.rule_ref,
            event=request.event if request.HasField("event") else None,
            status=status,
            trigger_ref=request.trigger_ref,
            created_from=start,
            created_to=end,
        )
        response = enforcement_pb2.ListEnforcementsResponse()
        response.next_page_token = _fill_page(response, response.enforcements, page, convert.fill_enforcement)
        return response

    @rpc
    async def TailEnforcements(self, request: enforcement_pb2.TailEnforcementsRequest, context: Context) -> Any:
        async for message in tails.tail_enforcements(self._store, request, self._shutdown, self._config.poll_s):
            yield message

    @rpc
    async def ResolveEnforcement(
        self, request: enforcement_pb2.ResolveEnforcementRequest, context: Context
    ) -> enforcement_pb2.ResolveEnforcementResponse:
        v = Violations()
        validate.positive_id(v, "id", request.id)
        if request.status not in _RESOLVABLE:
            v.add("status", "must be ENFORCEMENT_STATUS_PROCESSED or ENFORCEMENT_STATUS_DISABLED")
        validate.text(v, "executor_id", request.executor_id, limits.MAX_EXECUTOR_ID)
        validate.text(v, "reason", request.reason, limits.MAX_REASON)
        v.raise_if_any()
        id_ = request.id
        status = convert.ENFORCEMENT_STATUS_NAME[request.status]
        result = await self._store.enforcements.resolve(id_, status, _holder())
        self._dispatcher.resolved(id_)
        if not result.replayed:
            self._dispatcher.announce([], [], [result.enforcement])
        log.debug(
            "enforcement %d %s by %s%s: %s",
            id_,
            status,
            request.executor_id or "?",
            " (retry)" if result.replayed else "",
            request.reason or "no reason given",
        )
        response = enforcement_pb2.ResolveEnforcementResponse(
            enforcement=convert.enforcement(result.enforcement), replayed=result.replayed
        )
        if result.execution is not None:
            response.execution.CopyFrom(convert.execution(result.execution))
        return response

    @rpc
    async def ResolveEnforcements(
        self, request: enforcement_pb2.ResolveEnforcementsRequest, context: Context
    ) -> enforcement_pb2.ResolveEnforcementsResponse:
        if not 1 <= len(request.decisions) <= MAX_BATCH:
            raise InvalidArgument.one(
                "decisions", f"must hold 1 to {MAX_BATCH} decisions, got {len(request.decisions)}"
            )
        v = Violations()
        decisions: list[tuple[int, str]] = []
        seen: set[int] = set()
        for i, d in enumerate(request.decisions):
            if d.id <= 0:
                v.add(f"decisions[{i}].id", f"must be a positive id, got {d.id}")
            elif d.id in seen:
                v.add(f"decisions[{i}].id", f"enforcement {d.id} appears twice")
            seen.add(d.id)
            if d.status not in _RESOLVABLE:
                v.add(f"decisions[{i}].status", "must be ENFORCEMENT_STATUS_PROCESSED or ENFORCEMENT_STATUS_DISABLED")
            validate.text(v, f"decisions[{i}].executor_id", d.executor_id, limits.MAX_EXECUTOR_ID)
            validate.text(v, f"decisions[{i}].reason", d.reason, limits.MAX_REASON)
            decisions.append((d.id, convert.ENFORCEMENT_STATUS_NAME.get(d.status, "")))
        v.raise_if_any()
        results = await self._store.enforcements.resolve_many(decisions, _holder())
        outcomes: list[enforcement_pb2.ResolutionOutcome] = []
        resolved = []
        for (id_, _status), r in zip(decisions, results, strict=True):
            if isinstance(r, DomainError):
                error = enforcement_pb2.ResolutionError(code=r.code.value[0], message=r.message, reason=r.reason)
                outcomes.append(enforcement_pb2.ResolutionOutcome(id=id_, error=error))
                continue
            self._dispatcher.resolved(id_)
            if not r.replayed:
                resolved.append(r.enforcement)
            outcome = enforcement_pb2.ResolutionOutcome(
                id=id_, status=convert.ENFORCEMENT_STATUS[r.enforcement.status], replayed=r.replayed
            )
            if r.execution is not None:
                outcome.execution_id = r.execution.id
            outcomes.append(outcome)
        if resolved:
            self._dispatcher.announce([], [], resolved)
        return enforcement_pb2.ResolveEnforcementsResponse(outcomes=outcomes)

    @rpc
    async def ReleaseEnforcement(
        self, request: enforcement_pb2.ReleaseEnforcementRequest, context: Context
    ) -> enforcement_pb2.ReleaseEnforcementResponse:
        v = Violations()
        validate.positive_id(v, "id", request.id)
        validate.text(v, "executor_id", request.executor_id, limits.MAX_EXECUTOR_ID, required=True)
        validate.text(v, "error", request.error, limits.MAX_REASON)
        v.raise_if_any()
        id_ = request.id
        principal = current_principal()
        if request.force:
            if not principal.is_operator:
                raise PermissionDenied(f"{principal.name} may not force a release; it needs operator")
            actor = _actor()
            reason = request.error or f"released by operator {principal.name}"
            released = await self._store.dispatch.force_release(id_, actor, reason)
        else:
            # Anyone else only what its own streams hold (operators: any principal's, by name).
            released = await self._store.dispatch.release(
                id_, request.executor_id, request.error or "released", _holder()
            )
        if released:
            self._dispatcher.resolved(id_)
            self._dispatcher.wake_all()
        return enforcement_pb2.ReleaseEnforcementResponse(released=released)

    @rpc
    async def WatchEnforcements(self, request: enforcement_pb2.WatchEnforcementsRequest, context: Context) -> Any:
        v = Violations()
        validate.text(v, "executor_id", request.executor_id, limits.MAX_EXECUTOR_ID, required=True)
        if not 0 <= request.max_in_flight <= limits.MAX_IN_FLIGHT:
            v.add("max_in_flight", f"must be 0 (default 16) to {limits.MAX_IN_FLIGHT}, got {request.max_in_flight}")
        for name in ("rule_refs", "trigger_refs"):
            refs = getattr(request, name)
            if len(refs) > limits.MAX_WATCH_FILTERS:
                v.add(name, f"may name at most {limits.MAX_WATCH_FILTERS}, got {len(refs)}")
                continue
            for i, ref in enumerate(refs):
                validate.ref(v, f"{name}[{i}]", ref)
        v.raise_if_any()
        cfg = self._config
        principal = current_principal()
        credit = self._credit_for(principal.name, request.max_in_flight or 16)
        token = f"{request.executor_id}/{uuid.uuid4().hex[:12]}"
        sub = self._dispatcher.subscribe(
            credit,
            filtered=bool(request.rule_refs or request.trigger_refs),
            executor_id=request.executor_id,
            token=token,
            principal=principal.name,
        )
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        next_poll = loop.time() + cfg.poll_s
        reason = "stream closed"
        try:
            while not self._shutdown.is_set():
                sub.wake.clear()
                if loop.time() >= next_poll:
                    # At least every poll_s, whatever wakes came in between (hand-offs can keep a
                    # stream awake without a claim): other writers' work, expired leases.
                    sub.look = True
                    next_poll = loop.time() + cfg.poll_s
                if sub.inbox:
                    handed, sub.inbox = sub.inbox, []
                    for d in handed:
                        if (message := await self._sendable(d, request.executor_id, sub, "handoff")) is not None:
                            yield message
                free = sub.free
                if free > 0 and sub.look:
                    sub.look = False
                    next_poll = loop.time() + cfg.poll_s
                    deliveries = await self._store.dispatch.claim(
                        executor_id=request.executor_id,
                        token=token,
                        principal=principal.name,
                        limit=free,
                        lease_s=cfg.lease_s,
                        max_attempts=cfg.max_attempts,
                        rule_refs=request.rule_refs,
                        trigger_refs=request.trigger_refs,
                    )
                    full = sub.starved = len(deliveries) == free
                    if deliveries:
                        metrics.current.claimed(len(deliveries))
                    for d in deliveries:
                        sub.held.add(d.enforcement.id)
                        if (message := await self._sendable(d, request.executor_id, sub, "claim")) is not None:
                            yield message
                    if full:
                        sub.look = True
                        continue
                now = loop.time()
                if now >= next_beat:
                    # Renewal doubles as reconciliation: what we no longer hold was resolved
                    # (possibly through another api replica).
                    before = set(sub.held)
                    renewed = await self._store.dispatch.renew(token, cfg.lease_s)
                    # Hand-offs that landed while the renewal ran are not in its answer.
                    sub.held = (sub.held & renewed) | (sub.held - before)
                    next_beat = now + cfg.heartbeat_s
                    yield enforcement_pb2.WatchEnforcementsResponse(
                        heartbeat=enforcement_pb2.Heartbeat(
                            server_time=convert.ts(datetime.now(UTC)), in_flight=len(sub.held)
                        )
                    )
                    continue
                waits = [asyncio.ensure_future(sub.wake.wait()), asyncio.ensure_future(self._shutdown.wait())]
                try:
                    await asyncio.wait(
                        waits,
                        timeout=max(min(next_poll, next_beat) - now, 0.0),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    for w in waits:
                        w.cancel()
            reason = "api shutting down"
        finally:
            self._dispatcher.unsubscribe(sub)
            # Give back what this stream holds so that another executor gets it now, not when
            # the lease runs out. Best effort: if the database is down the lease expires.
            with contextlib.suppress(Exception):  # the lease expiry covers every failure here
                await asyncio.shield(self._store.dispatch.release_stream(token, f"{reason} ({request.executor_id})"))
            if sub.held:
                self._dispatcher.wake_all()

    def _credit_for(self, principal: str, wanted: int) -> int:
        """The credit a new watch stream of ``principal`` may have: a client that opens streams
        and never resolves must not sit on all pending work (per api replica). With
        authentication off every caller is one principal, so there is nothing to share fairly."""
        if self._config.insecure:
            return wanted
        streams = self._dispatcher.streams_of(principal)
        if len(streams) >= limits.MAX_WATCH_STREAMS_PER_PRINCIPAL:
            raise ResourceExhausted(
                f"{principal} already has {len(streams)} watch streams on this api, the most one principal may open; "
                "close one first",
                reason="TOO_MANY_STREAMS",
            )
        left = limits.MAX_CREDIT_PER_PRINCIPAL - sum(sub.credit for sub in streams)
        if left <= 0:
            raise ResourceExhausted(
                f"{principal}'s watch streams already hold {limits.MAX_CREDIT_PER_PRINCIPAL} credit on this api "
                "(max_in_flight in all); close a stream first",
                reason="TOO_MUCH_CREDIT",
            )
        return min(wanted, left)

    async def _sendable(
        self, d: Delivery, executor_id: str, sub: Subscription, path: str
    ) -> enforcement_pb2.WatchEnforcementsResponse | None:
        """The delivery's message, or None when it cannot be sent: then it is released with the
        reason, charged to that enforcement alone, instead of breaking the stream (and so
        every other enforcement it holds). Writes are checked so that this never happens;
        this keeps one bad record from stopping the pipeline if one slips through. ``path``:
        how the stream got it (``handoff``, ``claim``), for its trace."""
        try:
            message = convert.delivery(d)
            if d.traceparent is not None and self._tracer is not None:
                message.delivery.traceparent = self._dispatched(d, executor_id, path)
            size = message.ByteSize()
            if size <= limits.MAX_MESSAGE_BYTES:
                return message
            why = f"{size:,} bytes encoded, over the {limits.MAX_MESSAGE_BYTES:,} a message may have"
        except Exception as exc:  # noqa: BLE001 - any failure to encode is this record's alone
            why = f"cannot be encoded: {exc.__class__.__name__}"
        id_ = d.enforcement.id
        log.error(
            "enforcement %d cannot be delivered (%s); releasing it",
            id_,
            why,
            extra={"enforcement_id": id_, "executor_id": executor_id},
        )
        sub.held.discard(id_)
        with contextlib.suppress(Exception):  # the lease expiry covers a failure here
            await self._store.dispatch.release(id_, executor_id, f"undeliverable: {why}")
        return None

    def _dispatched(self, d: Delivery, executor_id: str, path: str) -> str:
        """Records this hand-out as a "dispatch" span, a child of the call that created the
        enforcement, lasting from the enforcement's creation to now (its wait for a stream);
        returns its traceparent, which the executor's work continues from."""
        assert self._tracer is not None
        e = d.enforcement
        now = time.time_ns()
        span = self._tracer.start_span(
            "dispatch",
            context=tracing.extract(d.traceparent),
            kind=SpanKind.PRODUCER,
            attributes={
                "enforcement.id": e.id,
                "rule.ref": e.rule_ref,
                "dispatch.path": path,
                "dispatch.attempt": d.attempt,
                "executor.id": executor_id,
            },
            start_time=min(int(e.created.timestamp() * 1e9), now),
        )
        span.end(now)
        return tracing.traceparent(span) or ""

    @rpc
    async def GetDispatchState(
        self, request: enforcement_pb2.GetDispatchStateRequest, context: Context
    ) -> enforcement_pb2.GetDispatchStateResponse:
        if not 0 <= request.exhausted_limit <= 1000:
            raise InvalidArgument.one("exhausted_limit", "must be 0 (default 100) to 1000")
        state = await self._store.dispatch.state(request.exhausted_limit or 100)
        response = enforcement_pb2.GetDispatchStateResponse(
            pending=state.pending,
            waiting=state.waiting,
            exhausted_count=state.exhausted_count,
            leases=[enforcement_pb2.ExecutorLeases(executor_id=e, leased=n) for e, n in state.leases],
            exhausted=[
                enforcement_pb2.ExhaustedEnforcement(
                    id=x.id,
                    rule_ref=x.rule_ref,
                    attempts=x.attempts,
                    last_error=x.last_error or "",
                    created=convert.ts(x.created),
                )
                for x in state.exhausted
            ],
        )
        if state.oldest_pending_created is not None:
            age = duration_pb2.Duration()
            age.FromTimedelta(max(state.now - state.oldest_pending_created, timedelta(0)))
            response.oldest_pending_age.CopyFrom(age)
        return response

    @rpc
    async def RetryEnforcement(
        self, request: enforcement_pb2.RetryEnforcementRequest, context: Context
    ) -> enforcement_pb2.RetryEnforcementResponse:
        id_ = validate.id_or_raise("id", request.id)
        actor = _actor()
        await self._store.dispatch.retry(id_, actor)
        self._dispatcher.wake_all()
        return enforcement_pb2.RetryEnforcementResponse(
            enforcement=convert.enforcement(await self._store.enforcements.get(id_))
        )


class ExecutionService(execution_pb2_grpc.ExecutionServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    @rpc
    async def GetExecution(
        self, request: execution_pb2.GetExecutionRequest, context: Context
    ) -> execution_pb2.Execution:
        return convert.execution(await self._store.executions.get(validate.id_or_raise("id", request.id)))

    @rpc
    async def ListExecutions(
        self, request: execution_pb2.ListExecutionsRequest, context: Context
    ) -> execution_pb2.ListExecutionsResponse:
        _filters(request, refs=("action_ref",), ids=("enforcement",))
        size = page_size(request.page_size)
        start, end = _time_range("created", request.created)
        status = _status_filter(request.status, convert.EXECUTION_STATUS_NAME)
        page = await self._store.executions.list(
            size,
            request.page_token,
            enforcement=request.enforcement if request.HasField("enforcement") else None,
            action_ref=request.action_ref,
            status=status,
            created_from=start,
            created_to=end,
        )
        executions, token = _page(page, convert.execution)
        return execution_pb2.ListExecutionsResponse(executions=executions, next_page_token=token)


class HistoryService(history_pb2_grpc.HistoryServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    @rpc
    async def ListHistory(
        self, request: history_pb2.ListHistoryRequest, context: Context
    ) -> history_pb2.ListHistoryResponse:
        v = Violations()
        if request.entity_type not in HISTORY_TABLES:
            v.add(
                "entity_type",
                f"only {' and '.join(sorted(HISTORY_TABLES))} have history (got {brief(request.entity_type)})",
            )
        validate.text(v, "changed_field", request.changed_field, limits.MAX_FILTER_TEXT)
        if request.operation and request.operation not in ("INSERT", "UPDATE", "DELETE"):
            v.add("operation", "must be INSERT, UPDATE or DELETE")
        if request.HasField("entity_id") and request.entity_id <= 0:
            v.add("entity_id", "must be a positive id")
        v.raise_if_any()
        size = page_size(request.page_size)
        start, end = _time_range("time", request.time)
        page = await self._store.history.list(
            request.entity_type,
            size,
            request.page_token,
            entity_id=request.entity_id if request.HasField("entity_id") else None,
            operation=request.operation,
            changed_field=request.changed_field,
            time_from=start,
            time_to=end,
        )
        records, token = _page(page, convert.history)
        return history_pb2.ListHistoryResponse(records=records, next_page_token=token)


def _volume_range(r: common_pb2.TimeRange, field: str = "range") -> tuple[datetime, datetime]:
    """A bounded range: end defaults to now, start to 24 hours before end; at most 90 days."""
    start, end = _time_range(field, r)
    end = end or datetime.now(UTC)
    if start is None:
        try:
            start = end - timedelta(hours=24)
        except OverflowError:
            raise InvalidArgument.one(f"{field}.end", "is too early to default start to 24 hours before it") from None
    if start >= end:
        raise InvalidArgument.one(field, "start must be before end")
    if end - start > MAX_VOLUME_RANGE:
        raise InvalidArgument.one(field, "may cover at most 90 days")
    return start, end


class AnalyticsService(analytics_pb2_grpc.AnalyticsServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    @rpc
    async def QueryEventVolume(
        self, request: analytics_pb2.QueryEventVolumeRequest, context: Context
    ) -> analytics_pb2.QueryEventVolumeResponse:
        _filters(request, refs=("trigger_ref",))
        start, end = _volume_range(request.range)
        rows = await self._store.analytics.event_volume(start, end, request.trigger_ref)
        response = analytics_pb2.QueryEventVolumeResponse()
        convert.fill_event_volume(response.buckets, rows)
        return response

    @rpc
    async def QueryEnforcementVolume(
        self, request: analytics_pb2.QueryEnforcementVolumeRequest, context: Context
    ) -> analytics_pb2.QueryEnforcementVolumeResponse:
        _filters(request, refs=("rule_ref",))
        start, end = _volume_range(request.range)
        status = _status_filter(request.status, convert.ENFORCEMENT_STATUS_NAME)
        rows = await self._store.analytics.enforcement_volume(start, end, request.rule_ref, status)
        response = analytics_pb2.QueryEnforcementVolumeResponse()
        convert.fill_enforcement_volume(response.buckets, rows)
        return response
