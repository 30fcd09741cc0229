"""The executor: watches pending enforcements, decides each, resolves it through the api.

It holds no database connection. Exactly-once does not rest on it: the api resolves with one
conditional statement, so a duplicate or late decision (after a lease was lost, say) is
answered as a retry or refused, never applied twice.

One bad enforcement must not take the others down with it: a delivery that does not decode is
released on its own (its id read from the raw bytes), and whatever goes wrong while one is
decided releases that one, with the reason, while the stream and the rest carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry

from shared import tracing
from shared.batching import Batcher
from shared.config import ExecutorConfig
from shared.gen.automation.v1 import (
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    rule_pb2,
    rule_pb2_grpc,
)
from shared.limits import MAX_MESSAGE_BYTES
from shared.metrics import MethodMetrics, process_registry
from shared.metrics import serve as serve_metrics
from shared.metrics import stop as stop_metrics
from shared.runtime import client_keepalive
from shared.transport import open_channel

from ._metrics import ExecutorMetrics
from ._salvage import Unsalvageable, salvage_delivery

log = logging.getLogger("services.executor")

PROCESSED = common_pb2.ENFORCEMENT_STATUS_PROCESSED
DISABLED = common_pb2.ENFORCEMENT_STATUS_DISABLED
M = TypeVar("M", bound=Message)
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
_WATCH = enforcement_pb2.DESCRIPTOR.services_by_name["EnforcementService"].methods_by_name["WatchEnforcements"]
_WATCH_PATH = f"/{_WATCH.containing_service.full_name}/{_WATCH.name}"
MAX_RELEASE_ERROR = 500
"""Characters of the error a release records (the api keeps up to 1,024; the log has the rest)."""


def _bounded(text: str, limit: int = MAX_RELEASE_ERROR) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _describe(exc: BaseException) -> str:
    return _bounded(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _answer(answer: object, kind: type[M], method: str) -> M:
    """``answer`` as a ``kind``. grpc answers None for a response it could not decode (it
    only logs why), and an assert would vanish under ``python -O``."""
    if isinstance(answer, kind):
        return answer
    if answer is None:
        raise ValueError(f"{method}: undecodable answer")
    raise TypeError(f"{method} answered {type(answer).__name__}, not {kind.__name__}")


def _status_name(status: common_pb2.EnforcementStatus.ValueType) -> str:
    return common_pb2.EnforcementStatus.Name(status).removeprefix("ENFORCEMENT_STATUS_")


def default_executor_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class Decision:
    status: common_pb2.EnforcementStatus.ValueType
    reason: str


class Executor:
    """Runs until ``stop()``; reconnects after any disconnect with capped, jittered backoff."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self.executor_id = config.executor_id or default_executor_id()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._rules: dict[int, tuple[float, rule_pb2.Rule]] = {}
        self._rule_lookups: dict[int, asyncio.Task[rule_pb2.Rule | None]] = {}
        """The GetRule call in flight per rule, which every decision needing that rule awaits."""
        self.resolved = 0
        self._decisions: Batcher[enforcement_pb2.ResolveEnforcementRequest, enforcement_pb2.ResolutionOutcome] = (
            Batcher(self._send_decisions)
        )
        self._health_touched = float("-inf")
        # Traces only when on (shared/tracing.py): a span per decision, client spans per call.
        self._tracer = tracing.tracer("services.executor")
        self._deciding: dict[int, trace.Span] = {}
        """The span of each enforcement being decided (tracing on), for its resolution's call."""
        # Metrics only when asked for (METRICS_ADDR); off, nothing is recorded.
        self.registry: CollectorRegistry | None = None
        self._m: ExecutorMetrics | None = None
        self._metrics_http: Any = None
        if config.metrics_addr:
            self.registry = process_registry()
            # The task set changes on the loop's thread; its length is read at scrape time.
            self._m = ExecutorMetrics(self.registry, lambda: len(self._tasks))

    @property
    def metrics_port(self) -> int:
        """The port serving /metrics (0 when metrics are off)."""
        return int(self._metrics_http.server_port) if self._metrics_http is not None else 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        cfg = self.config
        # gRPC's own reconnect backoff grows to 120 s by default: after a long api outage the
        # channel would stay in backoff (every call failing fast) long after the api is back.
        # Cap it at ours.
        backoff_ms = max(int(cfg.backoff_max_s * 1000), 100)
        options = [
            # Keepalive pings find a silent path (blackhole, lost host) on which the watch
            # stream would otherwise wait for a heartbeat forever: TCP still looks open.
            *client_keepalive(cfg.keepalive_s),
            # How long a connection attempt may take (gRPC: 20 s), at most one keepalive
            # interval: a handshake nobody answers is as dead as an unanswered ping, and the
            # watch call waits for it.
            ("grpc.min_reconnect_backoff_ms", min(max(int(cfg.keepalive_s * 1000), 1000), 20_000)),
            ("grpc.initial_reconnect_backoff_ms", min(max(int(cfg.backoff_initial_s * 1000), 100), backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        # TLS and a client certificate as configured (shared/transport.py). The token goes with
        # each call rather than through a channel interceptor: grpc.aio runs an interceptor as
        # one more task per call, measured at ~10 % of unary throughput at 16 in flight.
        token = cfg.security.token
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        # Tracing off, no interceptor at all (see the token's note above for what one costs).
        traced = tracing.client_interceptors() if self._tracer is not None else []
        async with open_channel(
            cfg.target, dataclasses.replace(cfg.security, token=""), options, interceptors=traced
        ) as channel:
            self._enforcements = enforcement_pb2_grpc.EnforcementServiceStub(channel)
            # The stream hands us raw bytes: grpc's own decoding would turn an undecodable
            # message into a bare None, losing the bytes that say which enforcement it was.
            self._watch: grpc.aio.UnaryStreamMultiCallable[enforcement_pb2.WatchEnforcementsRequest, bytes] = (
                channel.unary_stream(
                    _WATCH_PATH,
                    request_serializer=enforcement_pb2.WatchEnforcementsRequest.SerializeToString,
                    response_deserializer=None,
                )
            )
            self._rule_stub = rule_pb2_grpc.RuleServiceStub(channel)
            if self.registry is not None and self._metrics_http is None:
                self._metrics_http = serve_metrics(cfg.metrics_addr, self.registry)
                log.info("metrics at http://%s:%d/metrics", cfg.metrics_addr.rpartition(":")[0], self.metrics_port)
            try:
                await self._run_streams()
                await self._drain()
            finally:
                if self._metrics_http is not None:
                    stop_metrics(self._metrics_http)
                    self._metrics_http = None

    async def _run_streams(self) -> None:
        """Watch streams, one after another, until stopped (reconnecting with backoff)."""
        cfg = self.config
        delay = cfg.backoff_initial_s
        while not self._stopping.is_set():
            connected = await self._watch_once()
            if self._stopping.is_set():
                break
            if self._m is not None:
                self._m.reconnects.inc()
            delay = cfg.backoff_initial_s if connected else min(delay * 2, cfg.backoff_max_s)
            # Full jitter: many executors restarting at once do not reconnect in step.
            wait = random.uniform(0, delay)
            log.info("reconnecting to %s in %.2fs", cfg.target, wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    async def _watch_once(self) -> bool:
        """One stream's life; True when it delivered anything (a healthy connection)."""
        request = enforcement_pb2.WatchEnforcementsRequest(
            executor_id=self.executor_id, max_in_flight=self.config.max_in_flight
        )
        call = self._watch(request, metadata=self._metadata)
        watch = self._m.watch if self._m is not None else None
        if watch is not None:
            watch.started.inc()
            watch.sent.inc()
        opened = time.perf_counter()
        code = grpc.StatusCode.OK
        stopper = asyncio.ensure_future(self._stopping.wait())
        stopper.add_done_callback(lambda _f: call.cancel())
        got_any = False
        try:
            log.info(
                "watching enforcements on %s as %s",
                self.config.target,
                self.executor_id,
                extra={"executor_id": self.executor_id},
            )
            async for raw in call:
                got_any = True
                if watch is not None:
                    watch.received.inc()
                self._touch_health_file()
                try:
                    message = enforcement_pb2.WatchEnforcementsResponse.FromString(raw)
                except Exception as exc:  # noqa: BLE001 - what the decoder refuses costs one message, not the stream
                    self._undecodable(raw, exc)
                    continue
                if message.HasField("delivery"):
                    self._spawn(self._handle(message.delivery))
            log.info("watch stream ended by the api")
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if exc.code() != grpc.StatusCode.CANCELLED or not self._stopping.is_set():
                log.warning("watch stream failed: %s %s", exc.code().name, exc.details())
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            if not self._stopping.is_set():
                raise
        finally:
            stopper.cancel()
            if watch is not None:
                watch.handled(code, opened)
        return got_any

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # _handle catches everything itself; this is the net under that net, so that nothing
        # a task raises is lost unseen.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("enforcement task failed unexpectedly", exc_info=exc)

    def _undecodable(self, raw: bytes, exc: Exception) -> None:
        """Releases the enforcement of a watch message that does not decode, if its id can be
        read: the api charges that one an attempt and, after the last, marks it exhausted for
        an operator. Without an id the lease runs out on its own."""
        reason = _describe(exc)
        try:
            found = salvage_delivery(raw)
        except Unsalvageable as why:
            log.warning("dropped an undecodable watch message (%d bytes, %s): %s", len(raw), reason, why)
            return
        log.warning(
            "enforcement %d (rule %r, attempt %d): undecodable delivery (%d bytes, %s); releasing it",
            found.id,
            found.rule_ref or "?",
            found.attempt,
            len(raw),
            reason,
            extra={"enforcement_id": found.id, "rule_ref": found.rule_ref},
        )
        self._spawn(self._give_back(found.id, _bounded(f"undecodable delivery: {reason}")))

    def _touch_health_file(self) -> None:
        """Marks the stream alive for container health checks (at most once a second)."""
        path = self.config.health_file
        now = time.monotonic()
        if not path or now - self._health_touched < 1.0:
            return
        self._health_touched = now
        try:
            with open(path, "a"):
                os.utime(path)
        except OSError as exc:
            log.warning("cannot touch health file %s: %s", path, exc)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("waiting up to %.0fs for %d decision(s) in flight", self.config.grace_s, len(self._tasks))
        _done, pending = await asyncio.wait(set(self._tasks), timeout=self.config.grace_s)
        for task in pending:
            task.cancel()

    async def _rule(self, rule_id: int) -> rule_pb2.Rule | None:
        """The rule, from a short cache of enabled rules; None when it no longer exists.

        Decisions that need a rule the cache does not hold share one GetRule call. Each used
        to send its own: when an entry expired, every enforcement of that rule arriving before
        the answer asked again, and over a slow link to the database (answers in seconds) that
        was tens of identical calls per rule, holding the api's pool connections that ingest
        waited for, and each one that missed its deadline cost the api its connection.
        """
        cached = self._rules.get(rule_id)
        if cached and time.monotonic() - cached[0] < self.config.rule_cache_s:
            return cached[1]
        lookup = self._rule_lookups.get(rule_id)
        if lookup is None:
            lookup = asyncio.create_task(self._fetch_rule(rule_id))
            self._rule_lookups[rule_id] = lookup
            lookup.add_done_callback(lambda t: self._lookup_done(rule_id, t))
        # Shielded: one decision given up (its stream ended) does not fail the others' lookup.
        return await asyncio.shield(lookup)

    def _lookup_done(self, rule_id: int, task: asyncio.Task[rule_pb2.Rule | None]) -> None:
        self._rule_lookups.pop(rule_id, None)
        if not task.cancelled():
            task.exception()  # each waiter handles it; retrieved here for when none is left

    async def _fetch_rule(self, rule_id: int) -> rule_pb2.Rule | None:
        now = time.monotonic()
        try:
            answer = await self._call(
                self._rule_stub.GetRule, rule_pb2.GetRuleRequest(id=rule_id), self._m.get_rule if self._m else None
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                self._rules.pop(rule_id, None)
                return None
            raise
        rule = _answer(answer, rule_pb2.Rule, "GetRule")
        # Only enabled rules are cached: a stale "enabled" costs one refused PROCESSED (the
        # api re-checks at commit), while a stale "disabled" would be a wrong decision.
        if rule.enabled:
            self._rules[rule_id] = (now, rule)
        else:
            self._rules.pop(rule_id, None)
        return rule

    async def decide(self, enforcement: common_pb2.Enforcement) -> Decision:
        if not enforcement.HasField("rule"):
            return Decision(DISABLED, f"rule {enforcement.rule_ref} was deleted")
        rule = await self._rule(enforcement.rule)
        if rule is None:
            return Decision(DISABLED, f"rule {enforcement.rule_ref} was deleted")
        if not rule.enabled:
            return Decision(DISABLED, f"rule {rule.ref} is disabled")
        if not rule.action_ref:
            return Decision(DISABLED, f"rule {rule.ref} has no action")
        return Decision(PROCESSED, f"rule {rule.ref} is enabled; requesting {rule.action_ref}")

    async def _call(self, method: object, request: object, m: MethodMetrics | None = None) -> object:
        """A unary call with a deadline, retried while the api is unavailable (bounded).
        ``m``: the method's client metrics, each attempt counted (None: metrics off)."""
        delay = self.config.backoff_initial_s
        deadline = time.monotonic() + max(self.config.rpc_timeout_s * 3, 5.0)
        while True:
            started = time.perf_counter()
            if m is not None:
                m.started.inc()
                m.sent.inc()
            try:
                answer = await method(  # type: ignore[operator]
                    request, timeout=self.config.rpc_timeout_s, metadata=self._metadata
                )
                if m is not None:
                    m.received.inc()
                    m.handled(grpc.StatusCode.OK, started)
                return answer
            except grpc.aio.AioRpcError as exc:
                if m is not None:
                    m.handled(exc.code(), started)
                if exc.code() not in _RETRYABLE or time.monotonic() > deadline or self._stopping.is_set():
                    raise
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, self.config.backoff_max_s)

    async def _send_decisions(
        self, batch: list[enforcement_pb2.ResolveEnforcementRequest]
    ) -> list[enforcement_pb2.ResolutionOutcome]:
        # One decision per enforcement: the api refuses a batch that names one twice, all of it
        # (INVALID_ARGUMENT). An enforcement redelivered while its first delivery was still
        # being decided is decided twice, and when both wait for the same GetRule they arrive
        # here together. The others get the first one's outcome, as a retry would.
        first: dict[int, int] = {}
        unique: list[enforcement_pb2.ResolveEnforcementRequest] = []
        for decision in batch:
            if decision.id not in first:
                first[decision.id] = len(unique)
                unique.append(decision)
        outcomes = await self._send_unique(unique)
        if len(outcomes) != len(unique):
            raise RuntimeError(f"{len(outcomes)} outcomes for {len(unique)} decisions")
        return [outcomes[first[decision.id]] for decision in batch]

    async def _send_unique(
        self, batch: list[enforcement_pb2.ResolveEnforcementRequest]
    ) -> list[enforcement_pb2.ResolutionOutcome]:
        request = enforcement_pb2.ResolveEnforcementsRequest(decisions=batch)
        if self._m is not None:
            self._m.batch_size.observe(len(batch))
        metrics = self._m.resolve if self._m else None
        if self._tracer is None:
            answer = await self._call(self._enforcements.ResolveEnforcements, request, metrics)
        else:
            # The Batcher's task inherited whichever decision started it: the call joins the
            # trace chosen here instead.
            with trace.use_span(self._batch_parent(batch), record_exception=False, set_status_on_exception=False):
                answer = await self._call(self._enforcements.ResolveEnforcements, request, metrics)
        return list(_answer(answer, enforcement_pb2.ResolveEnforcementsResponse, "ResolveEnforcements").outcomes)

    def _batch_parent(self, batch: list[enforcement_pb2.ResolveEnforcementRequest]) -> trace.Span:
        """The span a ResolveEnforcements call is a child of: the "decide enforcement" span of
        its first decision (of the first sampled one, if any). A call has one parent, so when
        it carries several decisions their spans and the parent's link to each other."""
        spans = [span for r in batch if (span := self._deciding.get(r.id)) is not None]
        if not spans:
            return trace.INVALID_SPAN
        parent = next((span for span in spans if span.get_span_context().trace_flags.sampled), spans[0])
        if len(spans) > 1:
            parent.set_attribute("resolve.batch_size", len(batch))
            for span in spans:
                if span is not parent:
                    span.add_link(parent.get_span_context(), {"link.reason": "resolved by the call of this span"})
                    parent.add_link(span.get_span_context(), {"link.reason": "resolved in this span's call too"})
        return parent

    async def _resolve(self, id_: int, decision: Decision) -> enforcement_pb2.ResolutionOutcome:
        return await self._decisions.submit(
            enforcement_pb2.ResolveEnforcementRequest(
                id=id_, status=decision.status, executor_id=self.executor_id, reason=decision.reason
            )
        )

    async def _handle(self, delivery: enforcement_pb2.Delivery) -> None:
        if self._tracer is None:
            await self._decide_and_resolve(delivery.enforcement, None)
            return
        enforcement = delivery.enforcement
        # A child of the api's hand-out of this enforcement (Delivery.traceparent), itself a
        # child of the call that created it: the decision, its lookups and its resolution join
        # the event's trace. Without a traceparent, a trace of its own.
        with self._tracer.start_as_current_span(
            "decide enforcement",
            context=tracing.extract(delivery.traceparent),
            kind=SpanKind.CONSUMER,
            attributes={
                "enforcement.id": enforcement.id,
                "rule.ref": enforcement.rule_ref,
                "delivery.attempt": delivery.attempt,
                "executor.id": self.executor_id,
            },
        ) as span:
            self._deciding[enforcement.id] = span
            try:
                await self._decide_and_resolve(enforcement, span)
            finally:
                if self._deciding.get(enforcement.id) is span:
                    del self._deciding[enforcement.id]

    async def _decide_and_resolve(self, enforcement: common_pb2.Enforcement, span: trace.Span | None) -> None:
        id_ = enforcement.id
        try:
            decision = await self.decide(enforcement)
            if span is not None:
                span.set_attribute("decision", _status_name(decision.status))
            outcome = await self._resolve(id_, decision)
            if outcome.error.reason == "RULE_NOT_ENABLED" and decision.status == PROCESSED:
                # The rule was disabled between our look and the commit.
                self._rules.pop(enforcement.rule, None)
                decision = Decision(DISABLED, f"{outcome.error.message} (refused at commit)")
                if span is not None:
                    span.set_attribute("decision", _status_name(decision.status))
                outcome = await self._resolve(id_, decision)
            if outcome.HasField("error"):
                error = outcome.error
                if error.reason == "ALREADY_RESOLVED" or error.code == grpc.StatusCode.NOT_FOUND.value[0]:
                    log.info(
                        "enforcement %d: nothing to do (%s)",
                        id_,
                        error.message,
                        extra={"enforcement_id": id_, "rule_ref": enforcement.rule_ref},
                    )
                    return
                await self._release(id_, f"{error.reason}: {error.message}", span)
                return
            self.resolved += 1
            status = _status_name(outcome.status)
            if self._m is not None:
                self._m.outcomes["processed" if outcome.status == PROCESSED else "disabled"].inc()
            extra = f", execution {outcome.execution_id}" if outcome.HasField("execution_id") else ""
            retry = " (already resolved so)" if outcome.replayed else ""
            log.info(
                "enforcement %d %s%s%s: %s",
                id_,
                status,
                extra,
                retry,
                decision.reason,
                extra={"enforcement_id": id_, "rule_ref": enforcement.rule_ref},
            )
        except grpc.aio.AioRpcError as exc:
            await self._release(id_, _bounded(f"{exc.code().name}: {exc.details()}"), span)
        except Exception as exc:
            # Not a transport failure but a surprise (a bug, an answer we cannot use). It must
            # not reach the other enforcements: this one is released, with the gist for the
            # api and the traceback for the log, once.
            log.warning(
                "enforcement %d: %s while handling it; releasing it",
                id_,
                type(exc).__name__,
                exc_info=True,
                extra={"enforcement_id": id_, "rule_ref": enforcement.rule_ref},
            )
            if span is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, _describe(exc)))
            await self._give_back(id_, _describe(exc))

    async def _release(self, id_: int, error: str, span: trace.Span | None = None) -> None:
        """Gives an enforcement back so another attempt comes soon; if even that fails, the
        lease expires."""
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, f"released: {error}"))
        log.warning(
            "enforcement %d not resolved: %s",
            id_,
            error,
            extra={"enforcement_id": id_, "executor_id": self.executor_id},
        )
        await self._give_back(id_, error)

    async def _give_back(self, id_: int, error: str) -> None:
        m = self._m
        if m is not None:
            m.outcomes["released"].inc()
            m.release.started.inc()
            m.release.sent.inc()
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            await self._enforcements.ReleaseEnforcement(
                enforcement_pb2.ReleaseEnforcementRequest(id=id_, executor_id=self.executor_id, error=error),
                timeout=self.config.rpc_timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()  # the lease runs out instead
        if m is not None:
            if code == grpc.StatusCode.OK:
                m.release.received.inc()
            m.release.handled(code, started)
