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

from google.protobuf import field_mask_pb2

from services.api.servicers.webhooks import signature_of
from shared.gen.automation.v1 import event_pb2, event_pb2_grpc, rule_pb2, rule_pb2_grpc
from tools.healthcheck import wait_http
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


class _Connection:
    """One keep-alive HTTP/1.1 connection that posts the same request again and again: the
    load generator must cost far less than what it measures, and a general client (httpx)
    costs about 1 ms of CPU per request, which would cap the measurement near 500/s."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self._reader, self._writer, self._request = reader, writer, request

    @classmethod
    async def open(cls, host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body
        )
        return cls(reader, writer, request)

    async def post(self) -> tuple[int, bytes]:
        self._writer.write(self._request)
        status = int((await self._reader.readline()).split()[1])
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)

    def close(self) -> None:
        self._writer.close()


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url = await cluster.fresh_database("webhooks")
    rows: list[Row] = []
    async with services(url) as svc:
        target = await svc.start_api()
        web_addr = f"127.0.0.1:{free_port()}"
        web = await spawn("web", "services.web", {"API_TARGET": target, "WEB_ADDR": web_addr}, svc.logdir)
        try:
            async with channel(target) as ch:
                await workload.define(ch, TRIGGER, RULES)
                rules: rule_pb2_grpc.RuleServiceAsyncStub = rule_pb2_grpc.RuleServiceStub(ch)
                trigger = await rules.UpdateTrigger(
                    rule_pb2.UpdateTriggerRequest(
                        trigger=rule_pb2.Trigger(ref=TRIGGER, webhook_enabled=True, webhook_secret=SECRET),
                        update_mask=field_mask_pb2.FieldMask(paths=["webhook_enabled", "webhook_secret"]),
                    )
                )
                await wait_http(web_addr)
                body = json.dumps(workload.PAYLOAD).encode()
                headers = {"content-type": "application/json", "x-hub-signature-256": signature_of(SECRET, body)}
                events: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
                one = event_pb2.CreateEventRequest(event=workload.new_event(TRIGGER))

                host, _, port = web_addr.rpartition(":")
                free = [
                    await _Connection.open(host, int(port), f"/webhooks/{trigger.webhook_key}", body, headers)
                    for _ in range(CONCURRENCY)
                ]

                async def deliver() -> int:
                    conn = free.pop()
                    try:
                        status, answer = await conn.post()
                    finally:
                        free.append(conn)
                    assert status == 202, answer
                    assert len(json.loads(answer)["enforcement_ids"]) == 2
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
                for conn in free:
                    conn.close()
                row, _ = summary(f"webhooks: POST -> 202, c={CONCURRENCY}", grpc_runs, http_runs, items=False)
                grpc_lat = [x for r in grpc_runs for x in r.latencies]
                row.notes += (
                    f"; raw = CreateEvent c={CONCURRENCY} over gRPC, same payload, rules and trigger "
                    f"(its p50/p99 {percentile(grpc_lat, 50) * 1000:.1f}/{percentile(grpc_lat, 99) * 1000:.1f} ms); "
                    "signed deliveries (HMAC checked by the api), 2 enforcements each; HTTP/1.1 keep-alive, "
                    f"{CONCURRENCY} connections"
                )
                rows.append(row)
        finally:
            await web.stop()
    await cluster.drop(url)
    return rows
