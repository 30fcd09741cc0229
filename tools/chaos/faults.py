"""The fault schedule: one fault every ``interval`` seconds, round-robin over the kinds.

- ``kill_executor``: SIGKILL an executor while it holds leased work, start a new one (new
  EXECUTOR_ID), and measure how long its work took to be resolved by someone else;
- ``restart_api``: SIGTERM (odd rounds: SIGKILL) an api, start a new one on the same port;
- ``restart_postgres``: fast shutdown, then start on the same port and data (the apis and
  executors stay up and must recover by themselves);
- ``stall_executor``: SIGSTOP an executor for twice the lease, then SIGCONT;
- ``crash_postgres``: the primary's PostgreSQL crashes (odd rounds: kill -9 of the postmaster;
  even: an immediate shutdown), then starts again and replays WAL (Patroni starts it itself);
- ``blackhole_db`` / ``blackhole_executor``: the half-open case on the path from the apis to
  PostgreSQL, or from one executor to its api, for longer than the statement timeout and a lease;
- ``latency``: 200 ms +- 100 ms on every path for a minute, while the other faults go on;
- ``reset_connections``: a RST on every open connection of every path (database and executors):
  CreateEvents batches, resolves and commits in flight are cut wherever they are;
- ``refuse_connections``: every path refuses new connections for a few seconds, after a reset,
  so that every reconnection in that time is refused;
- ``failover`` (replicated): kill -9 of the whole primary node; Patroni promotes the standby;
  the old primary then rejoins as a standby (pg_rewind);
- ``switchover`` (replicated): a planned switchover through Patroni.

Every fault is recorded as a window (when it began and ended), from which the report derives
what each kind cost: the longest gap between acknowledgements and the time until the backlog
was back to where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tools.chaos.network import Network
from tools.chaos.processes import DB_ERRORS, Database, Sql, Supervisor
from tools.chaos.proxy import Mode
from tools.chaos.settings import NETWORK_KINDS, REPLICATED_KINDS, Settings

log = logging.getLogger("chaos")
_HELD = "SELECT enforcement FROM enforcement_dispatch WHERE leased_by = $1 ORDER BY 1"
_RESOLVED = "SELECT id, resolved_at FROM enforcement WHERE id = ANY($1::bigint[]) AND resolved_at IS NOT NULL"


@dataclass
class Redelivery:
    """What became of the work an executor held when it was killed."""

    executor_id: str
    killed_at: datetime
    held: list[int]
    delays_s: dict[int, float] = field(default_factory=dict)
    before_kill: int = 0
    unresolved: int = 0


@dataclass
class Stall:
    executor_id: str
    held: int
    taken_over: int
    """Held enforcements resolved (by another executor) while this one was stopped."""


@dataclass
class Window:
    """One fault: when it began and ended (monotonic), and what it measured."""

    kind: str
    began: float
    ended: float
    seconds: float | None = None
    """What the kind measures of itself: PostgreSQL or the primary unavailable, a failover's
    time without a writable primary, a switchover's duration."""
    note: str = ""


@dataclass
class FaultLog:
    counts: Counter[str] = field(default_factory=Counter)
    windows: list[Window] = field(default_factory=list)
    rejoin_s: list[float] = field(default_factory=list)
    """After each failover: until the old primary streamed again as a standby."""
    connections_reset: int = 0
    unpromoted: int = 0
    """Failovers in which Patroni promoted nobody (no standby eligible) and the old primary,
    started again, took writes again."""
    api_sigkills: int = 0
    redeliveries: list[Redelivery] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)
    db_down_s: list[float] = field(default_factory=list)
    api_down_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def redelivery_delays(self) -> list[float]:
        return sorted(d for r in self.redeliveries for d in r.delays_s.values())

    def redelivery_summary(self) -> str:
        delays = self.redelivery_delays()
        if not delays:
            return "no enforcement was held by a killed executor"
        kills = sum(1 for r in self.redeliveries if r.held)
        per_kill = [max(r.delays_s.values()) for r in self.redeliveries if r.delays_s]
        return (
            f"min {delays[0] * 1000:.0f} ms / median {statistics.median(delays) * 1000:.0f} ms / "
            f"max {delays[-1] * 1000:.0f} ms over {len(delays)} enforcements in {kills} kills "
            f"(worst per kill, median {statistics.median(per_kill) * 1000:.0f} ms)"
        )


class FaultInjector:
    def __init__(
        self, settings: Settings, supervisor: Supervisor, database: Database, sql: Sql, network: Network | None
    ) -> None:
        self._settings = settings
        self._sup = supervisor
        self._db = database
        self._sql = sql
        self._net = network
        self.log = FaultLog()
        self._watchers: set[asyncio.Task[None]] = set()
        self.kinds = []
        for kind in settings.faults:
            if kind in ("restart_postgres", "crash_postgres") and not (settings.can_restart_db or settings.replicated):
                self.log.skipped.append(f"{kind}: DATABASE_URL is set, so the harness cannot restart it")
            elif kind in REPLICATED_KINDS and not settings.replicated:
                self.log.skipped.append(f"{kind}: needs --replication sync or async")
            else:
                self.kinds.append(kind)

    async def run(self, stop: asyncio.Event) -> None:
        """Injects faults until ``stop`` is set; a fault under way finishes first."""
        interval = self._settings.interval_s
        began = time.monotonic()
        n = 0
        per_kind: Counter[str] = Counter()
        while True:
            due = began + (n + 1) * interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(due - time.monotonic(), 0))
            if stop.is_set():
                return
            kind = self.kinds[n % len(self.kinds)]
            round_ = per_kind[kind]
            per_kind[kind] += 1
            n += 1
            try:
                at = time.monotonic()
                measured = await getattr(self, kind)(round_)
                # A latency window goes on in the background after its call returned.
                lasting = self._settings.latency_window_s if kind == "latency" else 0.0
                self.log.windows.append(Window(kind, at, time.monotonic() + lasting, measured))
                log.info("fault %s #%d took %.1fs", kind, round_ + 1, time.monotonic() - at)
                self.log.counts[kind] += 1
            except Exception as exc:  # a fault that fails is reported, not fatal
                self.log.errors.append(f"{kind} #{round_ + 1} failed: {exc!r}")
                log.exception("fault %s failed", kind)

    async def finish(self) -> None:
        """Waits for the redelivery watchers (each bounded)."""
        if self._watchers:
            await asyncio.gather(*self._watchers)

    async def _held(self, executor_id: str) -> list[int]:
        try:
            return [r[0] for r in await self._sql.fetch(_HELD, executor_id)]
        except DB_ERRORS as exc:
            log.warning("could not read the leases of %s: %s", executor_id, exc)
            return []

    async def kill_executor(self, round_: int) -> None:
        slot = round_ % self._settings.executors
        child = self._sup.executors[slot]
        # A brief pause first, so that it dies holding work (otherwise it usually holds none:
        # a decision takes a few milliseconds). Its stream stays open meanwhile.
        self._sup.signal(child, signal.SIGSTOP)
        await asyncio.sleep(0.3)
        held = await self._held(child.executor_id)
        child.expected_exit = True
        self._sup.signal(child, signal.SIGKILL)
        killed_at = datetime.now(UTC)
        await child.process.wait()
        log.info("fault: kill -9 %s (holding %d)", child.executor_id, len(held))
        await self._sup.start_executor(slot)
        record = Redelivery(child.executor_id, killed_at, held)
        self.log.redeliveries.append(record)
        if held:
            task = asyncio.create_task(self._watch_redelivery(record))
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)

    async def _watch_redelivery(self, record: Redelivery, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(record.held)
        while waiting and time.monotonic() < deadline:
            try:
                rows = await self._sql.fetch(_RESOLVED, list(waiting))
            except DB_ERRORS:
                rows = []
            for id_, resolved_at in rows:
                waiting.discard(id_)
                delay = (resolved_at - record.killed_at).total_seconds()
                if delay < 0:
                    record.before_kill += 1  # its last call committed just before it died
                else:
                    record.delays_s[id_] = delay
            if waiting:
                await asyncio.sleep(0.05)
        record.unresolved = len(waiting)
        worst = max(record.delays_s.values(), default=0.0)
        log.info(
            "after kill -9 %s: %d held, %d resolved after the kill (worst %.0f ms), %d before, %d unresolved",
            record.executor_id,
            len(record.held),
            len(record.delays_s),
            worst * 1000,
            record.before_kill,
            record.unresolved,
        )

    async def restart_api(self, round_: int) -> float:
        slot = round_ % self._settings.apis
        hard = round_ % 2 == 1
        child = self._sup.apis[slot]
        began = time.monotonic()
        await self._sup.kill(child, signal.SIGKILL if hard else signal.SIGTERM)
        log.info("fault: %s api%d (pid %d)", "kill -9" if hard else "SIGTERM", slot, child.pid)
        await self._sup.start_api(slot)
        self.log.api_sigkills += int(hard)
        down = time.monotonic() - began
        self.log.api_down_s.append(down)
        return down

    async def restart_postgres(self, round_: int) -> float:
        log.info("fault: restart PostgreSQL (fast shutdown)")
        down = await self._db.restart()
        self.log.db_down_s.append(down)
        return down

    async def crash_postgres(self, round_: int) -> float:
        how = "kill" if round_ % 2 == 0 else "immediate"
        what = "kill -9 of the postmaster" if how == "kill" else "immediate shutdown"
        log.info("fault: PostgreSQL crashes (%s)", what)
        return await self._db.crash(how)

    async def failover(self, round_: int) -> float:
        log.info("fault: kill -9 of the primary node (Patroni and PostgreSQL)")
        down, rejoin, promoted = await self._db.failover()
        log.info("failover: no writable primary for %.1fs; old primary rejoined after %.1fs more", down, rejoin)
        self.log.rejoin_s.append(rejoin)
        if not promoted:
            self.log.unpromoted += 1
        return down

    async def switchover(self, round_: int) -> float:
        log.info("fault: planned switchover")
        return await self._db.switchover()

    def _network(self) -> Network:
        assert self._net is not None, f"network faults ({', '.join(NETWORK_KINDS)}) need the run's proxies"
        return self._net

    async def blackhole_db(self, round_: int) -> None:
        seconds = self._settings.blackhole_s
        log.info("fault: blackhole between the apis and PostgreSQL for %.0fs", seconds)
        net = self._network()
        await net.hold(net.path("db"), Mode.BLACKHOLE, seconds)

    async def blackhole_executor(self, round_: int) -> None:
        net = self._network()
        slot = round_ % max(len(net.executors), 1)
        seconds = self._settings.blackhole_s
        log.info("fault: blackhole between executor slot %d and its api for %.0fs", slot, seconds)
        await net.hold([net.executors[slot]], Mode.BLACKHOLE, seconds)

    async def latency(self, round_: int) -> None:
        window = self._settings.latency_window_s
        log.info("fault: latency 200 ms +- 100 ms on every path for %.0fs (beside the other faults)", window)
        await self._network().latency_window(window)

    async def reset_connections(self, round_: int) -> None:
        n = self._network().reset(self._network().path("all"))
        self.log.connections_reset += n
        log.info("fault: RST of %d open connections (database and executor paths)", n)

    async def refuse_connections(self, round_: int) -> None:
        net = self._network()
        log.info("fault: connections reset, new ones refused for %.0fs", self._settings.refuse_s)
        self.log.connections_reset += await net.hold(net.path("all"), Mode.REFUSE, self._settings.refuse_s, reset=True)

    async def stall_executor(self, round_: int) -> None:
        slot = (round_ + 1) % self._settings.executors
        child = self._sup.executors[slot]
        self._sup.signal(child, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.3)
            held = await self._held(child.executor_id)
            log.info("fault: SIGSTOP %s for %.1fs (holding %d)", child.executor_id, self._settings.stall_s, len(held))
            await asyncio.sleep(self._settings.stall_s - 0.3)
            taken = 0
            if held:
                with contextlib.suppress(*DB_ERRORS):
                    taken = len(await self._sql.fetch(_RESOLVED, held))
            self.log.stalls.append(Stall(child.executor_id, len(held), taken))
        finally:
            self._sup.signal(child, signal.SIGCONT)
