"""EnforcementService: enforcements created, read, tailed, resolved, watched by executors,
released and retried, and the dispatch state operators look at."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2
from opentelemetry.trace import SpanKind

from services.api import convert, metrics, validate
from services.api._rpc import rpc
from services.api.auth import EXECUTOR, current_principal
from services.api.dispatcher import Dispatcher, Subscription
from services.api.servicers import tails
from services.api.servicers.requests import (
    Context,
    actor_of_call,
    check_filters,
    fill_page,
    finish_anyway,
    lease_holder,
    may_reveal,
    shown,
    shown_unaudited,
    status_filter,
    time_range_of,
)
from services.api.store import Delivery, Page, Store, page_size
from services.api.store.dispatch import ExhaustedFilter
from shared import limits, tracing
from shared.config import ApiConfig
from shared.errors import (
    DomainError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Violations,
)
from shared.gen.automation.v1 import (
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
)

log = logging.getLogger(__name__)
_RESOLVABLE = (common_pb2.ENFORCEMENT_STATUS_PROCESSED, common_pb2.ENFORCEMENT_STATUS_DISABLED)
REPLICA = f"{socket.gethostname()}-{os.getpid()}"
"""This api process, as the executors view names it: streams live in one replica's memory."""
_OUTCOMES = {
    "released": enforcement_pb2.ATTEMPT_OUTCOME_RELEASED,
    "lease_expired": enforcement_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED,
    "exhausted": enforcement_pb2.ATTEMPT_OUTCOME_EXHAUSTED,
    "retried": enforcement_pb2.ATTEMPT_OUTCOME_RETRIED,
}


@dataclass
class _Stream:
    """What the executors view shows of a watch stream beyond the dispatcher's own state."""

    executor_id: str
    principal: str
    connected: datetime
    rule_refs: list[str]
    trigger_refs: list[str]
    last_delivery: datetime | None = None


@dataclass
class _Executors:
    """The watch streams of this replica and when each (principal, executor id) last had a
    resolution here. Resolutions are recorded only for keys with an open stream, so the map
    stays as small as the streams are few."""

    streams: dict[Subscription, _Stream] = field(default_factory=dict)
    open_keys: Counter[tuple[str, str]] = field(default_factory=Counter)
    last_resolve: dict[tuple[str, str], datetime] = field(default_factory=dict)

    def opened(self, sub: Subscription, stream: _Stream) -> None:
        self.streams[sub] = stream
        self.open_keys[(stream.principal, stream.executor_id)] += 1

    def closed(self, sub: Subscription) -> None:
        stream = self.streams.pop(sub, None)
        if stream is None:
            return
        key = (stream.principal, stream.executor_id)
        self.open_keys[key] -= 1
        if self.open_keys[key] <= 0:
            del self.open_keys[key]
            self.last_resolve.pop(key, None)

    def resolving(self, principal: str, executor_ids: set[str]) -> None:
        if not self.open_keys:
            return
        now: datetime | None = None
        for executor_id in executor_ids:
            key = (principal, executor_id)
            if key in self.open_keys:
                now = now or datetime.now(UTC)
                self.last_resolve[key] = now


class EnforcementService(enforcement_pb2_grpc.EnforcementServiceServicer):
    def __init__(self, store: Store, dispatcher: Dispatcher, config: ApiConfig, shutdown: asyncio.Event) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._config = config
        self._shutdown = shutdown
        # Tracing on: every hand-out is a "dispatch" span in the trace of the enforcement's creation.
        self._tracer = tracing.tracer("services.api.dispatch")
        self._executors = _Executors()

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
        (enforcement,) = await shown(self._store, [enforcement])
        return enforcement_pb2.CreateEnforcementResponse(
            enforcement=convert.enforcement(enforcement), replayed=replayed
        )

    @rpc
    async def GetEnforcement(
        self, request: enforcement_pb2.GetEnforcementRequest, context: Context
    ) -> common_pb2.Enforcement:
        id_ = validate.id_or_raise("id", request.id)
        reveal = may_reveal(request.reveal)
        (enforcement,) = await shown(self._store, [await self._store.enforcements.get(id_)], reveal=reveal)
        return convert.enforcement(enforcement)

    @rpc
    async def ListEnforcements(
        self, request: enforcement_pb2.ListEnforcementsRequest, context: Context
    ) -> enforcement_pb2.ListEnforcementsResponse:
        check_filters(request, refs=("rule_ref", "trigger_ref"), ids=("event",))
        size = page_size(request.page_size)
        start, end = time_range_of("created", request.created)
        status = status_filter(request.status, convert.ENFORCEMENT_STATUS_NAME)
        reveal = may_reveal(request.reveal)
        filters: dict[str, Any] = {
            "rule_ref": request.rule_ref,
            "event": request.event if request.HasField("event") else None,
            "status": status,
            "trigger_ref": request.trigger_ref,
            "created_from": start,
            "created_to": end,
        }
        page = await self._store.enforcements.list(size, request.page_token, **filters)
        items, revealed = await shown_unaudited(self._store, page.items, reveal=reveal)
        page = Page(items, page.next_token, page.token_after)
        response = enforcement_pb2.ListEnforcementsResponse()
        if request.count_matching:
            counted = await self._store.enforcements.count(**filters)
            response.matching_count, response.matching_count_more = counted.n, counted.more
            response.matching_count_stopped = counted.stopped
        response.next_page_token = fill_page(response, response.enforcements, page, convert.fill_enforcement)
        await revealed.audit(self._store, (m.id for m in response.enforcements))
        return response

    @rpc
    async def TailEnforcements(self, request: enforcement_pb2.TailEnforcementsRequest, context: Context) -> Any:
        async for message in tails.tail_enforcements(
            self._store, request, self._shutdown, self._config.poll_s, self._config.cloudevents_source
        ):
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
        result = await self._store.enforcements.resolve(id_, status, lease_holder())
        self._dispatcher.resolved(id_)
        self._executors.resolving(current_principal().name, {request.executor_id})
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
        resolved = result.enforcement
        if EXECUTOR not in current_principal().roles:
            # Executors act on clear values; anyone else resolving (an operator) reads masked.
            (resolved,) = await shown(self._store, [resolved])
        response = enforcement_pb2.ResolveEnforcementResponse(
            enforcement=convert.enforcement(resolved), replayed=result.replayed
        )
        if result.execution is not None:
            response.execution.CopyFrom(convert.execution(result.execution))
        return response

    @rpc
    async def ResolveEnforcements(
        self, request: enforcement_pb2.ResolveEnforcementsRequest, context: Context
    ) -> enforcement_pb2.ResolveEnforcementsResponse:
        if not 1 <= len(request.decisions) <= limits.MAX_BATCH:
            raise InvalidArgument.one(
                "decisions", f"must hold 1 to {limits.MAX_BATCH} decisions, got {len(request.decisions)}"
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
        results = await finish_anyway(self._store.enforcements.resolve_many(decisions, lease_holder()))
        self._executors.resolving(current_principal().name, {d.executor_id for d in request.decisions})
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
            actor = actor_of_call()
            reason = request.error or f"released by operator {principal.name}"
            released = await self._store.dispatch.force_release(id_, actor, reason)
        else:
            # Anyone else only what its own streams hold (operators: any principal's, by name).
            released = await self._store.dispatch.release(
                id_, request.executor_id, request.error or "released", lease_holder()
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
        stream = _Stream(
            request.executor_id,
            principal.name,
            datetime.now(UTC),
            list(request.rule_refs),
            list(request.trigger_refs),
        )
        self._executors.opened(sub, stream)
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
                    stream.last_delivery = datetime.now(UTC)
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
                        stream.last_delivery = datetime.now(UTC)
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
            self._executors.closed(sub)
            # Give back what this stream holds so that another executor gets it now, not when
            # the lease runs out. Best effort: if the database is down the lease expires.
            # finish_anyway: a stream cancelled here still gives back, and a failure that comes
            # after the stream has gone is retrieved, not logged as "never retrieved".
            with contextlib.suppress(Exception):  # the lease expiry covers every failure here
                await finish_anyway(self._store.dispatch.release_stream(token, f"{reason} ({request.executor_id})"))
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
                retry_after=5.0,
            )
        left = limits.MAX_CREDIT_PER_PRINCIPAL - sum(sub.credit for sub in streams)
        if left <= 0:
            raise ResourceExhausted(
                f"{principal}'s watch streams already hold {limits.MAX_CREDIT_PER_PRINCIPAL} credit on this api "
                "(max_in_flight in all); close a stream first",
                reason="TOO_MUCH_CREDIT",
                retry_after=5.0,
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
        actor = actor_of_call()
        await self._store.dispatch.retry(id_, actor)
        self._dispatcher.wake_all()
        (retried,) = await shown(self._store, [await self._store.enforcements.get(id_, fresh=True)])
        return enforcement_pb2.RetryEnforcementResponse(enforcement=convert.enforcement(retried))

    @rpc
    async def ListExecutors(
        self, request: enforcement_pb2.ListExecutorsRequest, context: Context
    ) -> enforcement_pb2.ListExecutorsResponse:
        # Taken before the await below: a stream that closes meanwhile leaves ``streams``, and
        # is still listed as it was when the call began.
        known = self._executors.streams
        pairs = sorted(
            ((sub, known[sub]) for sub in self._dispatcher.subscriptions() if sub in known),
            key=lambda pair: pair[1].connected,
        )
        leases = await self._store.dispatch.leases_by_token([sub.token for sub, _ in pairs if sub.token])
        response = enforcement_pb2.ListExecutorsResponse(api_replica=REPLICA, server_time=convert.ts(datetime.now(UTC)))
        for sub, stream in pairs:
            item = response.executors.add(
                executor_id=stream.executor_id,
                principal=stream.principal,
                connected_since=convert.ts(stream.connected),
                in_flight=len(sub.held),
                credit=sub.credit,
                leases_held=leases.get(sub.token, 0),
                api_replica=REPLICA,
                rule_refs=stream.rule_refs,
                trigger_refs=stream.trigger_refs,
                starved=sub.starved,
            )
            if (last := self._executors.last_resolve.get((stream.principal, stream.executor_id))) is not None:
                item.last_resolve.CopyFrom(convert.ts(last))
            if stream.last_delivery is not None:
                item.last_delivery.CopyFrom(convert.ts(stream.last_delivery))
        return response

    @rpc
    async def ListAttempts(
        self, request: enforcement_pb2.ListAttemptsRequest, context: Context
    ) -> enforcement_pb2.ListAttemptsResponse:
        id_ = validate.id_or_raise("enforcement", request.enforcement)
        # NOT_FOUND for an enforcement that does not exist, as GetEnforcement answers.
        await self._store.enforcements.get(id_)
        pending = await self._store.dispatch.pending(id_)
        attempts = await self._store.dispatch.attempts(id_)
        response = enforcement_pb2.ListAttemptsResponse()
        if pending is not None:
            d = response.dispatch
            d.attempts = pending.attempts
            d.leased_by = pending.leased_by or ""
            d.last_error = pending.last_error or ""
            if pending.lease_expires_at is not None:
                d.lease_expires_at.CopyFrom(convert.ts(pending.lease_expires_at))
            if pending.exhausted_at is not None:
                d.exhausted_at.CopyFrom(convert.ts(pending.exhausted_at))
        for a in attempts:
            response.attempts.add(
                attempt=a.attempt,
                outcome=_OUTCOMES.get(a.outcome, enforcement_pb2.ATTEMPT_OUTCOME_UNSPECIFIED),
                executor_id=a.executor_id or "",
                principal=a.principal or "",
                error=a.error or "",
                time=convert.ts(a.time),
            )
        return response

    @rpc
    async def RetryEnforcements(
        self, request: enforcement_pb2.RetryEnforcementsRequest, context: Context
    ) -> enforcement_pb2.RetryEnforcementsResponse:
        v = Violations()
        ids = list(request.ids)
        if request.all_exhausted:
            if ids:
                v.add("ids", "give ids or all_exhausted, not both")
        elif not 1 <= len(ids) <= limits.MAX_BATCH:
            v.add("ids", f"must hold 1 to {limits.MAX_BATCH} ids (or set all_exhausted), got {len(ids)}")
        elif len(set(ids)) != len(ids):
            v.add("ids", "each id at most once")
        for i, id_ in enumerate(ids[: limits.MAX_BATCH]):
            validate.positive_id(v, f"ids[{i}]", id_)
        if not request.all_exhausted:
            for name in ("rule_ref", "trigger_ref"):
                if getattr(request, name):
                    v.add(name, "only with all_exhausted (ids name the enforcements themselves)")
            if request.HasField("created"):
                v.add("created", "only with all_exhausted")
        v.raise_if_any()
        check_filters(request, refs=("rule_ref", "trigger_ref"))
        start, end = time_range_of("created", request.created)
        which = ExhaustedFilter(
            ids=ids, rule_ref=request.rule_ref, trigger_ref=request.trigger_ref, created_from=start, created_to=end
        )
        retried, matched = await self._store.dispatch.retry_many(
            which, None if request.validate_only else actor_of_call(), request.validate_only
        )
        if retried and not request.validate_only:
            self._dispatcher.wake_all()
        return enforcement_pb2.RetryEnforcementsResponse(ids=retried, matched=matched)
