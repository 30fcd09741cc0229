"""OpenTelemetry traces: off unless the environment says where to send them.

On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, or
``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``; ``none`` is off), as
OpenTelemetry's environment specification has it; ``OTEL_SDK_DISABLED=true`` wins over both.
Every other standard variable (headers, certificates, timeouts, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``) is read by the SDK itself.

``setup_tracing(name)``, called once by each process's ``__main__``, makes an SDK
``TracerProvider`` (resource ``service.name`` = ``name`` unless ``OTEL_SERVICE_NAME`` says
otherwise) exporting through a ``BatchSpanProcessor``, sets it as the global provider, and
instruments asyncpg (one span per statement). The services then ask :func:`enabled` once, when
they are built, and only then install the gRPC interceptors (:func:`server_interceptors`,
:func:`client_interceptors`) and create their own few spans. Off, nothing is installed, no span
is made and nothing here runs on a request's path.

What is traced: every RPC on both sides, except health checks and the streams that outlive any
request (``WatchEnforcements``, ``TailEvents``, ``TailEnforcements``: a span of an executor's
stream would last for hours and gather every claim and lease renewal of that time); the work a
watch stream carries is traced per delivery instead (``Delivery.traceparent``). Statements are
traced inside a traced call; a statement outside any (the api's maintenance and health loops,
token reloads, announcements) would be a trace of one span every few seconds, so it is not
sampled (unless ``OTEL_TRACES_SAMPLER`` chooses the sampler).

Tests hand ``setup_tracing`` an exporter (spans are exported synchronously when they end) or a
provider of their own, and call :func:`shutdown_tracing` to turn tracing off again: servers and
executors built afterwards install nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.config import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("shared.tracing")

__all__ = [
    "client_interceptors",
    "configured",
    "enabled",
    "extract",
    "server_interceptors",
    "setup_tracing",
    "shutdown_tracing",
    "traceparent",
    "tracer",
]

UNTRACED_METHODS = ("WatchEnforcements", "TailEvents", "TailEnforcements")
"""Long-lived streams: no span of their own (see the module's docstring)."""
_EXPORTERS = ("otlp", "console", "none")
_W3C = TraceContextTextMapPropagator()


@dataclass
class _State:
    provider: TracerProvider
    owned: bool
    """Made here (shut down here) rather than handed in by a test."""
    asyncpg: bool
    """asyncpg was instrumented here (and is uninstrumented at shutdown)."""


_state: _State | None = None


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for; [] when tracing stays off. ConfigError for an
    exporter this build does not have."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if raw:
        names = [n.strip() for n in raw.split(",") if n.strip()]
        unknown = [n for n in names if n not in _EXPORTERS]
        if unknown:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: unsupported exporter {unknown[0]!r}; use {', '.join(_EXPORTERS)}")
        return [n for n in names if n != "none"]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return ["otlp"]
    return []


def configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment turns tracing on (ConfigError for an unknown exporter)."""
    return bool(_exporter_names(os.environ if env is None else env))


def _sampler(env: Mapping[str, str]) -> Any:
    """The SDK's sampler from ``OTEL_TRACES_SAMPLER`` when set (None); otherwise: follow the
    parent, and at the root sample every span except a lone statement."""
    if env.get("OTEL_TRACES_SAMPLER", "").strip():
        return None
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult

    class LoneStatementsDropped(Sampler):
        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: trace.SpanKind | None = None,
            attributes: Any = None,
            links: Sequence[trace.Link] | None = None,
            trace_state: trace.TraceState | None = None,
        ) -> SamplingResult:
            if attributes and ("db.system" in attributes or "db.system.name" in attributes):
                return SamplingResult(Decision.DROP)
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

        def get_description(self) -> str:
            return "LoneStatementsDropped"

    return ParentBased(root=LoneStatementsDropped())


def new_provider(service_name: str, env: Mapping[str, str] | None = None) -> TracerProvider:
    """An SDK provider for ``service_name`` (``OTEL_SERVICE_NAME`` overrides it) with this
    module's sampler, and no span processor yet."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    env = os.environ if env is None else env
    attributes = {} if env.get("OTEL_SERVICE_NAME", "").strip() else {"service.name": service_name}
    return TracerProvider(resource=Resource.create(attributes), sampler=_sampler(env))


def setup_tracing(
    service_name: str,
    *,
    exporter: SpanExporter | None = None,
    provider: TracerProvider | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Turns tracing on for this process when the environment asks for it (or ``exporter`` /
    ``provider`` are given); returns whether it is on. ConfigError for an unknown exporter.

    ``exporter`` (tests): spans go to it synchronously as they end (``SimpleSpanProcessor``).
    ``provider`` (tests): used as it is, and left running by :func:`shutdown_tracing`.
    The first provider set up becomes the global one (OpenTelemetry allows one per process);
    this module's interceptors, instrumentation and spans use the current one explicitly.
    """
    global _state
    env = os.environ if env is None else env
    if _state is not None:
        shutdown_tracing()
    owned = provider is None
    if provider is None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        if exporter is not None:
            provider = new_provider(service_name, env)
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            names = _exporter_names(env)
            if not names:
                return False
            provider = new_provider(service_name, env)
            for name in names:
                provider.add_span_processor(BatchSpanProcessor(_make_exporter(name)))
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    instrumented = not instrumentor.is_instrumented_by_opentelemetry
    if instrumented:
        instrumentor.instrument(tracer_provider=provider)
    _state = _State(provider, owned, instrumented)
    if owned and exporter is None:
        log.info("tracing on: spans of %s exported (%s)", service_name, ", ".join(_exporter_names(env)))
    return True


def _make_exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # Endpoint, headers, TLS and timeout from the OTEL_EXPORTER_OTLP_* variables.
    return OTLPSpanExporter()


def shutdown_tracing() -> None:
    """Exports what is buffered and turns tracing off (a no-op when it is off)."""
    global _state
    state, _state = _state, None
    if state is None:
        return
    if state.asyncpg:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
    if state.owned:
        state.provider.shutdown()
    else:
        state.provider.force_flush()


def enabled() -> bool:
    """Whether tracing is on in this process."""
    return _state is not None


def tracer(name: str) -> trace.Tracer | None:
    """A tracer for the spans a module makes itself; None when tracing is off."""
    return None if _state is None else _state.provider.get_tracer(name)


def _filter() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    untraced: list[Any] = [filters.health_check(), *(filters.method_name(m) for m in UNTRACED_METHODS)]
    return filters.negate(filters.any_of(*untraced))


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The api's tracing interceptor ([] when tracing is off)."""
    if _state is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    made = aio_server_interceptor(tracer_provider=_state.provider, filter_=_filter())  # type: ignore[no-untyped-call]
    return [cast(grpc.aio.ServerInterceptor, made)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A client channel's tracing interceptors, one per kind of call ([] when tracing is off)."""
    if _state is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    made = aio_client_interceptors(tracer_provider=_state.provider, filter_=_filter())  # type: ignore[no-untyped-call]
    return cast(list[grpc.aio.ClientInterceptor], made)


def traceparent(span: trace.Span | None = None) -> str | None:
    """The W3C ``traceparent`` of ``span`` (else of the current span); None when tracing is off
    or there is no valid span. Trace state is not carried."""
    if _state is None:
        return None
    sc = (span or trace.get_current_span()).get_span_context()
    if not sc.is_valid:
        return None
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def extract(value: str | None) -> Context:
    """A context whose remote parent is the span ``value`` (a W3C ``traceparent``) names; an
    empty context (a new trace) when it is empty or not valid."""
    if not value:
        return Context()
    return _W3C.extract({"traceparent": value}, context=Context())
