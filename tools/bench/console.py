"""Scenario ``console`` (``--only console``): the operator console's pages, timed as a person
loads them (one GET after another through the web service, its own process, in front of the
api), on a store holding the fixture's events, enforcements and executions, a backlog of
exhausted enforcements with their attempts, and an executor connected.

Each page is fetched a few times to warm it, then ``ROUNDS`` times; the row gives p50 and p99
and the notes p95 (the issue's target: under 100 ms p95). Pages are rendered on the server, so
this is the api's reads plus rendering plus HTTP, which is what a person waits for.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote_plus, urlencode

import httpx

from services.web.session import COOKIE
from shared.gen.automation.v1 import enforcement_pb2, enforcement_pb2_grpc, event_pb2, event_pb2_grpc
from tools.healthcheck import wait_http
from tools.postgres import free_port

from . import read, steady, workload
from .fixture import Cluster, channel, services, spawn
from .report import Row, percentile, progress
from .settings import Settings

TRIGGER = "bench.console"
RULES = ["bench.console_a", "bench.console_b"]
BATCH = 1000
EXHAUSTED = 200
WARM = 3


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url = await cluster.fresh_database("console")
    events_n = 5_000 if s.quick else 50_000
    rounds = 30 if s.quick else 100
    rows: list[Row] = []
    async with services(url) as svc:
        target = await svc.start_api()
        web_addr = f"127.0.0.1:{free_port()}"
        web = await spawn("web", "services.web", {"API_TARGET": target, "WEB_ADDR": web_addr}, svc.logdir)
        try:
            async with channel(target) as ch:
                await workload.define(ch, TRIGGER, RULES)
                events: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)
                dispatch: enforcement_pb2_grpc.EnforcementServiceAsyncStub = (
                    enforcement_pb2_grpc.EnforcementServiceStub(ch)
                )
                # Resolved work (executions) first, then a backlog left exhausted.
                await svc.start_executors(1)
                batch = event_pb2.CreateEventsRequest(events=[workload.new_event(TRIGGER)] * BATCH)
                for _ in range(events_n // BATCH):
                    await events.CreateEvents(batch, timeout=120)
                while (await dispatch.GetDispatchState(enforcement_pb2.GetDispatchStateRequest())).pending:
                    await _pause()
                await svc.stop_executors()
                last = await events.CreateEvents(
                    event_pb2.CreateEventsRequest(events=[workload.new_event(TRIGGER)] * (EXHAUSTED // 2)), timeout=60
                )
                pool = await workload.raw_pool(url, 1)
                try:
                    # As the api's maintenance leaves them: a lease that ran out, then exhausted
                    # (each step recorded as an attempt by 0018's trigger).
                    await pool.execute(
                        "UPDATE enforcement_dispatch SET leased_by = 'gone', lease_token = 'gone/1', attempts = 5, "
                        "lease_expires_at = now() - interval '1 second'"
                    )
                    await pool.execute(
                        "UPDATE enforcement_dispatch SET exhausted_at = now(), leased_by = NULL, lease_token = NULL, "
                        "lease_expires_at = NULL, last_error = 'lease of gone expired'"
                    )
                finally:
                    await pool.close()
                await svc.start_executors(1)  # connected and idle: the Dispatch page lists it
                state = await dispatch.GetDispatchState(enforcement_pb2.GetDispatchStateRequest())
                progress(f"console fixture: {events_n + EXHAUSTED // 2} events, {state.exhausted_count} exhausted")
                enforcement = last.receipts[0].enforcement_ids[0]
                event = last.receipts[0].event_id
            await wait_http(web_addr)
            since = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
            pages = [
                "/events",
                f"/events?trigger_ref={TRIGGER}",
                f"/events/{event}",
                "/enforcements",
                "/enforcements?status=processed",
                f"/enforcements?from={since}",
                f"/enforcements/{enforcement}",
                "/executions",
                "/executions/1",
                "/dispatch",
                f"/dispatch/retry?rule_ref={RULES[0]}",
                "/audit",
                f"/rules/{RULES[0]}",
            ]
            rows += await _time_pages(web_addr, pages, rounds, "console")
            await _refreshed_as_by_the_scheduler(url)
            rows += await _time_pages(web_addr, ["/volume"], rounds, "console")
        finally:
            await web.stop()
    rows += await _history(cluster, s, rounds)
    return rows


async def _time_pages(web_addr: str, pages: list[str], rounds: int, label: str) -> list[Row]:
    """Each page fetched WARM times, then ``rounds`` times, one GET after another."""
    rows: list[Row] = []
    # The api runs without authentication here: any token signs in, as a developer.
    async with httpx.AsyncClient(base_url=f"http://{web_addr}", cookies={COOKIE: "bench"}) as http:
        for path in pages:
            took: list[float] = []
            refused = 0
            for i in range(WARM + rounds):
                t = time.perf_counter()
                answer = await http.get(path)
                if answer.status_code != 200:
                    # Reported, not fatal: a search the api stops at its timeout is answered
                    # 400 with the reason, and how long that took is the page's time.
                    refused += 1
                    if refused == 1:
                        progress(f"{label}: GET {path}: {answer.status_code}")
                if i >= WARM:
                    took.append(time.perf_counter() - t)
            p95 = percentile(took, 95)
            shown = unquote_plus(path) + (f"; answered non-200 {refused} times" if refused else "")
            rows.append(
                Row(
                    f"{label} GET {path.split('?')[0]}{' (filtered)' if '?' in path else ''}",
                    p50=percentile(took, 50),
                    p99=percentile(took, 99),
                    notes=f"p95 {p95 * 1000:.1f} ms over {rounds} loads; {shown}",
                )
            )
    return rows


async def _history(cluster: Cluster, s: Settings, rounds: int) -> list[Row]:
    """The list pages, their counts and the payload search over 90 days of events: on
    TimescaleDB the steady-state fixture (``steady.py``: one-day chunks, those older than 7 days
    compressed on the licensed edition), on plain PostgreSQL ``read.load`` over 90 days. Every
    event names one of ``read.REPOS`` repositories: a search for one finds one event in 1,000,
    spread over the whole range; ``host`` is the same in every payload (a search matching all)."""
    if cluster.store == "timescale":
        fixture = await steady.build(cluster, s.steady_events, keep=not s.quick)
        url, shape = fixture.url, fixture.shape
        about = steady.describe_chunks(await steady.chunk_counts(url))
    else:
        url = await cluster.fresh_database("console_history")
        progress(f"console: loading {s.read_events:,} events over {steady.DAYS} days")
        shape = await read.load(url, s.read_events, days=steady.DAYS)
        about = "plain tables"
    label = f"console 90 d ({shape.events:,} events)"
    week = (datetime.now(UTC) - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M")
    rare = json.dumps({"repo": {"name": read.repo_of(7)}})
    pages = [
        "/events",
        f"/events?trigger_ref={read.TRIGGERS[1]}",
        f"/events/{shape.events // 2}",  # 45 days old: on TimescaleDB, a compressed day
        f"/events/{shape.events - 10}",
        "/events?" + urlencode({"payload": rare}),
        "/events?" + urlencode({"payload": rare, "from": week}),
        "/events?" + urlencode({"payload": rare, "trigger_ref": read.TRIGGERS[3]}),
        "/events?" + urlencode({"payload": '{"host": "web-1"}'}),
        "/events?" + urlencode({"payload": '{"repo": {"name": "none"}}'}),
        "/enforcements",
        "/enforcements?status=disabled",
        f"/enforcements?rule_ref={read.RULES[3]}",
        f"/enforcements?from={week}",
        # Over 90 days the volume ranges hold what they would in production (the fixture of
        # ``run`` above has every row in its last hour).
        "/volume",
        "/volume?range=7d",
        "/volume?range=30d",
    ]
    rows = [Row(f"{label}: fixture", notes=about)]
    async with services(url) as svc:
        target = await svc.start_api()
        web_addr = f"127.0.0.1:{free_port()}"
        web = await spawn("web", "services.web", {"API_TARGET": target, "WEB_ADDR": web_addr}, svc.logdir)
        try:
            await wait_http(web_addr)
            await steady.run_refresh_policies(url)  # a kept fixture's views, as of now
            rows += await _time_pages(web_addr, pages, rounds, label)
        finally:
            await web.stop()
    return rows


async def _refreshed_as_by_the_scheduler(url: str) -> None:
    """The fixture's rows, all written in the last minutes, as the volume views hold them a
    minute later: their refresh policies run (this machine's scheduler cannot, see
    ``steady.run_refresh_policies``) once the newest row is older than the per-minute views'
    end offset, 1 minute. Rows newer than that are counted at every read, by design."""
    pool = await workload.raw_pool(url, 1)
    try:
        wait = await pool.fetchval(
            "SELECT extract(epoch FROM greatest((SELECT max(created) FROM event), "
            "(SELECT max(created) FROM enforcement)) + interval '61 seconds' - now())"
        )
    finally:
        await pool.close()
    if wait and wait > 0:
        progress(f"console: waiting {float(wait):.0f} s for the newest row to be a minute old")
        await asyncio.sleep(float(wait))
    t = time.perf_counter()
    if await steady.run_refresh_policies(url):
        took = time.perf_counter() - t
        progress(f"console: ran the volume views' refresh policies in {took:.2f} s, as their scheduler would")


async def _pause() -> None:
    await asyncio.sleep(0.2)  # a poll interval while the executor drains the fixture
