"""OpenTelemetry traces of a real api and a real executor in this process: one CreateEvent is one
trace, across the watch stream (hand-off and claim), into the executor's decision and its
ResolveEnforcements call. Spans go to an in-memory exporter.

The provider is made once for the module (OpenTelemetry allows one global provider per process)
and handed to ``setup_tracing`` by the ``traced`` fixture, which turns tracing off again after
each test: servers and executors built later (any other test) install nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import grpc
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.api import migrate
from services.api.server import ApiServer
from services.api.store import Store, create_pool
from services.executor import Executor
from shared import tracing
from shared.config import ApiConfig, ClientSecurity, ConfigError, ExecutorConfig
from shared.gen.automation.v1 import (
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    rule_pb2,
    rule_pb2_grpc,
)
from shared.transport import open_channel
from tests.helpers import OPERATOR, TOKENS, eventually, new_event, rule

TRIGGER = "demo.traced"
RULE = "demo.traced_rule"
CREATE = "/automation.v1.EventService/CreateEvent"
RESOLVE = "/automation.v1.EnforcementService/ResolveEnforcements"
GET_RULE = "/automation.v1.RuleService/GetRule"
PIPELINE = {
    (CREATE, SpanKind.CLIENT),
    (CREATE, SpanKind.SERVER),
    ("dispatch", SpanKind.PRODUCER),
    ("decide enforcement", SpanKind.CONSUMER),
    (GET_RULE, SpanKind.CLIENT),
    (GET_RULE, SpanKind.SERVER),
    (RESOLVE, SpanKind.CLIENT),
    (RESOLVE, SpanKind.SERVER),
}
"""The spans of one event's trace, each once: (name, kind)."""


# --- fixtures and helpers -----------------------------------------------------------------


@dataclasses.dataclass
class Memory:
    provider: TracerProvider
    exporter: InMemorySpanExporter


@pytest.fixture(scope="module")
def memory() -> Iterator[Memory]:
    exporter = InMemorySpanExporter()
    provider = tracing.new_provider("automation-test")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Memory(provider, exporter)
    provider.shutdown()


@pytest.fixture
def traced(memory: Memory) -> Iterator[InMemorySpanExporter]:
    """Tracing on for one test (spans in the returned exporter); off again afterwards."""
    memory.exporter.clear()
    assert tracing.setup_tracing("automation-test", provider=memory.provider)
    try:
        yield memory.exporter
    finally:
        tracing.shutdown_tracing()
        memory.exporter.clear()


def executor_for(target: str) -> Executor:
    return Executor(
        ExecutorConfig(
            target=target,
            executor_id="trace-test",
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
            security=ClientSecurity(token=TOKENS["executor"]),
        )
    )


@asynccontextmanager
async def running(executor: Executor) -> AsyncIterator[Executor]:
    task = asyncio.create_task(executor.run())
    try:
        yield executor
    finally:
        executor.stop()
        await asyncio.wait_for(task, 15)


@asynccontextmanager
async def api_server(config: ApiConfig) -> AsyncIterator[ApiServer]:
    api = ApiServer(config)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


def client(target: str) -> grpc.aio.Channel:
    """The operator's channel, traced when tracing is on (a client span per call)."""
    return open_channel(target, ClientSecurity(token=OPERATOR), interceptors=tracing.client_interceptors())


async def define(target: str) -> None:
    async with client(target) as ch:
        rules = rule_pb2_grpc.RuleServiceStub(ch)
        await rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=TRIGGER)))
        await rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule(RULE, TRIGGER)))


async def create_event(target: str) -> int:
    """One CreateEvent (firing one enforcement); its enforcement's id."""
    async with client(target) as ch:
        events = event_pb2_grpc.EventServiceStub(ch)
        answer = await events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(TRIGGER, {"n": 1})))
    [enforcement] = answer.enforcements
    return enforcement.id


def one(spans: Sequence[ReadableSpan], name: str, kind: SpanKind | None = None) -> ReadableSpan:
    found = [s for s in spans if s.name == name and (kind is None or s.kind == kind)]
    assert len(found) == 1, f"{len(found)} spans {name} ({kind}) in {[(s.name, s.kind) for s in spans]}"
    return found[0]


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def trace_of(exporter: InMemorySpanExporter, enforcement_id: int) -> list[ReadableSpan]:
    """The spans of the trace holding the CreateEvent client span, once it holds the api's
    ResolveEnforcements server span (the last of the pipeline)."""

    async def complete() -> list[ReadableSpan] | None:
        spans = exporter.get_finished_spans()
        starts = [s for s in spans if s.name == CREATE and s.kind == SpanKind.CLIENT]
        if not starts:
            return None
        trace_id = ids(starts[-1])[0]
        mine = [s for s in spans if ids(s)[0] == trace_id]
        ended = {(s.name, s.kind) for s in mine}
        return mine if ended >= PIPELINE else None

    return await eventually(complete, what=f"the trace of enforcement {enforcement_id} to reach its resolution")


def check_pipeline(spans: Sequence[ReadableSpan], enforcement_id: int, path: str) -> str:
    """The parent links of one event's trace; returns the CreateEvent server span's traceparent."""
    create_client = one(spans, CREATE, SpanKind.CLIENT)
    create_server = one(spans, CREATE, SpanKind.SERVER)
    dispatch = one(spans, "dispatch")
    decide = one(spans, "decide enforcement")
    resolve_client = one(spans, RESOLVE, SpanKind.CLIENT)
    resolve_server = one(spans, RESOLVE, SpanKind.SERVER)
    trace_id = ids(create_client)[0]
    assert {ids(s)[0] for s in spans} == {trace_id}
    assert parent_id(create_client) is None
    assert parent_id(create_server) == ids(create_client)[1]
    assert parent_id(dispatch) == ids(create_server)[1]
    assert parent_id(decide) == ids(dispatch)[1]
    assert parent_id(resolve_client) == ids(decide)[1]
    assert parent_id(resolve_server) == ids(resolve_client)[1]
    assert create_server.parent is not None and create_server.parent.is_remote
    assert decide.parent is not None and decide.parent.is_remote
    assert dispatch.kind == SpanKind.PRODUCER and decide.kind == SpanKind.CONSUMER
    assert dict(dispatch.attributes or {}) == {
        "enforcement.id": enforcement_id,
        "rule.ref": RULE,
        "dispatch.path": path,
        "dispatch.attempt": 1,
        "executor.id": "trace-test",
    }
    attrs = dict(decide.attributes or {})
    assert (attrs["enforcement.id"], attrs["rule.ref"], attrs["decision"]) == (enforcement_id, RULE, "PROCESSED")
    # The rule lookup is a part of the decision; the statements are parts of their calls.
    get_rule = one(spans, GET_RULE, SpanKind.CLIENT)
    assert parent_id(get_rule) == ids(decide)[1]
    for server in (create_server, resolve_server):
        statements = [s for s in spans if parent_id(s) == ids(server)[1] and s.kind == SpanKind.CLIENT]
        assert statements, f"no statement span under {server.name}"
        assert all((s.attributes or {}).get("db.system") == "postgresql" for s in statements)
    # The stored traceparent names the CreateEvent server span.
    assert create_server.context is not None
    return tracing.traceparent(trace.NonRecordingSpan(create_server.context)) or ""


async def stored_traceparent(db_url: str, enforcement_id: int) -> str | None:
    conn = await asyncpg.connect(db_url)
    try:
        value: str | None = await conn.fetchval("SELECT traceparent FROM enforcement WHERE id = $1", enforcement_id)
        return value
    finally:
        await conn.close()


async def first_delivery(target: str) -> enforcement_pb2.Delivery:
    """The first delivery of a WatchEnforcements stream opened as the executor."""
    async with open_channel(target, ClientSecurity(token=TOKENS["executor"])) as ch:
        stub = enforcement_pb2_grpc.EnforcementServiceStub(ch)
        call = stub.WatchEnforcements(enforcement_pb2.WatchEnforcementsRequest(executor_id="raw", max_in_flight=4))
        try:
            async for message in call:
                if message.HasField("delivery"):
                    return message.delivery
        finally:
            call.cancel()
    raise AssertionError("the stream ended without a delivery")


# --- one trace per event ------------------------------------------------------------------


async def test_hand_off_joins_the_executor_to_the_event_trace(
    traced: InMemorySpanExporter, api_config: ApiConfig
) -> None:
    async with api_server(api_config) as api, running(executor_for(f"127.0.0.1:{api.port}")):
        target = f"127.0.0.1:{api.port}"
        await define(target)
        await eventually(lambda: _true(api.dispatcher.stream_credit()[1] > 0), what="the executor's stream")
        enforcement_id = await create_event(target)
        spans = await trace_of(traced, enforcement_id)
        expected = check_pipeline(spans, enforcement_id, "handoff")
        assert await stored_traceparent(api_config.database_url, enforcement_id) == expected


async def test_claim_joins_the_executor_to_the_event_trace(traced: InMemorySpanExporter, api_config: ApiConfig) -> None:
    async with api_server(api_config) as api:
        target = f"127.0.0.1:{api.port}"
        await define(target)
        # No stream yet: the enforcement waits in enforcement_dispatch with its traceparent.
        enforcement_id = await create_event(target)
        stored = await stored_traceparent(api_config.database_url, enforcement_id)
        assert stored is not None
        async with running(executor_for(target)):
            spans = await trace_of(traced, enforcement_id)
        assert check_pipeline(spans, enforcement_id, "claim") == stored
        dispatch = one(spans, "dispatch")
        create_server = one(spans, CREATE, SpanKind.SERVER)
        # The dispatch span covers the wait: from the enforcement's creation to its claim.
        assert dispatch.start_time is not None and create_server.end_time is not None
        assert dispatch.start_time <= create_server.end_time


async def test_delivery_carries_the_dispatch_span(traced: InMemorySpanExporter, api_config: ApiConfig) -> None:
    async with api_server(api_config) as api:
        target = f"127.0.0.1:{api.port}"
        await define(target)
        enforcement_id = await create_event(target)
        delivery = await first_delivery(target)
        assert delivery.enforcement.id == enforcement_id
        version, trace_hex, span_hex, flags = delivery.traceparent.split("-")
        dispatch = one(traced.get_finished_spans(), "dispatch")
        assert version == "00" and int(flags, 16) & 1  # sampled
        assert (int(trace_hex, 16), int(span_hex, 16)) == ids(dispatch)
        # Its parent is the span the enforcement was stored with: CreateEvent's server span.
        create_server = one(traced.get_finished_spans(), CREATE, SpanKind.SERVER)
        assert parent_id(dispatch) == ids(create_server)[1]
        stored = await stored_traceparent(api_config.database_url, enforcement_id)
        assert stored == f"00-{trace_hex}-{ids(create_server)[1]:016x}-{flags}"


async def test_a_batch_call_joins_the_first_decision_and_links_the_others(traced: InMemorySpanExporter) -> None:
    """ResolveEnforcements carrying several decisions has one parent: the first decision's span;
    the decisions' spans link to it and it to them."""
    executor = executor_for("127.0.0.1:1")
    tracer = tracing.tracer("test")
    assert tracer is not None
    seen: list[trace.Span] = []

    async def call(method: object, request: Any, m: object = None) -> enforcement_pb2.ResolveEnforcementsResponse:
        seen.append(trace.get_current_span())
        return enforcement_pb2.ResolveEnforcementsResponse(
            outcomes=[enforcement_pb2.ResolutionOutcome(id=d.id) for d in request.decisions]
        )

    executor._call = call  # type: ignore[method-assign]
    executor._enforcements = SimpleNamespace(ResolveEnforcements=None)  # type: ignore[assignment]
    first, second, third = (tracer.start_span(f"decide {n}") for n in range(3))
    for n, span in enumerate((first, second, third), start=1):
        executor._deciding[n] = span
    decisions = [enforcement_pb2.ResolveEnforcementRequest(id=n) for n in (1, 2, 3)]
    outcomes = await executor._send_decisions(decisions)
    assert [o.id for o in outcomes] == [1, 2, 3]
    assert seen == [first]
    for span in (first, second, third):
        span.end()
    by_name = {s.name: s for s in traced.get_finished_spans()}
    a, b, c = by_name["decide 0"], by_name["decide 1"], by_name["decide 2"]
    assert [link.context.span_id for link in a.links] == [ids(b)[1], ids(c)[1]]
    assert [link.context.span_id for link in b.links] == [ids(a)[1]]
    assert [link.context.span_id for link in c.links] == [ids(a)[1]]
    assert (a.attributes or {})["resolve.batch_size"] == 3


# --- off ----------------------------------------------------------------------------------


async def test_off_records_nothing_and_stores_no_traceparent(memory: Memory, api_config: ApiConfig) -> None:
    """Tracing off (and after the tests above turned it on and off again): no span, no
    instrumentation, an empty Delivery.traceparent and a NULL column."""
    assert not tracing.enabled()
    assert not AsyncPGInstrumentor().is_instrumented_by_opentelemetry  # type: ignore[no-untyped-call]
    assert tracing.client_interceptors() == [] and tracing.server_interceptors() == []
    memory.exporter.clear()
    async with api_server(api_config) as api:
        target = f"127.0.0.1:{api.port}"
        await define(target)
        enforcement_id = await create_event(target)
        assert await stored_traceparent(api_config.database_url, enforcement_id) is None
        delivery = await first_delivery(target)
        assert delivery.enforcement.id == enforcement_id
        assert delivery.traceparent == ""
        # The whole pipeline, with an executor, still records nothing.
        async with running(executor_for(target)) as executor:
            await create_event(target)
            await eventually(lambda: _true(executor.resolved >= 1), what="a resolution")
    assert memory.exporter.get_finished_spans() == ()


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
    ],
)
def test_on_only_when_the_environment_says_where_to(env: dict[str, str], on: bool) -> None:
    assert tracing.configured(env) is on


def test_an_unknown_exporter_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="zipkin"):
        tracing.configured({"OTEL_TRACES_EXPORTER": "zipkin"})
    # Off, setup does nothing at all.
    assert tracing.setup_tracing("automation-test", env={}) is False
    assert not tracing.enabled()


def test_service_name_defaults_to_the_service_and_yields_to_otel_service_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    assert tracing.new_provider("automation-api").resource.attributes["service.name"] == "automation-api"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "api-eu-1")
    assert tracing.new_provider("automation-api").resource.attributes["service.name"] == "api-eu-1"


def test_lone_statements_are_not_sampled_but_statements_inside_a_call_are(memory: Memory) -> None:
    tracer = memory.provider.get_tracer("test")
    lone = tracer.start_span("SELECT", kind=SpanKind.CLIENT, attributes={"db.system": "postgresql"})
    assert not lone.is_recording()
    with tracer.start_as_current_span("call"):
        inside = tracer.start_span("SELECT", kind=SpanKind.CLIENT, attributes={"db.system": "postgresql"})
        assert inside.is_recording()
        inside.end()


# --- the migration on TimescaleDB -----------------------------------------------------------


@pytest.mark.timescale_licensed
async def test_migration_0013_applies_on_compressed_chunks(empty_db_url: str, tmp_path: Path) -> None:
    """0013 on a database whose enforcement hypertable has a compressed chunk: the old row reads
    back with a NULL traceparent and can still be claimed and resolved."""
    before = tmp_path / "before"
    before.mkdir()
    for path in migrate.MIGRATIONS_DIR.glob("*.sql"):
        if int(path.name[:4]) < 13:
            shutil.copy(path, before / path.name)
    await migrate.migrate_url(empty_db_url, before)
    conn = await asyncpg.connect(empty_db_url)
    try:
        enforcement_id = await conn.fetchval(
            """
            INSERT INTO enforcement (rule_ref, trigger_ref, config, created)
            VALUES ('demo.gone', 'demo.old', '{}', now() - interval '10 days') RETURNING id"""
        )
        compressed = await conn.fetch(
            "SELECT compress_chunk(c)::text FROM show_chunks('enforcement', older_than => INTERVAL '7 days') c"
        )
        assert len(compressed) == 1
        # 0013 first, then every later one (0014 changes the compression settings) on top.
        assert [m.version for m in await migrate.migrate(conn)][:1] == [13]
        row = await conn.fetchrow("SELECT id, traceparent FROM enforcement WHERE id = $1", enforcement_id)
        assert row is not None and row["traceparent"] is None
        assert await conn.fetchval(
            "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'enforcement' AND range_end < now() - interval '7 days'"
        )
    finally:
        await conn.close()
    store = Store(await create_pool(empty_db_url, 1, 2))
    try:
        [delivery] = await store.dispatch.claim(executor_id="old", token="old/1", limit=4, lease_s=5.0, max_attempts=5)
        assert (delivery.enforcement.id, delivery.traceparent) == (enforcement_id, None)
    finally:
        await store.close()


async def _true(value: bool) -> bool:
    return value
