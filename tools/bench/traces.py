"""Scenario ``tracing``: what OpenTelemetry traces cost, on vs off, in the same run.

Two identical sides, each its own database (on the same PostgreSQL), api and executor: one with
tracing off (``OTEL_SDK_DISABLED=true``, whatever this shell exports), one with it on, exporting
over OTLP/gRPC (the SDK's ``BatchSpanProcessor`` and OTLP exporter, as in production) to a
collector stand-in served by this process, which decodes each export, counts its spans and
drops them. Every span is sampled (no sampler set). Repetitions alternate between the sides.
Rows:

* ingest: CreateEvent at c=16, no executor attached (the api's server span and statements);
* pipeline: CreateEvent at c=16 while an executor resolves every enforcement (dispatch spans,
  the executor's decisions and calls, ResolveEnforcements in the api).

The "raw" column is the side with tracing off; the ratio is what tracing costs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from . import workload
from .fixture import Cluster, channel, services
from .ingest import summary
from .load import alternate, closed_loop
from .report import Row
from .settings import Settings

TRIGGER = "bench.traced"
RULES = ["bench.traced_a", "bench.traced_b"]
CONCURRENCY = 16
OFF = {"OTEL_SDK_DISABLED": "true"}


class _Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector that keeps nothing: counts the spans and exports it received."""

    def __init__(self) -> None:
        self.spans = 0
        self.exports = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.exports += 1
        self.spans += sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.asynccontextmanager
async def _collector() -> AsyncIterator[tuple[str, _Sink]]:
    """The sink on a free port; yields its OTLP endpoint and the sink."""
    sink = _Sink()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"http://127.0.0.1:{port}", sink
    finally:
        await server.stop(1)


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    off_url = await cluster.fresh_database("tracing_off")
    on_url = await cluster.fresh_database("tracing_on")
    rows: list[Row] = []
    async with _collector() as (endpoint, sink), services(off_url) as off_svc, services(on_url) as on_svc:
        on = {"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        off_target = await off_svc.start_api(None, **OFF)
        on_target = await on_svc.start_api(None, **on)
        async with channel(off_target) as off_ch, channel(on_target) as on_ch:
            for ch in (off_ch, on_ch):
                await workload.define(ch, TRIGGER, RULES)
            off_create, on_create = workload.create_event(off_ch, TRIGGER), workload.create_event(on_ch, TRIGGER)
            for f in (off_create, on_create):
                await closed_loop(f, 4, 0.3)

            async def measure(label: str) -> Row:
                spans_before = sink.spans
                off_runs, on_runs = await alternate(
                    f"tracing {label} c={CONCURRENCY}", off_create, on_create, CONCURRENCY, s.reps, s.rep_s
                )
                row, _ = summary(f"tracing on: {label} c={CONCURRENCY}", off_runs, on_runs, items=False)
                calls = sum(r.count for r in on_runs)
                row.notes += (
                    "; raw = the same with tracing off (own database, api and executor), reps alternate; "
                    f"{sink.spans - spans_before:,} spans exported over OTLP for {calls:,} calls"
                )
                return row

            rows.append(await measure("CreateEvent"))
            await off_svc.start_executors(1, **OFF)
            await on_svc.start_executors(1, **on)
            rows.append(await measure("pipeline (CreateEvent + executor)"))
    await cluster.drop(off_url)
    await cluster.drop(on_url)
    return rows
