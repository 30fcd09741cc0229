"""Prometheus metrics both services share: the gRPC RPC metrics, bounded labels, ``/metrics``.

The RPC metrics have the names and labels of the gRPC ecosystem's Prometheus interceptors
(go-grpc-prometheus, which py-grpc-prometheus and grpc-ecosystem's middleware copy):
``grpc_server_started_total``, ``grpc_server_handled_total`` (with ``grpc_code`` in Go's
spelling: ``OK``, ``InvalidArgument``, ``Unavailable``, ...), ``grpc_server_msg_received_total``,
``grpc_server_msg_sent_total`` and the ``grpc_server_handling_seconds`` histogram, labelled
``grpc_type`` / ``grpc_service`` / ``grpc_method``; ``grpc_client_*`` on the client side
(``RpcMetrics("client")``, recorded by the executor around its calls: a grpc.aio client
interceptor runs as one more task per call, about 10 % of unary throughput). A stock gRPC
dashboard or alert therefore works unchanged.

Metrics are off unless ``METRICS_ADDR`` is set: then ``serve`` starts prometheus_client's
HTTP server (its own thread; a scrape reads counters, never the event loop's state) and the
interceptors are installed. Off, nothing is installed and nothing is counted.

Cost: every labelled child a call touches is looked up once per method (when its handler is
first wrapped) and kept, so a call costs a few counter increments and one observation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

REGISTRY_LABELS = ("grpc_type", "grpc_service", "grpc_method")

_GO_NAMES = {grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled"}
GRPC_CODES: dict[grpc.StatusCode, str] = {
    code: _GO_NAMES.get(code, "".join(part.capitalize() for part in code.name.split("_"))) for code in grpc.StatusCode
}
"""grpc's status codes as go-grpc-prometheus names them in ``grpc_code``."""

UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = "unary", "client_stream", "server_stream", "bidi_stream"

OTHER = "other"


def grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    if request_streaming:
        return BIDI_STREAM if response_streaming else CLIENT_STREAM
    return SERVER_STREAM if response_streaming else UNARY


def split_method(full: str) -> tuple[str, str]:
    """``("automation.v1.EventService", "CreateEvent")`` for ``/automation.v1.EventService/CreateEvent``."""
    service, _, method = full.lstrip("/").partition("/")
    return service, method


class Capped:
    """A label's values, bounded: the first ``cap`` distinct values are kept, later ones are
    counted under ``other`` (a trigger or rule reference set is unbounded)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.cap:
            return OTHER
        self._seen.add(value)
        return value


class RpcMetrics:
    """One side's (``server`` or ``client``) RPC metrics in ``registry``."""

    def __init__(self, side: str, registry: CollectorRegistry) -> None:
        labels = REGISTRY_LABELS
        self.started = Counter(f"grpc_{side}_started_total", f"RPCs started on the {side}.", labels, registry=registry)
        self.handled = Counter(
            f"grpc_{side}_handled_total",
            f"RPCs completed on the {side}, whatever their status.",
            (*labels, "grpc_code"),
            registry=registry,
        )
        self.received = Counter(
            f"grpc_{side}_msg_received_total", f"Stream messages received on the {side}.", labels, registry=registry
        )
        self.sent = Counter(
            f"grpc_{side}_msg_sent_total", f"Stream messages sent on the {side}.", labels, registry=registry
        )
        self.seconds = Histogram(
            f"grpc_{side}_handling_seconds",
            f"Time from an RPC's start to its completion on the {side}.",
            labels,
            registry=registry,
        )

    def method(self, kind: str, full_method: str) -> MethodMetrics:
        return MethodMetrics(self, (kind, *split_method(full_method)))


class MethodMetrics:
    """The children of one method's series, looked up once."""

    __slots__ = ("_codes", "_handled", "_labels", "_seconds", "received", "seconds", "sent", "started")

    def __init__(self, rpc: RpcMetrics, labels: tuple[str, str, str]) -> None:
        self.started = rpc.started.labels(*labels)
        self.received = rpc.received.labels(*labels)
        self.sent = rpc.sent.labels(*labels)
        # Made at the first completion: a histogram is 17 series, and a method never called
        # would only make every scrape longer.
        self.seconds: Any = None
        self._seconds = rpc.seconds
        self._handled = rpc.handled
        self._codes: dict[grpc.StatusCode, Any] = {}
        self._labels = labels

    def initialize(self) -> None:
        """The OK series exist (at zero) before the first call."""
        self._codes[grpc.StatusCode.OK] = self._handled.labels(*self._labels, GRPC_CODES[grpc.StatusCode.OK])

    def handled(self, code: grpc.StatusCode, started: float) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._handled.labels(*self._labels, GRPC_CODES[code])
        child.inc()
        if self.seconds is None:
            self.seconds = self._seconds.labels(*self._labels)
        self.seconds.observe(time.perf_counter() - started)


# ---- server side ----------------------------------------------------------------------------

Handler = Any  # grpc's stubs type handlers for the sync server; the aio ones differ


def _code_of(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


class ServerMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call a handler serves (put it first: it then also sees the
    calls that authentication or decoding refuse)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rpc = RpcMetrics("server", registry)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def initialize(self, services: Iterable[Any]) -> None:
        """Series at zero for every method of ``services`` (descriptors), as go-grpc-prometheus'
        InitializeMetrics does: a rate over a counter that appears late misses its first calls."""
        for service in services:
            for m in service.methods:
                kind = grpc_type(m.client_streaming, m.server_streaming)
                self.rpc.method(kind, f"/{service.full_name}/{m.name}").initialize()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        if len(self._wrapped) < 1024:  # refusal handlers are made per call: do not keep those
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Handler, method: str) -> Handler:
        kind = grpc_type(handler.request_streaming, handler.response_streaming)
        m = self.rpc.method(kind, method)
        serdes = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        async def answered(call: Callable[[], Awaitable[Any]], context: Any) -> Any:
            """A call with one answer: counted, timed, and its status recorded."""
            m.started.inc()
            started = time.perf_counter()
            exc: BaseException | None = None
            try:
                response = await call()
                m.sent.inc()
                return response
            except BaseException as e:
                exc = e
                raise
            finally:
                m.handled(_code_of(context, exc), started)

        if kind == UNARY:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                m.received.inc()
                return await answered(lambda: inner(request, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **serdes)

        def streamed(source: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async def counted() -> AsyncIterator[Any]:
                async for item in source:
                    m.received.inc()
                    yield item

            return counted()

        async def responses(call: Callable[[], Any], context: Any) -> AsyncIterator[Any]:
            m.started.inc()
            started = time.perf_counter()
            exc: BaseException | None = None
            try:
                result = call()
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        m.sent.inc()
                        yield item
                else:
                    # A handler that writes with context.write and returns a coroutine (grpc's
                    # own Health.Watch): its messages go out without passing here.
                    await result
            except BaseException as e:
                exc = e
                raise
            finally:
                m.handled(_code_of(context, exc), started)

        if kind == SERVER_STREAM:
            inner_us = handler.unary_stream

            # grpc.aio tells an async handler from a sync one by its function: it must be an
            # async generator function itself, not return one.
            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                m.received.inc()
                async for item in responses(lambda: inner_us(request, context), context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, **serdes)

        if kind == BIDI_STREAM:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                async for item in responses(lambda: inner_ss(streamed(requests), context), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(stream_stream, **serdes)

        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
            return await answered(lambda: inner_su(streamed(requests), context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **serdes)


def process_registry() -> CollectorRegistry:
    """A registry of one process's metrics, with prometheus_client's process_* and python_* ones."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def stop(server: Any) -> None:
    """Stops a server ``serve`` started and frees its port."""
    server.shutdown()
    server.server_close()


def serve(addr: str, registry: CollectorRegistry) -> Any:
    """Serves ``registry`` at ``http://addr/metrics`` from a thread; returns the server (its
    ``server_port`` is the port taken, for ``:0``). The ``_created`` series (one per series,
    the time it was made) are left out: no dashboard reads them, and they make every scrape,
    which holds the GIL while it renders, a quarter longer."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    host, _, port = addr.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    return server
