"""Wakes watch streams when there may be work, and announces this api's writes.

Wake-ups come from three sources, none needed for correctness (streams also poll): a commit
in this process (CreateEvent, ResolveEnforcement) calls ``wake_all`` / ``resolved`` directly,
without waiting for the database; NOTIFY from other api replicas (and from any other writer)
arrives on one dedicated LISTEN connection, reconnected after any failure; and each
stream's own poll timer.

Announcements: the api's sessions skip the NOTIFY triggers (a NOTIFY inside a write
transaction serialises commits), so the api tells listeners about its own writes itself,
after they commit: the trigger's payloads, gathered into JSON arrays, at most one notifying
statement per ``announce_interval_s``. Ingestion never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.api import metrics
from services.api.store import Delivery, Enforcement, Event, Lease, alive, connect

log = logging.getLogger(__name__)

# NOTIFY payloads must stay under 8000 bytes.
_MAX_PAYLOAD = 7000
# One encoder for every note: json.dumps with separators builds a new one per call, which for
# the 3,000 notes of a 1,000-event batch was a third of their encoding.
_NOTE_JSON = json.JSONEncoder(separators=(",", ":")).encode
# The LISTEN connection only receives, so nothing on it would notice a half-open path (or a
# primary that vanished without a word) until TCP keepalive does: it is asked a trivial query
# this often and replaced when no answer comes within the probe's timeout.
LISTEN_PROBE_S = 2.0
LISTEN_PROBE_TIMEOUT_S = 3.0
_ANNOUNCE = "SELECT pg_notify(u.channel, u.payload) FROM unnest($1::text[], $2::text[]) AS u(channel, payload)"


def _iso(value: datetime, known: dict[datetime, str]) -> str:
    """``value.isoformat()``, once per value: the rows of one batch share their ``created``."""
    text = known.get(value)
    if text is None:
        text = known[value] = value.isoformat()
    return text


def event_note(e: Event, known: dict[datetime, str]) -> dict[str, Any]:
    """The payload the event_created trigger would send (``known``: see ``_iso``)."""
    return {"id": e.id, "trigger_ref": e.trigger_ref, "rule_ref": e.rule_ref, "created": _iso(e.created, known)}


def enforcement_note(e: Enforcement, known: dict[datetime, str]) -> dict[str, Any]:
    """The payload the enforcement_created / enforcement_resolved trigger would send."""
    return {
        "id": e.id,
        "rule_ref": e.rule_ref,
        "trigger_ref": e.trigger_ref,
        "event": e.event,
        "status": e.status,
        "created": _iso(e.created, known),
        "resolved_at": e.resolved_at.isoformat() if e.resolved_at else None,
    }


def pack(notes: list[dict[str, Any]]) -> list[str]:
    """JSON arrays of notes, each small enough for one NOTIFY payload (or one note alone).

    Runs of notes are encoded with one call each (half the time per note of a call per note),
    sized from the last run's bytes per note, and halved when one comes out too long. The
    encoder escapes all but ASCII, so characters are bytes."""
    out: list[str] = []
    i, step = 0, 16
    while i < len(notes):
        run = notes[i : i + step]
        text = _NOTE_JSON(run)
        if len(text) > _MAX_PAYLOAD and len(run) > 1:
            step = len(run) // 2
            continue
        out.append(text)
        i += len(run)
        step = max(1, _MAX_PAYLOAD * len(run) // (len(text) + len(run)) - 1)
    return out


class Subscription:
    """One watch stream's wake-up flag, its credit, what it holds and what was handed to it."""

    def __init__(
        self, credit: int = 16, filtered: bool = False, executor_id: str = "", token: str = "", principal: str = ""
    ) -> None:
        self.wake = asyncio.Event()
        self.principal = principal
        # Set with ``wake`` when the stream should run a claim; a hand-off wakes it without.
        self.look = True
        self.held: set[int] = set()
        self.credit = credit
        self.executor_id = executor_id
        self.token = token
        # Credit promised to inserts in flight (direct hand-off), and what they delivered.
        self.reserved = 0
        self.inbox: list[Delivery] = []
        # A stream with rule/trigger filters may not want the new work: it is always woken,
        # so that work it skips is not left waiting for another stream's poll.
        self.filtered = filtered
        # Work may be waiting that this stream could not take for want of credit: its last
        # claim filled its credit, or a wake passed it by. Only then does a returned credit
        # wake it; otherwise every resolution would cost a claim that finds nothing.
        self.starved = False

    @property
    def free(self) -> int:
        return max(self.credit - len(self.held) - self.reserved, 0)

    def poke(self) -> None:
        """Wakes the stream to claim waiting work."""
        self.look = True
        self.wake.set()


class Handoff:
    """Direct hand-off of the enforcements one insert creates to one watch stream of this api.

    ``reserve(n)`` (given to the store, called just before the insert) picks a stream with
    ``n`` free credit and promises it; ``deliver`` gives the committed enforcements to it, and
    ``cancel`` withdraws the promise when the insert failed. Only a stream that is not starved
    is chosen: when work is already waiting, new work must not overtake it.
    """

    def __init__(self, dispatcher: Dispatcher, lease_s: float) -> None:
        self._dispatcher = dispatcher
        self._lease_s = lease_s
        self._sub: Subscription | None = None
        self._n = 0

    def reserve(self, n: int) -> Lease | None:
        self.cancel()  # the store may retry its insert
        sub = self._dispatcher._take_credit(n)
        if sub is None:
            return None
        self._sub, self._n = sub, n
        return Lease(sub.executor_id, sub.token, self._lease_s, sub.principal or None)

    def cancel(self) -> None:
        if self._sub is not None:
            self._sub.reserved -= self._n
            self._sub, self._n = None, 0

    @property
    def taken(self) -> bool:
        return self._sub is not None

    def deliver(self, enforcements: list[Enforcement], traceparents: Sequence[str | None] = ()) -> str | None:
        """Hands the committed enforcements to the stream; returns its lease token when the
        stream has closed meanwhile (the caller then releases what was leased to it).
        ``traceparents`` (tracing on): each enforcement's, in the same order."""
        sub, self._sub = self._sub, None
        if sub is None:
            return None
        sub.reserved -= self._n
        self._n = 0
        if sub not in self._dispatcher._subs:
            return sub.token
        for i, e in enumerate(enforcements):
            sub.held.add(e.id)
            trace = traceparents[i] if traceparents else None
            sub.inbox.append(Delivery(e, 1, e.created + timedelta(seconds=self._lease_s), trace))
        sub.wake.set()
        return None


class Dispatcher:
    """Fans wake-ups out to every watch stream of this process."""

    def __init__(self, database_url: str, announce_interval_s: float = 0.01) -> None:
        self._url = database_url
        # Insertion-ordered: wake() rotates through it.
        self._subs: dict[Subscription, None] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._interval = announce_interval_s
        self._notes: dict[str, list[dict[str, Any]]] = {}
        self._notes_ready = asyncio.Event()
        self._announcer: asyncio.Task[None] | None = None
        self._pool: asyncpg.Pool | None = None
        # Backends this api announced through: their notifications come back to our own
        # LISTEN connection and must not wake our streams a second time.
        self._own_pids: set[int] = set()
        self.listen_connects = 0
        """LISTEN connections made so far (a reconnect adds one)."""

    def subscribe(
        self, credit: int = 16, filtered: bool = False, executor_id: str = "", token: str = "", principal: str = ""
    ) -> Subscription:
        sub = Subscription(credit, filtered, executor_id, token, principal)
        self._subs[sub] = None
        return sub

    def streams_of(self, principal: str) -> list[Subscription]:
        """The open watch streams of one principal on this api."""
        return [sub for sub in self._subs if sub.principal == principal]

    def subscriptions(self) -> list[Subscription]:
        """The open watch streams of this api, in no particular order (hand-offs rotate them);
        read-only use: the executors view, ``EnforcementService.ListExecutors``."""
        return list(self._subs)

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.pop(sub, None)

    def wake_all(self) -> None:
        """Anything may be waiting (start-up, reconnects, released work): every stream looks."""
        for sub in self._subs:
            sub.poke()

    def stream_credit(self) -> tuple[int, int]:
        """Watch streams open on this api, and the credit they have free in all."""
        return len(self._subs), sum(sub.free for sub in self._subs)

    def handoff(self, lease_s: float) -> Handoff:
        """A hand-off for one insert (see ``Handoff``)."""
        return Handoff(self, lease_s)

    def _take_credit(self, n: int) -> Subscription | None:
        """The next stream (in turn) able to take ``n`` new enforcements now, its credit taken."""
        for sub in self._subs:
            if not sub.filtered and not sub.starved and sub.token and sub.free >= n:
                sub.reserved += n
                self._subs.pop(sub)
                self._subs[sub] = None
                return sub
        return None

    def wake(self, new: int) -> None:
        """``new`` enforcements were committed: wake just enough streams to take them.

        Waking every stream for every commit makes each run a claim query that mostly finds
        nothing (N streams, N claims per event). Streams with free credit are woken in turn,
        rotating so that work spreads, until their free credit covers ``new``.
        """
        covered = 0
        for sub in list(self._subs):
            if sub.filtered:
                sub.poke()
            elif covered < new and sub.free > 0:
                sub.poke()
                covered += sub.free
                # Move it to the back: the next wake starts with another stream.
                self._subs.pop(sub)
                self._subs[sub] = None
        if covered < new:
            for sub in self._subs:
                if sub.free == 0:
                    sub.starved = True

    def resolved(self, enforcement: int) -> None:
        """An enforcement was resolved: its stream has credit again, and looks if it is starved."""
        for sub in self._subs:
            if enforcement in sub.held:
                sub.held.discard(enforcement)
                if sub.starved:
                    sub.poke()

    def announce(
        self, events: list[Event], created: list[Enforcement], resolved: list[Enforcement], leased: bool = False
    ) -> None:
        """Queues NOTIFY announcements of committed writes (sent soon, batched). ``leased``:
        the new enforcements were handed to a stream already; their notes say so, and other
        replicas do not wake their streams for them."""
        m = metrics.current
        if m.enabled:
            m.events_created([e.trigger_ref for e in events])
            m.enforcements_created([e.rule_ref for e in created])
            for e in resolved:
                m.resolved(e.status, e.created, e.resolved_at)
            if leased:
                m.handed_off(len(created))
        if self._pool is None:
            return
        known: dict[datetime, str] = {}
        created_notes = [enforcement_note(e, known) for e in created]
        if leased:
            for note in created_notes:
                note["leased"] = True
        for channel, notes in (
            ("event_created", [event_note(e, known) for e in events]),
            ("enforcement_created", created_notes),
            ("enforcement_resolved", [enforcement_note(e, known) for e in resolved]),
        ):
            if notes:
                self._notes.setdefault(channel, []).extend(notes)
                self._notes_ready.set()

    async def _announce_loop(self) -> None:
        assert self._pool is not None
        while not self._stopping.is_set() or self._notes:
            if not self._notes:
                stop = asyncio.ensure_future(self._stopping.wait())
                ready = asyncio.ensure_future(self._notes_ready.wait())
                await asyncio.wait({stop, ready}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                ready.cancel()
                continue
            self._notes_ready.clear()
            notes, self._notes = self._notes, {}
            channels, payloads = [], []
            for channel, items in notes.items():
                for payload in pack(items):
                    channels.append(channel)
                    payloads.append(payload)
            try:
                async with self._pool.acquire() as conn:
                    self._own_pids.add(conn.get_server_pid())
                    await conn.execute(_ANNOUNCE, channels, payloads)
                metrics.current.announced(len(payloads))
            except Exception as exc:  # noqa: BLE001 - announcements are best effort; polling covers
                log.debug("announcement of %d notes dropped: %s", len(payloads), exc)
            if not self._stopping.is_set():
                # Bounds this api's notifying commits, however fast it writes.
                await asyncio.sleep(self._interval)

    def _on_notify(self, _conn: Any, pid: int, channel: str, payload: object) -> None:
        if pid in self._own_pids:
            return  # our own announcement: our streams were woken when we committed
        if channel == "enforcement_created":
            with contextlib.suppress(ValueError, AttributeError):
                data = json.loads(str(payload))
                waiting = sum(1 for n in data if not n.get("leased")) if isinstance(data, list) else 1
                if waiting:
                    self.wake(waiting)
                return
            self.wake_all()
            return
        # enforcement_resolved: one object from the trigger, or an array from an api.
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            data = json.loads(str(payload))
            for note in data if isinstance(data, list) else [data]:
                self.resolved(int(note["id"]))

    async def _listen(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self._url)
                await conn.add_listener("enforcement_created", self._on_notify)
                await conn.add_listener("enforcement_resolved", self._on_notify)
                delay = 0.1
                self.listen_connects += 1
                # Anything committed while we were not listening is found by polling; wake
                # everyone once so that it is found now.
                self.wake_all()
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=closed: lost.set())
                stop = asyncio.ensure_future(self._stopping.wait())
                lost = asyncio.ensure_future(closed.wait())
                try:
                    while True:
                        await asyncio.wait({stop, lost}, timeout=LISTEN_PROBE_S, return_when=asyncio.FIRST_COMPLETED)
                        if stop.done() or lost.done():
                            break
                        if not await alive(conn, LISTEN_PROBE_TIMEOUT_S):
                            log.warning("LISTEN connection stopped answering; reconnecting")
                            break
                finally:
                    stop.cancel()
                    lost.cancel()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
                # InternalClientError: TargetServerAttributeNotMatched, while a failover leaves no
                # host of a multi-host URL writable; the task must live on to reconnect after it.
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc or type(exc).__name__, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 5.0)
            finally:
                if conn is not None:
                    # Not close(): over a dead path its goodbye would wait for an answer.
                    conn.terminate()

    def start(self, pool: asyncpg.Pool | None = None) -> None:
        """Starts listening; with a pool, also announcing this api's writes through it."""
        self._task = asyncio.create_task(self._listen(), name="dispatcher-listen")
        if pool is not None:
            self._pool = pool
            self._announcer = asyncio.create_task(self._announce_loop(), name="dispatcher-announce")

    async def stop(self) -> None:
        self._stopping.set()
        self.wake_all()
        for task in (self._task, self._announcer):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
