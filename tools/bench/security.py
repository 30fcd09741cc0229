"""What TLS and tokens cost: ingest (unary, 16 in flight) and the pipeline's sustained rate,
each with security off (plaintext, API_INSECURE) and on (TLS, every call authenticated by a
bearer token; the executor with its own executor token), in the same run.

Ingest runs both apis at once on one database and alternates repetitions between them, so
that drift of a noisy machine hits both. The pipeline searches the sustained rate for each in
turn, one executor each. Rows: ``raw rate`` is security off, ``our rate`` on, ``ratio``
on/off (the target is at least 0.9).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from services.api.auth import new_token
from services.api.store import Store, create_pool
from shared.gen.automation.v1 import event_pb2, event_pb2_grpc
from shared.transport import ClientSecurity, open_channel
from tools import certs

from . import pipeline, workload
from .fixture import Cluster, services
from .load import ClosedResult, closed_loop
from .report import Row, median, percentile, progress, spread
from .settings import Settings

TRIGGER = "bench.sec"
RULES = ["bench.sec_a", "bench.sec_b"]


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _tokens(url: str) -> dict[str, str]:
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        out = {}
        for role in ("operator", "executor"):
            token, digest = new_token()
            await Store(pool).tokens.create(f"bench-{role}", [role], digest, None)
            out[role] = token
        return out
    finally:
        await pool.close()


async def _ingest(url: str, s: Settings, api_env: dict[str, str], secure: ClientSecurity) -> Row:
    concurrency = 16
    async with services(url) as plain, services(url) as locked:
        off_target = await plain.start_api()
        on_target = await locked.start_api(ClientSecurity(ca=secure.ca), **api_env)
        # The token goes with each call, as the executor sends it (a channel interceptor costs
        # grpc.aio one more task per call).
        no_token = dataclasses.replace(secure, token="")
        async with open_channel(off_target, ClientSecurity()) as off, open_channel(on_target, no_token) as on:
            await workload.define(off, TRIGGER, RULES)
            await workload.define(off, pipeline.TRIGGER, [pipeline.RULE])
            request = event_pb2.CreateEventRequest(event=workload.new_event(TRIGGER))
            stubs = {"off": event_pb2_grpc.EventServiceStub(off), "on": event_pb2_grpc.EventServiceStub(on)}

            def caller(mode: str) -> Callable[[], Awaitable[int]]:
                stub: event_pb2_grpc.EventServiceAsyncStub = stubs[mode]
                metadata = _bearer(secure.token) if mode == "on" else None

                async def call() -> int:
                    response = await stub.CreateEvent(request, timeout=30, metadata=metadata)
                    assert len(response.enforcements) == 2
                    return 1

                return call

            results: dict[str, list[ClosedResult]] = {"off": [], "on": []}
            for mode in results:  # warm up connections, prepared statements, TLS sessions
                await closed_loop(caller(mode), 4, 0.3)
            for rep in range(s.reps):
                for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                    progress(f"security ingest c={concurrency} {mode} rep {rep + 1}/{s.reps}")
                    results[mode].append(await closed_loop(caller(mode), concurrency, s.rep_s))
    off_rates = [r.rate for r in results["off"]]
    on_rates = [r.rate for r in results["on"]]
    on_lat = [x for r in results["on"] for x in r.latencies]
    off_lat = [x for r in results["off"] for x in r.latencies]
    return Row(
        f"security ingest-unary c={concurrency}",
        median(off_rates),
        median(on_rates),
        percentile(on_lat, 50),
        percentile(on_lat, 99),
        f"raw = security off (plaintext, no auth), ours = TLS + token; median of {s.reps} x {s.rep_s:.0f}s "
        f"alternating; spread off {spread(off_rates)}, on {spread(on_rates)}; off p50/p99 "
        f"{percentile(off_lat, 50) * 1000:.2f}/{percentile(off_lat, 99) * 1000:.2f} ms",
    )


async def _pipeline(
    url: str, s: Settings, api_env: dict[str, str], executor_env: dict[str, str], client: ClientSecurity
) -> pipeline.Config:
    async with services(url) as svc:
        target = await svc.start_api(ClientSecurity(ca=client.ca) if client.ca else None, **api_env)
        conn = await asyncpg.connect(url)
        try:
            metadata = _bearer(client.token) if client.token else None
            async with open_channel(target, dataclasses.replace(client, token="")) as ch:
                stub: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
                await svc.start_executors(1, **executor_env)
                cfg = pipeline.Config(1)
                procs = [p for p in [svc.api, *svc.executors] if p]
                async with pipeline.Sampler(url, procs, s.sample_s) as sampler:
                    await asyncio.sleep(0.5)  # let the watch stream open; the warm-up window is not judged
                    await pipeline.window(stub, conn, sampler, s.start_rate / 2, s.probe_s, 10.0, metadata=metadata)
                    await pipeline.search(stub, conn, sampler, s, cfg, s.start_rate, metadata)
                return cfg
        finally:
            with contextlib.suppress(Exception):
                await conn.close()


def _pipeline_row(off: pipeline.Config, on: pipeline.Config) -> Row:
    def rate(cfg: pipeline.Config) -> float | None:
        return cfg.sustained.rate if cfg.sustained else None

    held = on.sustained
    lat = held.latencies if held else []
    return Row(
        "security pipeline 1 exec sustained",
        rate(off),
        rate(on),
        percentile(lat, 50) if lat else None,
        percentile(lat, 99) if lat else None,
        "raw = security off, ours = TLS + tokens (CreateEvent and the executor's calls); "
        f"latency of the held window with security on; off p50/p99 {pipeline.latency_text(off.sustained)}",
    )


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url = await cluster.fresh_database("security")
    tokens = await _tokens(url)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-certs-") as tmp:
        directory = Path(tmp)
        await asyncio.to_thread(certs.ensure, directory, ("127.0.0.1", "localhost"), ())
        ca = str(directory / "ca.pem")
        api_env = {
            "API_INSECURE": "false",
            "API_TLS_CERT": str(directory / "api.pem"),
            "API_TLS_KEY": str(directory / "api-key.pem"),
        }
        secure = ClientSecurity(ca=ca, token=tokens["operator"])
        rows.append(await _ingest(url, s, api_env, secure))
        progress("security pipeline, off")
        off = await _pipeline(url, s, {}, {}, ClientSecurity())
        progress("security pipeline, on")
        executor_env = {"API_TLS_CA": ca, "API_TOKEN": tokens["executor"]}
        on = await _pipeline(url, s, api_env, executor_env, secure)
        rows.append(_pipeline_row(off, on))
    await cluster.drop(url)
    return rows
