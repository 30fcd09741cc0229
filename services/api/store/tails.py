"""Reads of the live tails (TailEvents, TailEnforcements) and their wake-ups.

A tail reads one bounded page at a time, ascending, strictly after a position and without
the ids it already delivered in its trailing window (``servicers.tails`` explains the
scheme). Each read first takes the database's ``now()`` and then the rows, on one connection:
the rows' snapshot is taken after that time, so every row committed before it is visible.

Indexes: events through ``event_created_idx`` or the filter's own (trigger_ref, source_ref,
rule_ref ... created DESC, id DESC), scanned backwards; creations of enforcements likewise
through ``enforcement_*_created_idx``; resolutions through ``enforcement_resolved_idx`` on
(resolved_at, id) (migration 0012: none of the others orders by resolved_at).

Wake-ups: one LISTEN connection (borrowed from the pool while at least one tail is open)
hears the announcements every api makes after its commits, and the NOTIFY triggers of other
writers (``event_created``, ``enforcement_created``, ``enforcement_resolved``). They only
make the next poll sooner: the tails poll anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ._db import Repo, guarded
from ._paging import Keys, Signer, Where
from .types import Enforcement, Event, columns

log = logging.getLogger(__name__)

_EVENT = columns(Event)
_ENFORCEMENT = columns(Enforcement)
CHANNELS = ("event_created", "enforcement_created", "enforcement_resolved")


@dataclass(frozen=True, slots=True)
class Read:
    """One page of a tail: the database time taken just before the rows were read, and the
    rows, ascending."""

    now: datetime
    rows: list[Any]


def _page_sql(select: str, key: str, where: Where, after: tuple[datetime, int], skip: Sequence[int], limit: int) -> str:
    where.parts.insert(0, f"({key}, id) > ({where.param(after[0])}, {where.param(after[1])})")
    if skip:
        where.add("NOT (id = ANY({}::bigint[]))", list(skip))
    return f"{select} {where.sql()} ORDER BY {key}, id LIMIT {where.param(limit)}"


class Tails(Repo):
    """Pages of new events, created and resolved enforcements, after a position."""

    def __init__(self, pool: asyncpg.Pool, keys: Keys) -> None:
        super().__init__(pool)
        self._keys = keys
        self.notices = Notices(pool)
        self.rows_read = 0
        """Rows read by every tail of this process so far: what a slow client costs (tests)."""

    async def signer(self) -> Signer:
        """The signer of page tokens, which also signs tail cursors."""
        return await self._keys.signer()

    async def _read(self, sql: str, args: Sequence[Any], row: Any) -> Read:
        async with guarded(), self._pool.acquire() as conn:
            now: datetime = await conn.fetchval("SELECT now()")
            rows = [row(*r) for r in await conn.fetch(sql, *args)]
        self.rows_read += len(rows)
        return Read(now, rows)

    async def now(self) -> datetime:
        """The database's time: where a tail from now starts."""
        value: datetime = await self._fetchval("SELECT now()")
        return value

    async def events(
        self,
        after: tuple[datetime, int],
        skip: Sequence[int],
        limit: int,
        *,
        trigger_ref: str = "",
        source_ref: str = "",
        rule_ref: str = "",
    ) -> Read:
        """Events with (created, id) after ``after``, ids in ``skip`` left out, ascending."""
        where = Where()
        if trigger_ref:
            where.add("trigger_ref = {}", trigger_ref)
        if source_ref:
            where.add("source_ref = {}", source_ref)
        if rule_ref:
            where.add("rule_ref = {}", rule_ref)
        sql = _page_sql(f"SELECT {_EVENT} FROM event", "created", where, after, skip, limit)
        return await self._read(sql, where.args, Event)

    def _enforcement_filters(self, rule_ref: str, trigger_ref: str, event: int | None) -> Where:
        where = Where()
        if rule_ref:
            where.add("rule_ref = {}", rule_ref)
        if trigger_ref:
            where.add("trigger_ref = {}", trigger_ref)
        if event is not None:
            where.add("event = {}", event)
        return where

    async def created(
        self,
        after: tuple[datetime, int],
        skip: Sequence[int],
        limit: int,
        *,
        rule_ref: str = "",
        trigger_ref: str = "",
        event: int | None = None,
    ) -> Read:
        """Enforcements with (created, id) after ``after``, whatever their status now."""
        where = self._enforcement_filters(rule_ref, trigger_ref, event)
        sql = _page_sql(f"SELECT {_ENFORCEMENT} FROM enforcement", "created", where, after, skip, limit)
        return await self._read(sql, where.args, Enforcement)

    async def resolved(
        self,
        after: tuple[datetime, int],
        skip: Sequence[int],
        limit: int,
        *,
        rule_ref: str = "",
        trigger_ref: str = "",
        event: int | None = None,
        status: str = "",
    ) -> Read:
        """Resolved enforcements with (resolved_at, id) after ``after``; ``status`` ('' any)."""
        where = self._enforcement_filters(rule_ref, trigger_ref, event)
        # Implies the partial index's predicate for the planner.
        where.add("resolved_at IS NOT NULL")
        if status:
            where.add("status = {}::enforcement_status", status)
        sql = _page_sql(f"SELECT {_ENFORCEMENT} FROM enforcement", "resolved_at", where, after, skip, limit)
        return await self._read(sql, where.args, Enforcement)


class Notices:
    """Wakes the tails of this process when any api (or other writer) announces a write.

    The LISTEN connection is borrowed from the pool while at least one tail listens, and
    given back (after UNLISTEN) when the last one ends; it is borrowed again after any
    failure. Best effort throughout: the tails poll whatever happens here.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._subs: dict[asyncio.Event, frozenset[str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()

    @property
    def listening(self) -> int:
        """Tails of this process subscribed now."""
        return len(self._subs)

    @asynccontextmanager
    async def subscribe(self, channels: Sequence[str]) -> AsyncIterator[asyncio.Event]:
        """An event set whenever one of ``channels`` is notified, while the block runs."""
        wake = asyncio.Event()
        self._subs[wake] = frozenset(channels)
        self._idle.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="tail-listen")
        try:
            yield wake
        finally:
            del self._subs[wake]
            if not self._subs:
                self._idle.set()

    def _on_notify(self, _conn: Any, _pid: int, channel: str, _payload: object) -> None:
        for wake, channels in self._subs.items():
            if channel in channels:
                wake.set()

    async def _listen(self) -> None:
        delay = 0.1
        while self._subs:
            try:
                async with self._pool.acquire() as conn:
                    for channel in CHANNELS:
                        await conn.add_listener(channel, self._on_notify)
                    try:
                        # Whatever committed while nobody listened is found by the next poll;
                        # wake every tail so that it comes now.
                        for wake in self._subs:
                            wake.set()
                        delay = 0.1
                        while self._subs and not conn.is_closed():
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self._idle.wait(), 5.0)
                    finally:
                        if not conn.is_closed():
                            for channel in CHANNELS:
                                with contextlib.suppress(Exception):
                                    await conn.remove_listener(channel, self._on_notify)
            except Exception as exc:  # noqa: BLE001 - wake-ups are best effort; the tails poll
                log.debug("tail LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), delay)
                delay = min(delay * 2, 5.0)
