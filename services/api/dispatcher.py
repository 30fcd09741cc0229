"""Wakes watch streams when there may be work, and tells them when their work got resolved.

Three sources, none needed for correctness (streams also poll): a commit in this process
(CreateEvent, ResolveEnforcement) calls ``wake_all`` / ``resolved`` directly, without waiting
for the database; NOTIFY from other api replicas arrives on one dedicated LISTEN connection
(reconnected after any failure); and each stream's own poll timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import asyncpg

log = logging.getLogger(__name__)


class Subscription:
    """One watch stream's wake-up flag and the enforcements it holds."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.held: set[int] = set()


class Dispatcher:
    """Fans wake-ups out to every watch stream of this process."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._subs: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def subscribe(self) -> Subscription:
        sub = Subscription()
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def wake_all(self) -> None:
        """New enforcements may be waiting."""
        for sub in self._subs:
            sub.wake.set()

    def resolved(self, enforcement: int) -> None:
        """An enforcement was resolved: its stream has credit again."""
        for sub in self._subs:
            if enforcement in sub.held:
                sub.held.discard(enforcement)
                sub.wake.set()

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: object) -> None:
        if channel == "enforcement_created":
            self.wake_all()
            return
        with contextlib.suppress(ValueError, KeyError, TypeError):
            self.resolved(int(json.loads(str(payload))["id"]))

    async def _listen(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._url)
                await conn.add_listener("enforcement_created", self._on_notify)
                await conn.add_listener("enforcement_resolved", self._on_notify)
                delay = 0.1
                # Anything committed while we were not listening is found by polling; wake
                # everyone once so that it is found now.
                self.wake_all()
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=closed: lost.set())
                stop = asyncio.ensure_future(self._stopping.wait())
                lost = asyncio.ensure_future(closed.wait())
                await asyncio.wait({stop, lost}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                lost.cancel()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 5.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="dispatcher-listen")

    async def stop(self) -> None:
        self._stopping.set()
        self.wake_all()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
