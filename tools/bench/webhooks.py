"""Scenario ``webhooks``: ``POST /webhooks/{key}`` -> 202 through the web service, next to
CreateEvent, both at c=16 against the same trigger and rules, in the same run.

The web service runs as its own process (``python -m services.web``) in front of the api; each
delivery is signed (HMAC-SHA256, as GitHub signs), so the measured path includes the api's
signature check. The "raw" column is CreateEvent at c=16 over gRPC with the same payload: the
ratio is what HTTP, the web service and the extra hop cost. Repetitions alternate.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from google.protobuf import field_mask_pb2

from services.api.servicers_webhooks import signature_of
from shared.gen.automation.v1 import event_pb2, event_pb2_grpc, rule_pb2, rule_pb2_grpc
from tools.postgres import free_port

from . import workload
from .fixture import Cluster, channel, services, spawn
from .ingest import summary
from .load import ClosedResult, closed_loop
from .report import Row, percentile, progress
from .settings import Settings

TRIGGER = "bench.hook"
RULES = ["bench.hook_a", "bench.hook_b"]
SECRET = "bench-webhook-secret-0123456789"
CONCURRENCY = 16


async def _web_up(http: httpx.AsyncClient, url: str) -> None:
    for _ in range(300):
        try:
            if (await http.get(f"{url}/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the web service did not start")


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url = await cluster.fresh_database("webhooks")
    rows: list[Row] = []
    async with services(url) as svc:
        target = await svc.start_api()
        web_addr = f"127.0.0.1:{free_port()}"
        web = await spawn("web", "services.web", {"API_TARGET": target, "WEB_ADDR": web_addr}, svc.logdir)
        try:
            async with (
                channel(target) as ch,
                httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=CONCURRENCY)) as http,
            ):
                await workload.define(ch, TRIGGER, RULES)
                rules: rule_pb2_grpc.RuleServiceAsyncStub = rule_pb2_grpc.RuleServiceStub(ch)
                trigger = await rules.UpdateTrigger(
                    rule_pb2.UpdateTriggerRequest(
                        trigger=rule_pb2.Trigger(ref=TRIGGER, webhook_enabled=True, webhook_secret=SECRET),
                        update_mask=field_mask_pb2.FieldMask(paths=["webhook_enabled", "webhook_secret"]),
                    )
                )
                base = f"http://{web_addr}"
                await _web_up(http, base)
                body = json.dumps(workload.PAYLOAD).encode()
                headers = {"content-type": "application/json", "x-hub-signature-256": signature_of(SECRET, body)}
                hook_url = f"{base}/webhooks/{trigger.webhook_key}"
                events: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
                one = event_pb2.CreateEventRequest(event=workload.new_event(TRIGGER))

                async def deliver() -> int:
                    answer = await http.post(hook_url, content=body, headers=headers)
                    assert answer.status_code == 202, answer.text
                    assert len(answer.json()["enforcement_ids"]) == 2
                    return 1

                async def create() -> int:
                    response = await events.CreateEvent(one, timeout=30)
                    assert len(response.enforcements) == 2
                    return 1

                await closed_loop(deliver, 4, 0.3)
                await closed_loop(create, 4, 0.3)
                grpc_runs: list[ClosedResult] = []
                http_runs: list[ClosedResult] = []
                for rep in range(s.reps):
                    progress(f"webhooks c={CONCURRENCY} rep {rep + 1}/{s.reps}")
                    grpc_runs.append(await closed_loop(create, CONCURRENCY, s.rep_s))
                    http_runs.append(await closed_loop(deliver, CONCURRENCY, s.rep_s))
                row, _ = summary(f"webhooks: POST -> 202, c={CONCURRENCY}", grpc_runs, http_runs, items=False)
                grpc_lat = [x for r in grpc_runs for x in r.latencies]
                row.notes += (
                    f"; raw = CreateEvent c={CONCURRENCY} over gRPC, same payload, rules and trigger "
                    f"(its p50/p99 {percentile(grpc_lat, 50) * 1000:.1f}/{percentile(grpc_lat, 99) * 1000:.1f} ms); "
                    "signed deliveries (HMAC checked by the api), 2 enforcements each"
                )
                rows.append(row)
        finally:
            await web.stop()
    await cluster.drop(url)
    return rows
