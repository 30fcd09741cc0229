"""One chaos run: start everything, load and faults together, drain, check, report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from tools.chaos.checks import run_checks
from tools.chaos.faults import FaultInjector
from tools.chaos.load import Clients, LoadDriver, RuleDriver, define_rules
from tools.chaos.network import Network
from tools.chaos.processes import Database, Sql, Supervisor, snapshot_code
from tools.chaos.report import Outcome, render
from tools.chaos.settings import Settings
from tools.postgres import free_port

log = logging.getLogger("chaos")


async def _watchdog(sup: Supervisor, stop: asyncio.Event) -> None:
    """Restarts (and records) any child that ended without being told to."""
    while not stop.is_set():
        for child in sup.check_unexpected_exits():
            log.error("%s exited by itself (code %s); starting another", child.name, child.process.returncode)
            if child.kind == "api":
                await sup.start_api(child.slot)
            else:
                await sup.start_executor(child.slot)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def _sample_backlog(sql: Sql, stop: asyncio.Event, samples: list[tuple[float, int]]) -> None:
    """Pending enforcements twice a second (monotonic time, count): whether the pipeline keeps
    up with the load, and how long it took to catch up after each fault."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            samples.append((time.monotonic(), int(await sql.fetchval("SELECT count(*) FROM enforcement_dispatch"))))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def _watch_loop(stop: asyncio.Event, lags: list[float]) -> None:
    """How late the harness's own event loop wakes up: the faults' timing is only as good as it
    (the proxies share this loop)."""
    while not stop.is_set():
        began = time.monotonic()
        await asyncio.sleep(0.1)  # the probe itself
        lag = time.monotonic() - began - 0.1
        lags.append(lag)
        if lag > 0.5:
            log.warning("the harness's event loop was %.1fs late", lag)


async def _drain(sql: Sql, timeout: float) -> float | None:
    """Seconds until no enforcement is pending, or None after ``timeout``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        with contextlib.suppress(Exception):
            if await sql.fetchval("SELECT count(*) FROM enforcement WHERE status = 'created'") == 0:
                return time.monotonic() - began
        await asyncio.sleep(0.05)
    return None


def _count_in_logs(settings: Settings, needle: str) -> int:
    return sum(p.read_text(errors="replace").count(needle) for p in settings.log_dir.glob("*.log"))


async def run(settings: Settings) -> int:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings)
    sup: Supervisor | None = None
    net: Network | None = None
    clients: Clients | None = None
    sql: Sql | None = None
    background: list[asyncio.Task[None]] = []
    try:
        code = snapshot_code(settings.log_dir / "code")
        await db.start()
        api_ports = [free_port() for _ in range(settings.apis)]
        api_url = db.url
        executor_targets: dict[int, str] = {}
        if settings.network:
            net = Network(
                db.upstreams(),
                {i: f"127.0.0.1:{api_ports[i % settings.apis]}" for i in range(settings.executors)},
                settings.seed,
            )
            await net.start()
            api_url = db.url_through(net.db_addresses)
            executor_targets = net.executor_addresses
            log.info("fault proxies: PostgreSQL via %s; executors via %s", net.db_addresses, executor_targets)
        sup = Supervisor(
            settings, api_url, settings.log_dir, code_dir=code, api_ports=api_ports, executor_targets=executor_targets
        )
        await sup.migrate()
        await sup.start_all()
        log.info(
            "apis on %s; %d executors; logs in %s", ", ".join(sup.api_targets), settings.executors, settings.log_dir
        )
        clients = Clients(sup.api_targets)
        await define_rules(clients)
        sql = Sql(db.url)
        load = LoadDriver(settings, clients, f"r{uuid.uuid4().hex[:8]}")
        rules = RuleDriver(settings, clients)
        faults = FaultInjector(settings, sup, db, sql, net)
        stop_faults = asyncio.Event()
        backlog: list[tuple[float, int]] = []
        loop_lags: list[float] = []
        stop_watchdog = asyncio.Event()
        background = [
            asyncio.create_task(_watchdog(sup, stop_watchdog), name="watchdog"),
            asyncio.create_task(faults.run(stop_faults), name="faults"),
            asyncio.create_task(rules.run(stop_faults), name="rules"),
            asyncio.create_task(_sample_backlog(sql, stop_faults, backlog), name="backlog"),
            asyncio.create_task(_watch_loop(stop_faults, loop_lags), name="loop"),
        ]
        log.info(
            "load: %d events at %g/s; faults every %.1fs over %s",
            settings.total_events,
            settings.rate,
            settings.interval_s,
            ", ".join(faults.kinds),
        )
        await load.run()
        stop_faults.set()
        await asyncio.gather(*background[1:])
        log.info("load done: %d acked of %d sent; draining", load.stats.acked, load.stats.sent)
        if net is not None:
            await net.calm()
        drain_began = time.monotonic()
        drain_s = await _drain(sql, settings.drain_timeout_s)
        if drain_s is not None:
            backlog.append((drain_began + drain_s, 0))
        await faults.finish()
        stop_watchdog.set()
        await background[0]
        findings = await run_checks(db.url, load.acks)
        outcome = Outcome(
            settings=settings,
            load=load.stats,
            findings=findings,
            faults=faults.log,
            drain_s=drain_s,
            unexpected_exits=sup.unexpected,
            rule_changes=len(rules.changes),
            backlog=backlog,
            database=db.describe(),
            loop_lag_s=max(loop_lags, default=0.0),
            internal_errors=_count_in_logs(settings, "failed with an unexpected error"),
        )
        print(render(outcome), flush=True)
        print(f"logs: {settings.log_dir}", flush=True)
        return 1 if outcome.problems else 0
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if clients is not None:
            await clients.close()
        if sql is not None:
            await sql.close()
        if sup is not None:
            await sup.close()
        if net is not None:
            await net.close()
        await db.close()
