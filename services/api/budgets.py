"""Shares of the api that no one client can take from the others.

Before these, the api's limits were one pool, first come first served: a viewer opening tails
until refused held all 256 calls, and every other client's CreateEvent, resolve and even
health check was RESOURCE_EXHAUSTED. Now every call (health aside) is counted three ways:

- **its principal's share**: at most ``principal_calls`` calls at once, of which at most
  ``principal_streams`` observing streams (tails, replays, reflection); a principal over its
  share is refused, and only it (watch streams have their own per-principal limits of streams
  and credit: ``EnforcementService._credit_for``);
- **the api's total** (``calls``), of which ``reserve`` only the critical path may take:
  ingest (CreateEvent, CreateEvents, DeliverWebhook) and the executor's (WatchEnforcements,
  Resolve/Release, GetRule). So reads and tails, however many principals send them, can never
  leave ingest and resolutions without a slot;
- **health** is outside every budget (its own path: Check is answered whatever else runs; the
  long-lived, unauthenticated Watch has a small pool of its own).

Ingest is also paced per principal (``IngestRate``): a token bucket of events per second. A
sensor over its rate is slowed (its call waits for its turn, up to ``MAX_INGEST_WAIT_S``),
then refused with the time to come back; its concurrency is bounded by its call share, so a
flood can never queue unbounded work, and it never slows another sensor's calls.

A refusal is RESOURCE_EXHAUSTED with a ``RetryInfo`` and a message naming the budget.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.api._guard import Handler, HandlerCache, responses
from services.api.auth import current_principal
from shared.errors import ResourceExhausted, to_status

_P = "/automation.v1."
CRITICAL = frozenset(
    {
        _P + "EventService/CreateEvent",
        _P + "EventService/CreateEvents",
        _P + "WebhookService/DeliverWebhook",
        _P + "CloudEventService/DeliverCloudEvents",
        _P + "EventService/Publish",
        _P + "EventService/PublishBatch",
        _P + "EnforcementService/WatchEnforcements",
        _P + "EnforcementService/ResolveEnforcement",
        _P + "EnforcementService/ResolveEnforcements",
        _P + "EnforcementService/ReleaseEnforcement",
        # Executors read each enforcement's rule to decide it.
        _P + "RuleService/GetRule",
    }
)
"""Calls that may use the reserve: ingest and the executor's path."""
WATCHES = frozenset({_P + "EnforcementService/WatchEnforcements"})
"""Streams that are not observing: their limits are the watch stream's own."""
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


@dataclass(frozen=True, slots=True)
class Shares:
    """The budgets' sizes (``ApiConfig`` sets them from the environment; README, Security)."""

    calls: int = 512
    """Calls served at once, health aside. With 4 MiB requests this still bounds received
    memory, and the request memory budget (``_guard``) bounds what handling them takes."""
    reserve: int = 128
    """Of ``calls``, what only ingest and the executor's path may use."""
    principal_calls: int = 128
    """Calls one principal may have at once (streams included)."""
    principal_streams: int = 16
    """Observing streams (TailEvents, TailEnforcements, ReplayRule, reflection) per principal:
    a console page holds one per open live view."""
    principal_memory_fraction: float = 0.25
    """The share of the request memory budget one principal's calls may hold at once."""
    health_watches: int = 64
    """Health.Watch streams at once (anyone may open them, without credentials)."""

    def problems(self) -> list[str]:
        out = []
        if self.calls < 1:
            out.append("API_MAX_CALLS must be at least 1")
        if not 0 <= self.reserve < self.calls:
            out.append("API_RESERVED_CALLS must be at least 0 and less than API_MAX_CALLS")
        for name, value in (
            ("API_PRINCIPAL_CALLS", self.principal_calls),
            ("API_PRINCIPAL_STREAMS", self.principal_streams),
            ("API_HEALTH_WATCHES", self.health_watches),
        ):
            if value < 1:
                out.append(f"{name} must be at least 1")
        if not 0 < self.principal_memory_fraction <= 1:
            out.append("API_PRINCIPAL_MEMORY_FRACTION must be in (0, 1]")
        return out


@dataclass(slots=True)
class _Held:
    calls: int = 0
    streams: int = 0


CALL_RETRY_S = 0.25
"""What a refused call is told to wait: calls end in milliseconds."""
STREAM_RETRY_S = 5.0
"""What a refused stream is told to wait: streams end when their clients close them."""


class Budgets:
    """The counters behind ``Shares``; one per api process (single-threaded: asyncio)."""

    def __init__(self, shares: Shares) -> None:
        self.shares = shares
        self.in_flight = 0
        self.health_watches = 0
        self._held: dict[str, _Held] = {}

    def held(self, principal: str) -> tuple[int, int]:
        """(calls, observing streams) the principal holds now."""
        h = self._held.get(principal)
        return (h.calls, h.streams) if h else (0, 0)

    def admit(self, principal: str, method: str, stream: bool) -> Callable[[], None]:
        """Counts a call in, or raises ``ResourceExhausted`` naming the budget it is over;
        returns what counts it out (call it exactly once)."""
        s = self.shares
        critical = method in CRITICAL
        watch = method in WATCHES
        observe = stream and not watch
        limit = s.calls if critical else s.calls - s.reserve
        if self.in_flight >= limit:
            which = "all calls" if critical else f"calls other than ingest and resolutions ({s.reserve} are reserved)"
            raise ResourceExhausted(
                f"the api is at capacity: {self.in_flight} calls in flight, the limit for {which} is {limit}",
                reason="API_CAPACITY",
                retry_after=CALL_RETRY_S,
            )
        h = self._held.get(principal)
        if h is None:
            h = self._held[principal] = _Held()
        if h.calls >= s.principal_calls:
            raise ResourceExhausted(
                f"{principal} has {h.calls} calls in flight, its share is {s.principal_calls} (API_PRINCIPAL_CALLS)",
                reason="PRINCIPAL_CALLS",
                retry_after=CALL_RETRY_S,
            )
        if observe and h.streams >= s.principal_streams:
            raise ResourceExhausted(
                f"{principal} has {h.streams} streams open (tails, replays), its share is {s.principal_streams} "
                "(API_PRINCIPAL_STREAMS): close one first",
                reason="PRINCIPAL_STREAMS",
                retry_after=STREAM_RETRY_S,
            )
        self.in_flight += 1
        h.calls += 1
        h.streams += observe
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            self.in_flight -= 1
            h.calls -= 1
            h.streams -= observe
            if not h.calls:
                self._held.pop(principal, None)

        return release

    def admit_health_watch(self) -> Callable[[], None]:
        if self.health_watches >= self.shares.health_watches:
            raise ResourceExhausted(
                f"{self.health_watches} Health.Watch streams are open, the limit is {self.shares.health_watches} "
                "(API_HEALTH_WATCHES); Health.Check is always answered",
                reason="HEALTH_WATCHES",
                retry_after=STREAM_RETRY_S,
            )
        self.health_watches += 1
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.health_watches -= 1

        return release


class BudgetInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call against ``Budgets``; runs right after authentication, so the
    principal of the call is known (``current_principal``) and a refused call costs nothing
    more: its request is not even decoded."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self._cache = HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method == HEALTH_CHECK:
            return handler
        return self._cache.get(method, handler, lambda: _wrap(handler, method, self._admitter(method)))

    def _admitter(self, method: str) -> Callable[[bool], Callable[[], None]]:
        budgets = self.budgets
        if method == HEALTH_WATCH:
            return lambda stream: budgets.admit_health_watch()
        return lambda stream: budgets.admit(current_principal().name, method, stream)


async def _refused(context: Any, exc: ResourceExhausted) -> None:
    await context.abort_with_status(to_status(exc))


def _wrap(handler: Handler, method: str, admit: Callable[[bool], Callable[[], None]]) -> Handler:
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            try:
                release = admit(False)
            except ResourceExhausted as exc:
                await _refused(context, exc)
                raise AssertionError("unreachable") from None
            try:
                return await inner_uu(request, context)
            finally:
                release()

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)

    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                release = admit(True)
            except ResourceExhausted as exc:
                await _refused(context, exc)
                return
            try:
                async for item in responses(inner_us(request, context)):
                    yield item
            finally:
                release()

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            try:
                release = admit(False)
            except ResourceExhausted as exc:
                await _refused(context, exc)
                raise AssertionError("unreachable") from None
            try:
                return await inner_su(requests, context)
            finally:
                release()

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        try:
            release = admit(True)
        except ResourceExhausted as exc:
            await _refused(context, exc)
            return
        try:
            async for item in responses(inner_ss(requests, context)):
                yield item
        finally:
            release()

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


MAX_INGEST_WAIT_S = 2.0
"""How long a sensor over its rate is slowed before it is refused instead."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class IngestRate:
    """Events per second per principal: a token bucket refilled at the principal's rate that
    holds ``burst_s`` seconds of it (0: unpaced). ``overrides`` gives named principals their
    own rate."""

    rate: float = 2000.0
    burst_s: float = 2.0
    overrides: Mapping[str, float] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def rate_of(self, principal: str) -> float:
        return self.overrides.get(principal, self.rate)

    def take(self, principal: str, n: int) -> float:
        """Takes ``n`` events of the principal's rate: the seconds its call must wait for its
        turn (0 within the burst), or ``ResourceExhausted`` past ``MAX_INGEST_WAIT_S``. A
        batch bigger than the burst passes when the bucket is full."""
        rate = self.rate_of(principal)
        if rate <= 0:
            return 0.0
        burst = max(rate * self.burst_s, float(n))
        now = time.monotonic()
        b = self._buckets.get(principal)
        if b is None:
            if len(self._buckets) >= 10_000:  # a bucket idle for a burst's time is full: forget those
                self._buckets = {k: v for k, v in self._buckets.items() if now - v.stamp < self.burst_s}
            b = self._buckets[principal] = _Bucket(burst, now)
        tokens = min(burst, b.tokens + (now - b.stamp) * rate) - n
        wait = -tokens / rate if tokens < 0 else 0.0
        if wait > MAX_INGEST_WAIT_S:
            raise ResourceExhausted(
                f"{principal} sends events faster than its ingest rate of {rate:g} events/s "
                "(API_INGEST_RATE); slow down",
                reason="INGEST_RATE",
                retry_after=wait - MAX_INGEST_WAIT_S,
            )
        b.tokens, b.stamp = tokens, now
        return wait
