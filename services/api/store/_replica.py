"""Reads that may lag, served by a standby (``DATABASE_READ_URL``) while it keeps up.

``Reads`` is where the repositories send the reads that a replica may answer (list pages,
Get by id, history, audit, analytics: the table in the README, "Read replicas"). Without a
read URL it is the primary's pool and nothing else. With one, each read goes to the standby
while the last probe found it usable, and to the primary otherwise:

- **Lag**, measured without trusting clocks or idle periods: every ``PROBE_S`` the primary's
  WAL position is sampled, then the standby's replayed position is read. The standby holds
  everything committed before the newest sample its replay has reached, so its staleness is
  at most the age of that sample. ``now() - pg_last_xact_replay_timestamp()`` would call an
  up-to-date standby of an idle primary hours behind, and a standby whose WAL receiver
  stopped (its primary unreachable) current; this measure has neither fault. Past
  ``max_lag_s`` the reads go to the primary until a probe finds the standby back within it.
  A read therefore sees the database as of at most ``max_lag_s + PROBE_S`` ago.
- **Down**: a probe or a read that fails to connect, times out, or is cancelled by recovery
  (SQLSTATE 40001 on a standby) marks the standby unusable until a probe succeeds; the read
  itself is answered by the primary.
- **Not a standby**: a read URL that reached a server not in recovery (``prefer-standby``
  with no standby left, or a standby promoted by a failover) is not used: reading there gains
  nothing over the primary pool, and a former primary could hold commits that were lost.

A read that finds nothing on the standby (``found``) is asked of the primary, so a Get right
after a Create finds the row. Health never asks the standby. Every state change is logged once
and counted (``automation_db_replica_*``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from services.api import metrics
from shared.errors import Unavailable

from ._db import create_pool

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_S = 1.0
"""How often the standby's position is compared with the primary's."""
PROBE_TIMEOUT_S = 2.0
"""A probe that takes longer finds the standby unusable (a blackholed path, an overloaded host)."""
SAMPLES = 4096
"""Primary positions kept while the standby lags (an hour at PROBE_S): enough to say how far
behind it is past any sensible bound; beyond that the lag reads as at least this old."""
APPLICATION = "automation-api-reads"

_PRIMARY_LSN = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
_REPLICA_LSN = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() - '0/0'::pg_lsn"

# What a standby answers with when it cannot serve a read now: connection failures, shutdown or
# statement timeout (57), too many connections (53), a query cancelled by recovery (40001).
_REPLICA_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    Unavailable,
)
_REPLICA_SQLSTATES = ("08", "57", "53", "40001")


def _replica_failed(exc: BaseException) -> bool:
    if isinstance(exc, _REPLICA_FAILURES):
        return True
    state = getattr(exc, "sqlstate", "") or ""
    return isinstance(exc, asyncpg.PostgresError) and state.startswith(_REPLICA_SQLSTATES)


class Reads:
    """The pool of each read that may lag: the standby's while usable, the primary's otherwise."""

    def __init__(
        self,
        primary: asyncpg.Pool,
        url: str = "",
        max_lag_s: float = 5.0,
        *,
        probe: asyncpg.Pool | None = None,
        max_size: int = 16,
        statement_timeout_s: float = 30.0,
    ) -> None:
        self.primary = primary
        self.url = url
        self.max_lag_s = max_lag_s
        # The primary's side of the probe: the api's chores connection when given, so that the
        # probe never takes a warm connection from a call.
        self._probe_pool = probe or primary
        self._max_size = max_size
        self._statement_timeout_s = statement_timeout_s
        self.replica: asyncpg.Pool | None = None
        self.usable = False
        """Whether the last probe found the standby within the lag bound (reads go there)."""
        self.lag_s: float | None = None
        """The standby's staleness at the last probe (an upper bound); None when unknown."""
        self.reason = "not probed yet" if url else "no DATABASE_READ_URL"
        self.served: collections.Counter[str] = collections.Counter()
        """Reads answered, by ``replica`` / ``primary`` (the metric's values, kept in-process too)."""
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=SAMPLES)
        self._cause = ""
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def configured(self) -> bool:
        return bool(self.url)

    # -- routing ------------------------------------------------------------------------------

    async def run(self, read: Callable[[asyncpg.Pool], Awaitable[T]], found: Callable[[T], bool] | None = None) -> T:
        """``read`` on the standby when it is usable, else on the primary. On the standby, a
        failure it may not have on the primary, or an answer ``found`` rejects (a row not there
        yet), sends the read to the primary."""
        replica = self.replica
        if replica is not None and self.usable:
            try:
                answer = await read(replica)
            except Exception as exc:
                if not _replica_failed(exc):
                    raise
                self._unusable(f"a read failed: {exc.__class__.__name__}: {exc}", "down")
            else:
                if found is None or found(answer):
                    self._count("replica")
                    return answer
                metrics.current.replica_fallback("missing")
        self._count("primary")
        return await read(self.primary)

    def _count(self, by: str) -> None:
        self.served[by] += 1
        metrics.current.read_served(by)

    # -- state --------------------------------------------------------------------------------

    def _usable(self, lag: float) -> None:
        self.lag_s = lag
        metrics.current.replica_state(True, lag)
        if not self.usable:
            log.info("reads go to the standby again (lag %.2fs, bound %.1fs)", lag, self.max_lag_s)
        self.usable = True
        self._cause = ""
        self.reason = ""

    def _unusable(self, reason: str, kind: str, lag: float | None = None) -> None:
        self.lag_s = lag
        metrics.current.replica_state(False, lag)
        # Logged and counted once per change of cause, not once per probe or per read.
        if self.usable or kind != self._cause:
            log.warning("reads go to the primary: %s", reason)
            metrics.current.replica_fallback(kind)
        self.usable = False
        self._cause = kind
        self.reason = reason

    # -- probe --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts probing the standby (in the background: the api never waits for it)."""
        if self.url and self._task is None:
            self._task = asyncio.create_task(self._probe_loop(), name="replica-probe")

    async def _probe_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.probe()
            except Exception as exc:  # noqa: BLE001 - any failure means: read from the primary
                self._unusable(f"the standby does not answer: {exc.__class__.__name__}: {exc}", "down")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PROBE_S)

    async def probe(self) -> None:
        """Samples the primary's WAL position, reads the standby's, and decides. Raises when
        the standby does not answer within PROBE_TIMEOUT_S."""
        try:
            primary_lsn = int(await asyncio.wait_for(self._probe_pool.fetchval(_PRIMARY_LSN), PROBE_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - the primary's side: no fault of the standby's
            # No sample this round: the newest one ages, and with it the lag the standby is
            # credited with, so a primary that cannot be asked never leaves stale reads unbounded.
            log.debug("no primary WAL position this round: %s", exc)
        else:
            self._samples.append((time.monotonic(), primary_lsn))
        if self.replica is None:
            # No connection at creation (min_size 0): an unreachable standby costs the api's
            # start nothing; this probe connects.
            self.replica = await create_pool(
                self.url,
                min_size=0,
                max_size=self._max_size,
                statement_timeout_s=self._statement_timeout_s,
                application_name=APPLICATION,
            )
        row = await asyncio.wait_for(self.replica.fetchrow(_REPLICA_LSN), PROBE_TIMEOUT_S)
        assert row is not None  # one row, always
        in_recovery, replayed = row
        if not in_recovery:
            self._unusable("DATABASE_READ_URL reached a server that is not a standby", "not_standby")
            # The next connections look again (prefer-standby finds a standby that is back).
            await self.replica.expire_connections()
            return
        if not self._samples:
            self._unusable("no WAL position of the primary to compare the standby with yet", "lag")
            return
        replayed = int(replayed)
        now = time.monotonic()
        # The newest sample the standby has replayed up to; older ones are no longer needed.
        caught_up: float | None = None
        while self._samples and self._samples[0][1] <= replayed:
            caught_up = self._samples.popleft()[0]
        if caught_up is not None:
            self._samples.appendleft((caught_up, replayed))
            lag = now - caught_up
        else:
            lag = now - self._samples[0][0]
        if lag <= self.max_lag_s:
            self._usable(lag)
        else:
            self._unusable(f"the standby lags {lag:.1f}s, past DATABASE_READ_MAX_LAG_SECONDS", "lag", lag)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.replica is not None:
            try:
                await asyncio.wait_for(self.replica.close(), 5.0)
            except TimeoutError:
                self.replica.terminate()
