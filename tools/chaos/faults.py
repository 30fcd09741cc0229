"""The fault schedule: one fault every ``interval`` seconds, round-robin over the kinds.

- ``kill_executor``: SIGKILL an executor while it holds leased work, start a new one (new
  EXECUTOR_ID), and measure how long its work took to be resolved by someone else;
- ``restart_api``: SIGTERM (odd rounds: SIGKILL) an api, start a new one on the same port;
- ``restart_postgres``: fast shutdown, then start on the same port and data (the apis and
  executors stay up and must recover by themselves);
- ``stall_executor``: SIGSTOP an executor for twice the lease, then SIGCONT.
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

from tools.chaos.processes import DB_ERRORS, Database, Sql, Supervisor
from tools.chaos.settings import FAULT_KINDS, Settings

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
class FaultLog:
    counts: Counter[str] = field(default_factory=Counter)
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
    def __init__(self, settings: Settings, supervisor: Supervisor, database: Database, sql: Sql) -> None:
        self._settings = settings
        self._sup = supervisor
        self._db = database
        self._sql = sql
        self.log = FaultLog()
        self._watchers: set[asyncio.Task[None]] = set()
        self.kinds = [k for k in FAULT_KINDS if k != "restart_postgres" or settings.can_restart_db]
        if not settings.can_restart_db:
            self.log.skipped.append("restart_postgres: DATABASE_URL is set, so the harness cannot restart it")

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
                await getattr(self, kind)(round_)
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

    async def restart_api(self, round_: int) -> None:
        slot = round_ % self._settings.apis
        hard = round_ % 2 == 1
        child = self._sup.apis[slot]
        began = time.monotonic()
        await self._sup.kill(child, signal.SIGKILL if hard else signal.SIGTERM)
        log.info("fault: %s api%d (pid %d)", "kill -9" if hard else "SIGTERM", slot, child.pid)
        await self._sup.start_api(slot)
        self.log.api_sigkills += int(hard)
        self.log.api_down_s.append(time.monotonic() - began)

    async def restart_postgres(self, round_: int) -> None:
        log.info("fault: restart PostgreSQL (fast shutdown)")
        self.log.db_down_s.append(await self._db.restart())

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
