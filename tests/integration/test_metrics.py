"""Metrics of a real api and a real executor (in this process) while events flow, read from
their /metrics endpoints and through a real Prometheus (Debian's package) scraping them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.api import metrics as api_metrics
from services.api.server import ApiServer
from services.api.store import create_pool
from services.executor import Executor
from shared.config import ApiConfig, ClientSecurity, ExecutorConfig
from shared.gen.automation.v1 import event_pb2, event_pb2_grpc, rule_pb2, rule_pb2_grpc
from tests.helpers import OPERATOR, TOKENS, channel, eventually, new_event, rule
from tools.postgres import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
EVENTS = 25


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert answer.status_code == 200
    out: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@dataclasses.dataclass
class Running:
    api: ApiServer
    executor: Executor
    target: str


@asynccontextmanager
async def pipeline(api_config: ApiConfig) -> AsyncIterator[Running]:
    """An api and an executor, both with metrics on (free ports)."""
    api = ApiServer(dataclasses.replace(api_config, metrics_addr="127.0.0.1:0"))
    await api.start()
    target = f"127.0.0.1:{api.port}"
    executor = Executor(
        ExecutorConfig(
            target=target,
            executor_id="metrics-test",
            metrics_addr="127.0.0.1:0",
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
            security=ClientSecurity(token=TOKENS["executor"]),
        )
    )
    task = asyncio.create_task(executor.run())
    try:
        await eventually(lambda: _true(executor.metrics_port > 0), what="the executor's metrics endpoint")
        yield Running(api, executor, target)
    finally:
        executor.stop()
        await asyncio.wait_for(task, 15)
        await api.stop()


async def _true(value: bool) -> bool:
    return value


async def flow(target: str, n: int) -> list[int]:
    """A trigger and a rule, then ``n`` events, each firing one enforcement; their ids."""
    async with channel(target, OPERATOR) as ch:
        rules = rule_pb2_grpc.RuleServiceStub(ch)
        events = event_pb2_grpc.EventServiceStub(ch)
        await rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="demo.metrics")))
        await rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.count", "demo.metrics")))
        ids: list[int] = []
        for i in range(n):
            resp = await events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("demo.metrics", {"n": i})))
            ids.extend(e.id for e in resp.enforcements)
        # One refused call: counted with its code, not as OK.
        with pytest.raises(grpc.aio.AioRpcError):
            await events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("not a ref", {})))
    return ids


async def test_api_and_executor_metrics_count_what_flowed(api_config: ApiConfig) -> None:
    async with pipeline(api_config) as run:
        ids = await flow(run.target, EVENTS)
        assert len(ids) == EVENTS

        async def all_resolved() -> Samples | None:
            s = await scrape(run.api.metrics_port)
            return s if value(s, "automation_enforcements_resolved_total") == EVENTS else None

        api = await eventually(all_resolved, what="every enforcement counted as resolved")
        create = {"grpc_service": "automation.v1.EventService", "grpc_method": "CreateEvent"}
        assert value(api, "grpc_server_started_total", grpc_type="unary", **create) == EVENTS + 1
        assert value(api, "grpc_server_handled_total", grpc_code="OK", **create) == EVENTS
        assert value(api, "grpc_server_handled_total", grpc_code="InvalidArgument", **create) == 1
        assert value(api, "grpc_server_handling_seconds_count", **create) == EVENTS + 1
        assert value(api, "grpc_server_msg_received_total", **create) == EVENTS + 1
        # Series exist at zero before any call (go-grpc-prometheus' InitializeMetrics).
        assert (
            "grpc_server_started_total",
            frozenset(
                {
                    ("grpc_type", "unary"),
                    ("grpc_service", "automation.v1.AuditService"),
                    ("grpc_method", "ListAuditRecords"),
                }
            ),
        ) in api
        # The executor's watch stream is server streaming; its deliveries are messages sent.
        watch = {"grpc_service": "automation.v1.EnforcementService", "grpc_method": "WatchEnforcements"}
        assert value(api, "grpc_server_started_total", grpc_type="server_stream", **watch) >= 1
        assert value(api, "grpc_server_msg_sent_total", **watch) >= EVENTS

        assert value(api, "automation_events_created_total", trigger_ref="demo.metrics") == EVENTS
        assert value(api, "automation_enforcements_created_total", rule_ref="demo.count") == EVENTS
        assert value(api, "automation_enforcements_resolved_total", status="processed") == EVENTS
        assert value(api, "automation_enforcement_resolution_seconds_count", status="processed") == EVENTS
        assert value(api, "automation_matching_seconds_count") == EVENTS
        handed = value(api, "automation_dispatch_handoffs_total")
        claimed = value(api, "automation_dispatch_claimed_total")
        assert handed + claimed >= EVENTS  # every enforcement reached the executor one way or the other
        assert value(api, "automation_notify_announcements_total") >= 1
        assert value(api, "automation_db_pool_max") == api_config.pool_max

        async def refreshed() -> Samples | None:
            s = await scrape(run.api.metrics_port)
            ready = value(s, "automation_watch_streams") == 1 and value(s, "automation_enforcements_pending") == 0
            return s if ready else None

        gauges = await eventually(refreshed, what="the database gauges refreshed")
        assert value(gauges, "automation_enforcement_oldest_pending_seconds") == 0
        assert value(gauges, "automation_enforcements_exhausted") == 0
        assert value(gauges, "process_resident_memory_bytes") > 0

        executor = await scrape(run.executor.metrics_port)
        resolve = {"grpc_service": "automation.v1.EnforcementService", "grpc_method": "ResolveEnforcements"}
        calls = value(executor, "grpc_client_handled_total", grpc_code="OK", **resolve)
        # How many decisions share a call depends on how fast they come (the Batcher sends at
        # once while a call slot is free): the api counted the same calls, each answered OK.
        served = {"grpc_service": "automation.v1.EnforcementService", "grpc_method": "ResolveEnforcements"}
        assert calls == value(gauges, "grpc_server_handled_total", grpc_code="OK", **served) > 0
        assert value(executor, "automation_executor_resolve_batch_size_sum") == EVENTS
        assert value(executor, "automation_executor_resolve_batch_size_count") == calls
        assert value(executor, "automation_executor_decisions_total", outcome="processed") == EVENTS
        assert value(executor, "grpc_client_msg_received_total", grpc_method="WatchEnforcements") >= EVENTS
        assert value(executor, "automation_executor_in_flight") == 0


async def test_refused_calls_are_counted_with_their_code(api_config: ApiConfig) -> None:
    """Authentication refuses before any handler: the call is still counted, as
    Unauthenticated, because the metrics interceptor is the first."""
    api = ApiServer(dataclasses.replace(api_config, metrics_addr="127.0.0.1:0"))
    await api.start()
    try:
        async with channel(f"127.0.0.1:{api.port}", token="atk_not-a-token") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rule_pb2_grpc.RuleServiceStub(ch).ListRules(rule_pb2.ListRulesRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        samples = await scrape(api.metrics_port)
        assert value(samples, "grpc_server_handled_total", grpc_method="ListRules", grpc_code="Unauthenticated") == 1
    finally:
        await api.stop()
    assert api_metrics.current is api_metrics.OFF, "a stopped api leaves metrics off"


async def test_the_pool_waiting_gauge_reads_asyncpg(db_url: str) -> None:
    """asyncpg has no public count of callers waiting for a connection; the gauge reads its
    queue. Hold the only connection and make one more caller wait: it must show."""
    pool = await create_pool(db_url, 1, 1)
    try:
        async with pool.acquire():
            waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
            await eventually(lambda: _true(api_metrics.pool_waiters(pool) == 1), what="one caller waiting")
        assert await waiter == 1
        assert api_metrics.pool_waiters(pool) == 0
    finally:
        await pool.close()


# ---- a real Prometheus -------------------------------------------------------------------------


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("this test needs Debian's prometheus package: apt-get install prometheus (.ci/run installs it)")
    return path


@asynccontextmanager
async def prometheus(tmp_path: Path, targets: dict[str, int]) -> AsyncIterator[str]:
    """Prometheus scraping ``targets`` (job -> port) every second; yields its base URL."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}"]}]} for job, p in targets.items()
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:

            async def ready() -> bool:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                try:
                    return (await http.get(f"{url}/-/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout=30, what="Prometheus to be ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def resolution_buckets(samples: Samples) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of the processed resolutions' histogram, by bound."""
    return sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in samples.items()
        if name == "automation_enforcement_resolution_seconds_bucket" and ("status", "processed") in labels
    )


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile over classic buckets (sorted, the last +Inf): linear within
    the bucket the rank falls in; the highest finite bound when that bucket is +Inf."""
    rank = q * buckets[-1][1]
    b = next(i for i, (_, count) in enumerate(buckets) if count >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    start, below = buckets[b - 1] if b > 0 else (0.0, 0.0)
    end, count = buckets[b]
    return start + (end - start) * (rank - below) / (count - below)


async def query(url: str, promql: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(f"{url}/api/v1/query", params={"query": promql})
    body = answer.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_a_real_prometheus_scrapes_the_api_and_the_executor(api_config: ApiConfig, tmp_path: Path) -> None:
    async with pipeline(api_config) as run:
        targets = {"automation-api": run.api.metrics_port, "automation-executor": run.executor.metrics_port}
        async with prometheus(tmp_path, targets) as url:
            ids = await flow(run.target, EVENTS)
            assert len(ids) == EVENTS
            handled = 'grpc_server_handled_total{grpc_method="CreateEvent",grpc_code="OK"}'
            resolved = 'automation_enforcements_resolved_total{status="processed"}'
            latency = 'automation_enforcement_resolution_seconds_count{status="processed"}'
            decided = 'automation_executor_decisions_total{outcome="processed"}'

            async def scraped() -> dict[str, list[dict[str, Any]]] | None:
                got = {q: await query(url, q) for q in (handled, resolved, latency, decided)}
                values = [float(r[0]["value"][1]) if r else -1.0 for r in got.values()]
                return got if values == [EVENTS] * 4 else None

            results = await eventually(scraped, timeout=60, what="Prometheus to have scraped every count")
            for promql, result in results.items():
                print(f"PromQL {promql} -> {json.dumps(result)}")
            (series,) = results[handled]
            assert series["metric"]["job"] == "automation-api"
            assert series["metric"]["grpc_service"] == "automation.v1.EventService"

            buckets = 'automation_enforcement_resolution_seconds_bucket{status="processed"}'
            p99 = f"histogram_quantile(0.99, sum by (le) ({buckets}))"
            (quantile,) = await query(url, p99)
            print(f"PromQL {p99} -> {json.dumps(quantile)}")
            # Every resolution is in the buckets Prometheus scraped: its answer is the api's own.
            api_buckets = await scrape(run.api.metrics_port)
            expected = histogram_quantile(0.99, resolution_buckets(api_buckets))
            assert float(quantile["value"][1]) == pytest.approx(expected), (quantile, expected)

            assert results[decided][0]["metric"]["job"] == "automation-executor"
            up = await query(url, "up")
            assert sorted((r["metric"]["job"], r["value"][1]) for r in up) == [
                ("automation-api", "1"),
                ("automation-executor", "1"),
            ]
