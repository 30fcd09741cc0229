"""EventService: ingest (coalesced single events, batches, re-emits), reads and the event tail."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from services.api import cloudevents, cloudevents_out, convert, metrics, search, validate
from services.api._rpc import rpc
from services.api.auth import REVEAL, current_principal
from services.api.budgets import IngestRate
from services.api.dispatcher import Dispatcher, Handoff
from services.api.servicers import provenance as webhook_provenance
from services.api.servicers import tails
from services.api.servicers.requests import (
    Context,
    check_filters,
    fill_page,
    finish_anyway,
    may_reveal,
    shown,
    shown_unaudited,
    time_range_of,
)
from services.api.store import CreatedEvent, NewEvent, Page, Store, page_size, set_deadline, translate
from shared import limits, tracing
from shared.batching import Batcher
from shared.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    Violations,
)
from shared.gen.automation.v1 import (
    common_pb2,
    event_pb2,
    event_pb2_grpc,
)
from shared.gen.io.cloudevents.v1 import cloudevents_pb2

log = logging.getLogger(__name__)
MAX_BATCH = limits.MAX_BATCH


def _new_event(v: Violations, field: str, e: event_pb2.NewEvent) -> NewEvent:
    validate.ref(v, f"{field}.trigger_ref", e.trigger_ref)
    validate.ref(v, f"{field}.rule_ref", e.rule_ref, required=False)
    validate.text(v, f"{field}.request_id", e.request_id, limits.MAX_REQUEST_ID)
    validate.text(v, f"{field}.source_ref", e.source_ref, limits.MAX_SOURCE_REF)
    if e.HasField("source"):
        validate.positive_id(v, f"{field}.source", e.source)
    config = (
        validate.json_object(v, f"{field}.config", e.config, limits.MAX_CONFIG_BYTES) if e.HasField("config") else None
    )
    # Webhook provenance is asserted by WebhookService alone, from a delivery it verified
    # itself: a sensor that could write it would make its events indistinguishable from
    # signed deliveries (and could take a sender's delivery id before the sender does).
    # Refused rather than stripped, so the sensor learns its event is not what it meant.
    if e.source_ref.strip().lower() == webhook_provenance.SOURCE_REF:
        v.add(f"{field}.source_ref", f"{webhook_provenance.SOURCE_REF!r} is reserved for verified webhook deliveries")
    if e.request_id.startswith(webhook_provenance.REQUEST_ID_PREFIX):
        v.add(
            f"{field}.request_id",
            f"the prefix {webhook_provenance.REQUEST_ID_PREFIX!r} is reserved for webhook deliveries",
        )
    if config is not None:
        for key in webhook_provenance.CONFIG_KEYS:
            if key in config:
                v.add(f"{field}.config.{key}", "is reserved for webhook deliveries (set by the api, never by a sensor)")
        if config.get("source") == webhook_provenance.SOURCE_REF:
            v.add(f"{field}.config.source", f"{webhook_provenance.SOURCE_REF!r} is reserved for webhook deliveries")
    return NewEvent(
        trigger_ref=e.trigger_ref,
        payload=validate.json_object(v, f"{field}.payload", e.payload, limits.MAX_PAYLOAD_BYTES),
        config=config,
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


async def _shown_created(store: Store, c: CreatedEvent) -> event_pb2.CreateEventResponse:
    """A re-emission's answer: a stored event read back to an operator, so masked as reads are.

    It runs after the commit, where nothing may fail the call (the caller, told "error", would
    send it again and store it twice): if masking cannot be done, the answer goes without any
    payload, config or condition values rather than in clear or as an error."""
    try:
        (event,) = await shown(store, [c.event])
        enforcements = await shown(store, c.enforcements)
    except Exception:
        log.exception(
            "re-emitted event %d is stored; its answer could not be masked, so it goes without values", c.event.id
        )
        event = c.event._replace(payload={}, config=None, schema_errors=None)
        enforcements = [e._replace(payload={}, config=None, conditions=[]) for e in c.enforcements]
    return _created_event(CreatedEvent(event, enforcements, replayed=c.replayed))


class EventService(event_pb2_grpc.EventServiceServicer):
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        lease_s: float,
        rate: IngestRate | None = None,
        cloudevents_source: str = cloudevents_out.DEFAULT_SOURCE,
    ) -> None:
        self._store = store
        self._cloudevents_source = cloudevents_source
        self._rate = rate or IngestRate(0.0)
        self._dispatcher = dispatcher
        self._lease_s = lease_s
        # Concurrent CreateEvent calls share statements: one goes at once while fewer than
        # two inserts are in flight; the rest gather and go together when one returns. Two,
        # not more: measured on 2 cores, unary ingest at 16 concurrent calls went from 857/s
        # with four to 1,153/s with two (bigger shared statements, fewer commits). An insert
        # in flight for over a second is waiting on the network or the database, not
        # using the CPU that sharing saves: it frees its slot (up to six in flight). Over the
        # chaos harness's 400 ms link an insert took 1.5-3 s, and a call queued behind two of
        # them waited past its 5 s deadline.
        self._coalescer: Batcher[NewEvent, CreatedEvent | DomainError] = Batcher(
            self._create_coalesced, max_batch=MAX_BATCH, max_calls=2, slow_after_s=1.0, most_calls=6
        )
        # Decided once: off, no event is looked at for a trace.
        self._tracing = tracing.enabled()

    async def _create_coalesced(self, new: list[NewEvent]) -> list[CreatedEvent | DomainError]:
        """Stores events of separate CreateEvent calls in one statement. If that fails, each
        is stored on its own (a statement is atomic: nothing of the failed one was written),
        so that one bad event fails only its own call, with its own error. Nothing here
        raises: every call gets exactly its own outcome."""
        # Gathered from many calls: no one caller's deadline bounds the wait for a connection.
        set_deadline(None)
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
        calls' events under load."""
        await self._paced(1)
        if self._tracing:
            # Here, in the call's own context: a gathered statement runs in another's.
            (new,) = _traced([new])
        # Keyed events too: a key that conflicts fails the gathered statement, which then stores
        # each of its events alone, so that every call still gets its own outcome.
        outcome = await self._coalescer.submit(new)
        if isinstance(outcome, DomainError):
            raise outcome
        return outcome

    async def _paced(self, n: int) -> None:
        """Waits for the caller's turn under its ingest rate (``budgets.IngestRate``): a sensor
        sending faster is slowed, then refused; nobody else waits for it."""
        wait = self._rate.take(current_principal().name, n)
        if wait > 0:
            await asyncio.sleep(wait)

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
        nonconforming = [r.event.trigger_ref for r in fresh if r.event.schema_errors]
        if nonconforming:
            metrics.current.nonconforming(nonconforming)
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
        return event_pb2.CreateEventsResponse(receipts=await self.create_batch(new))

    async def create_batch(self, new: list[NewEvent]) -> list[event_pb2.EventReceipt]:
        """Stores a batch as CreateEvents does (all or nothing), paced and traced alike; its
        receipts, in order."""
        await self._paced(len(new))
        results = await finish_anyway(self._create(_traced(new) if self._tracing else new, many=True))
        return [
            event_pb2.EventReceipt(
                event_id=r.event.id,
                created=convert.ts(r.event.created),
                enforcement_ids=[e.id for e in r.enforcements],
                rule_refs=[e.rule_ref for e in r.enforcements],
                replayed=r.replayed,
            )
            for r in results
        ]

    @rpc
    async def Publish(self, request: cloudevents_pb2.CloudEvent, context: Context) -> event_pb2.PublishResponse:
        v = Violations()
        new = cloudevents.to_event(v, "event", request, None, {})
        v.raise_if_any()
        assert new is not None
        result = await self.create_one(new)
        return event_pb2.PublishResponse(
            receipt=event_pb2.EventReceipt(
                event_id=result.event.id,
                created=convert.ts(result.event.created),
                enforcement_ids=[e.id for e in result.enforcements],
                rule_refs=[e.rule_ref for e in result.enforcements],
                replayed=result.replayed,
            ),
            trigger_ref=result.event.trigger_ref,
        )

    @rpc
    async def PublishBatch(
        self, request: cloudevents_pb2.CloudEventBatch, context: Context
    ) -> event_pb2.PublishBatchResponse:
        if not 1 <= len(request.events) <= MAX_BATCH:
            raise InvalidArgument.one("events", f"must hold 1 to {MAX_BATCH} events, got {len(request.events)}")
        v = Violations()
        new = [cloudevents.to_event(v, f"events[{i}]", ce, None, {}) for i, ce in enumerate(request.events)]
        v.raise_if_any()
        return event_pb2.PublishBatchResponse(receipts=await self.create_batch([n for n in new if n is not None]))

    @rpc
    async def ReemitEvent(
        self, request: event_pb2.ReemitEventRequest, context: Context
    ) -> event_pb2.CreateEventResponse:
        id_ = validate.id_or_raise("id", request.id)
        v = Violations()
        validate.text(v, "request_id", request.request_id, limits.MAX_REQUEST_ID)
        v.raise_if_any()
        original = await self._store.events.get(id_, fresh=True)
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
        return await _shown_created(self._store, result)

    @rpc
    async def GetEvent(self, request: event_pb2.GetEventRequest, context: Context) -> common_pb2.Event:
        id_ = validate.id_or_raise("id", request.id)
        reveal = may_reveal(request.reveal)
        (event,) = await shown(self._store, [await self._store.events.get(id_)], reveal=reveal)
        return convert.event(event)

    @rpc
    async def ListEvents(self, request: event_pb2.ListEventsRequest, context: Context) -> event_pb2.ListEventsResponse:
        check_filters(request, refs=("trigger_ref", "rule_ref"), texts=("source_ref",), ids=("reemit_of",))
        size = page_size(request.page_size)
        start, end = time_range_of("created", request.created)
        reveal = may_reveal(request.reveal)
        contains = search.payload_filter(request.payload_contains)
        if contains is not None and not current_principal().may_reveal:
            secret = search.secret_reached(contains, await self._store.schema_versions.marked(request.trigger_ref))
            if secret is not None:
                raise PermissionDenied(
                    f"payload_contains: {secret} reaches a field a trigger schema marks secret; "
                    f"searching on it needs the {REVEAL!r} role"
                )
        searched_from = None
        if contains is not None and start is None and end is None:
            # Compressed chunks hold no payload index: a search over them decompresses every
            # one and a rare value reads them all (seconds on 90 days). Without a range the
            # search covers what is indexed, and the answer says so.
            searched_from = start = await self._store.events.compressed_until()
        filters: dict[str, Any] = {
            "trigger_ref": request.trigger_ref,
            "source_ref": request.source_ref,
            "rule_ref": request.rule_ref,
            "created_from": start,
            "created_to": end,
            "reemit_of": request.reemit_of if request.HasField("reemit_of") else None,
            "payload_contains": search.as_json(contains) if contains is not None else None,
        }
        page = await self._store.events.list(size, request.page_token, **filters)
        items, revealed = await shown_unaudited(self._store, page.items, reveal=reveal)
        page = Page(items, page.next_token, page.token_after)
        response = event_pb2.ListEventsResponse()
        if searched_from is not None:
            convert.set_ts(response.searched_from, searched_from)
        if request.count_matching:
            counted = await self._store.events.count(**filters)
            response.matching_count, response.matching_count_more = counted.n, counted.more
            response.matching_count_stopped = counted.stopped
        response.next_page_token = fill_page(response, response.events, page, convert.fill_event)
        await revealed.audit(self._store, (m.id for m in response.events))
        return response

    @rpc
    async def TailEvents(self, request: event_pb2.TailEventsRequest, context: Context) -> Any:
        async for message in tails.tail_events(self._store, request, ce_source=self._cloudevents_source):
            yield message
