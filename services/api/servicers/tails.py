"""Live tails: ``EventService/TailEvents`` and ``EnforcementService/TailEnforcements``.

Observe-only server streams (a ``tail -f`` of the pipeline): they read, never claim or lease.

The cursor problem
------------------
A tail delivers the rows of a *change stream* in key order: events by (created, id),
creations of enforcements by (created, id), resolutions by (resolved_at, id). The writer sets
the key before it commits (``created`` is taken in the read that precedes the insert, ids come
from sequences, ``resolved_at`` is the resolving transaction's ``now()``), so rows become
visible out of key order: a row can appear *behind* rows already delivered. A position alone
("everything up to (t, id) is delivered") would skip such a row; re-reading from an older
position would repeat rows.

The scheme rests on one assumption: **a row commits at most ``WINDOW`` (10 s) after its key
time** (the database's clock sets both). Then, when a read is taken after database time
``now``, every row with key < ``now - WINDOW`` is already visible ("stable"): none can appear
later. Rows with a later key may still be missing.

A track (one change stream's progress) is ``H = (t, id)`` and ``seen``:

* every row with (key, id) <= H has been delivered (or will never be: see the limit below);
* ``seen`` holds the (key, id) of the rows delivered *after* H: at most ``MAX_SEEN``.

Each poll reads, ascending, at most ``PAGE`` rows with (key, id) > H whose ids are not in
``seen``, and takes them in order. Before the rows it reads the database time ``now``; with
``U = now - WINDOW``:

* a stable row (key < U) is delivered and H moves to it: every row before it is either
  stable, so visible, so read before it in this page or in ``seen``, or <= H already;
* an unstable row (key >= U) is delivered and added to ``seen``; first H moves to
  (U - 1 us, max id): every stable row precedes it, so was delivered. If ``seen`` is full,
  the track stops there until U has moved on (its entries become stable and fall under H):
  a fast stream is then followed ``WINDOW`` behind instead of live, but never wrongly;
* a page that was not full read every visible row after H: H moves to (U - 1 us, max id).

Entries of ``seen`` at or under H are dropped, so ``seen`` only ever holds rows of the last
``WINDOW``, at most ``MAX_SEEN`` of them. The cursor sent with every message is the state
right after that message (H and ``seen`` of each track), delta- and varint-encoded (a few
bytes per entry, at most 16 KiB in all), signed with the api's shared page-token key and
bound to the request's filters: any replica, after any restart, resumes it exactly, and a
forged or altered one is INVALID_ARGUMENT naming ``cursor``.

**Guarantee:** every row committed after the tail's start (or its cursor) that passes the
filters is delivered exactly once, in key order except that rows committing late (within
``WINDOW``) come when they commit. **Limit:** a row that commits more than ``WINDOW`` after
its key time (a write transaction held open that long, or an ingest call whose matching took
that long between its read and its insert) may be missed, if the track moved past it
meanwhile. A tail from now starts at the database's time: a row with an earlier key that
commits after the start is not delivered. A cursor whose position is more than
``MAX_CURSOR_AGE`` old is refused (FAILED_PRECONDITION, reason CURSOR_EXPIRED), and so is a
client that falls that far behind: retention may have dropped rows it needs.

TailEnforcements merges two tracks (creations, resolutions) and delivers a resolution only
once its enforcement's creation has been delivered (or lies before the creations' start), so
that CREATED comes before RESOLVED for every enforcement.

Memory: a poll holds at most ``PAGE`` rows per track, and the stream is an async generator
that gRPC advances only as its flow control lets messages out: a slow client slows the reads
instead of growing a buffer. Wake-ups (``store.tails.notices``: the NOTIFY announcements of
every api and writer) only make the next poll sooner; every tail polls at least every
``poll_s``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import hashlib
import json
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.api import cloudevents_out, convert, validate
from services.api.servicers.requests import Revealed, may_reveal, shown_unaudited
from services.api.store import Enforcement, Scope, Signer, Store
from services.api.store.tails import Read
from shared import limits
from shared.errors import FailedPrecondition, InvalidArgument, Violations
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, event_pb2

WINDOW = timedelta(seconds=10)
"""How long after its key time a row may commit and still be delivered (see the module doc)."""
MAX_SEEN = 256
"""Rows of the trailing window a track remembers; past that it follows WINDOW behind."""
PAGE = 32
"""Rows one poll reads per track: what a tail holds in memory at most (with its message)."""
POLL_S = 1.0
"""A tail reads at least this often, notified or not."""
MAX_CURSOR_AGE = timedelta(hours=24)
"""Oldest position a tail resumes from (rows may be compressed or dropped further back)."""
MAX_CURSOR = 16 * 1024
"""Characters of the longest cursor this api issues."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WINDOW_US = WINDOW // timedelta(microseconds=1)
_MAX_ID = 2**63 - 1
_MIN_US = (datetime(1, 1, 2, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
_MAX_US = (datetime(9999, 12, 30, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
_VERSION = 1
_EVENTS, _ENFORCEMENTS = 1, 2
_HEAD = struct.Struct(">qq")
_URLSAFE = re.compile(r"[A-Za-z0-9_-]+")
_RESTART = "start again without a cursor"
_BAD = f"is not a cursor issued by this api (it is malformed or was altered); {_RESTART}"
_FOREIGN = f"was issued for other filters; send the filters it was issued with, or {_RESTART}"


def micros(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


def _at(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


# ---- tracks -----------------------------------------------------------------------------------


@dataclass
class Track:
    """One change stream's progress: every row with (key, id) <= (t, id) is delivered, and
    ``seen`` lists the (key, id) of those delivered after it (see the module doc)."""

    t: int
    id: int
    seen: list[tuple[int, int]] = field(default_factory=list)

    def after(self) -> tuple[datetime, int]:
        return _at(self.t), self.id

    def skip(self) -> list[int]:
        return [id_ for _, id_ in self.seen]

    def delivered(self, key: int, id_: int) -> bool:
        return (key, id_) <= (self.t, self.id) or (key, id_) in self.seen

    def _raise_to(self, t: int, id_: int) -> None:
        if (t, id_) > (self.t, self.id):
            self.t, self.id = t, id_
            cut = bisect.bisect_right(self.seen, (t, id_))
            del self.seen[:cut]

    def admit(self, key: int, id_: int, stable_before: int) -> bool:
        """Takes the next row of a read (rows come in order): True when it is to be delivered
        now, False when the track must stop here until the window moves on."""
        if key < stable_before:
            self._raise_to(key, id_)
            return True
        self._raise_to(stable_before - 1, _MAX_ID)
        if len(self.seen) >= MAX_SEEN:
            return False
        bisect.insort(self.seen, (key, id_))
        return True

    def settle(self, stable_before: int) -> None:
        """A read returned every visible row after H: all stable rows are delivered."""
        self._raise_to(stable_before - 1, _MAX_ID)


# ---- cursors ----------------------------------------------------------------------------------


def _varint(out: bytearray, n: int) -> None:
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.at = 0

    def varint(self) -> int:
        n = shift = 0
        while True:
            if self.at >= len(self.raw) or shift > 63:
                raise ValueError("truncated varint")
            byte = self.raw[self.at]
            self.at += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return n

    def head(self) -> tuple[int, int]:
        if self.at + _HEAD.size > len(self.raw):
            raise ValueError("truncated")
        t, id_ = _HEAD.unpack_from(self.raw, self.at)
        self.at += _HEAD.size
        return int(t), int(id_)


def _pack(kind: int, tracks: Sequence[Track]) -> bytes:
    out = bytearray((_VERSION, kind))
    for track in tracks:
        out += _HEAD.pack(track.t, track.id)
        _varint(out, len(track.seen))
        key, id_ = track.t, track.id
        for k, i in track.seen:
            _varint(out, k - key)  # seen is sorted and after H: never negative
            delta = i - id_
            _varint(out, (delta << 1) ^ (delta >> 63))  # zigzag
            key, id_ = k, i
    return bytes(out)


def _unpack(kind: int, n_tracks: int, raw: bytes) -> list[Track]:
    """The tracks of a signed payload; ValueError when it is not one this api writes."""
    r = _Reader(raw)
    if raw[:2] != bytes((_VERSION, kind)):
        raise ValueError("version or kind")
    r.at = 2
    tracks: list[Track] = []
    for _ in range(n_tracks):
        t, id_ = r.head()
        if not _MIN_US <= t <= _MAX_US or not 0 <= id_ <= _MAX_ID:
            raise ValueError("position out of range")
        n = r.varint()
        if n > MAX_SEEN:
            raise ValueError("too many seen")
        track = Track(t, id_)
        key, last = t, id_
        for _ in range(n):
            key += r.varint()
            z = r.varint()
            last += (z >> 1) ^ -(z & 1)
            if key > _MAX_US or not 0 < last <= _MAX_ID or (track.seen and (key, last) <= track.seen[-1]):
                raise ValueError("bad seen entry")
            if (key, last) <= (t, id_):
                raise ValueError("seen entry not after the position")
            track.seen.append((key, last))
        tracks.append(track)
    if r.at != len(raw):
        raise ValueError("trailing bytes")
    return tracks


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class Cursors:
    """Signs and checks the cursors of one tail (its kind and filters)."""

    def __init__(self, signer: Signer, kind: int, n_tracks: int, filters: list[Any]) -> None:
        self._signer = signer
        self._kind = kind
        self._n = n_tracks
        self._bound = json.dumps(["tail", kind, filters], ensure_ascii=True, separators=(",", ":")).encode()

    def _scope(self, payload: bytes) -> Scope:
        text = self._bound + b"\x00" + payload
        return Scope(text, hashlib.sha256(text).digest()[:8])

    def _filters_scope(self) -> bytes:
        return hashlib.sha256(self._bound).digest()[:6]

    def encode(self, tracks: Sequence[Track]) -> str:
        payload = _pack(self._kind, tracks)
        # The tag covers the filters and the payload; the short filter digest in front only
        # tells a cursor of other filters from an altered one, for the error message.
        tag = self._signer.encode(self._scope(payload), (_EPOCH, 1))
        return f"{_b64(self._filters_scope() + payload)}.{tag}"

    def decode(self, cursor: str) -> list[Track]:
        if len(cursor) > MAX_CURSOR:
            raise InvalidArgument.one("cursor", f"is longer than the {MAX_CURSOR} characters of any cursor; {_RESTART}")
        body, _, tag = cursor.partition(".")
        if not _URLSAFE.fullmatch(body) or not _URLSAFE.fullmatch(tag):
            raise InvalidArgument.one("cursor", _BAD)
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise InvalidArgument.one("cursor", _BAD) from None
        if _b64(raw) != body or len(raw) < 8:
            raise InvalidArgument.one("cursor", _BAD)
        digest, payload = raw[:6], raw[6:]
        try:
            self._signer.decode(self._scope(payload), tag)
        except InvalidArgument:
            raise InvalidArgument.one("cursor", _FOREIGN if digest != self._filters_scope() else _BAD) from None
        try:
            return _unpack(self._kind, self._n, payload)
        except (ValueError, struct.error, OverflowError):
            raise InvalidArgument.one("cursor", _BAD) from None


# ---- the tail loop ----------------------------------------------------------------------------

Reader = Callable[[tuple[datetime, int], list[int], int], Awaitable[Read]]


@dataclass
class Source:
    """One track and how to read it."""

    track: Track
    read: Reader
    key: Callable[[Any], datetime]
    ready: Callable[[Any], bool] = lambda _row: True
    """False for a row that must wait (a resolution whose creation is not delivered yet)."""
    shown: Callable[[list[Any]], Awaitable[list[Any]]] | None = None
    """The rows of a read as the tail sends them (secrets masked): called once per read, so
    its lookups cost one statement per page, not per message."""


def _expired(track: Track, now: datetime) -> None:
    if _at(track.t) < now - MAX_CURSOR_AGE:
        hours = MAX_CURSOR_AGE // timedelta(hours=1)
        raise FailedPrecondition(
            f"this tail is more than {hours} hours behind: the rows it needs may have been dropped or "
            f"compressed; list them (ListEvents / ListEnforcements) and start a new tail without a cursor",
            reason="CURSOR_EXPIRED",
        )


async def follow(
    sources: Sequence[Source],
    wake: asyncio.Event,
    stop: asyncio.Event | None,
    poll_s: float,
) -> AsyncIterator[tuple[int, Any]]:
    """Yields (source index, row) in delivery order, forever (until ``stop``). Each source's
    track has taken the row when it is yielded, so a cursor encoded then resumes after it."""
    loop = asyncio.get_running_loop()
    # A track whose ``seen`` is full reads nothing new until its oldest entry is stable.
    not_before = [0.0] * len(sources)
    while stop is None or not stop.is_set():
        wake.clear()
        more = False
        for index, source in enumerate(sources):
            if loop.time() < not_before[index]:
                continue
            track = source.track
            read = await source.read(track.after(), track.skip(), PAGE)
            _expired(track, read.now)
            stable_before = micros(read.now) - WINDOW_US
            stopped = False
            rows = read.rows if source.shown is None or not read.rows else await source.shown(read.rows)
            for row in rows:
                if not source.ready(row):
                    stopped = True
                    break
                if not track.admit(micros(source.key(row)), row.id, stable_before):
                    stopped = True
                    not_before[index] = loop.time() + (track.seen[0][0] - stable_before) / 1e6
                    break
                yield index, row
            if stopped:
                continue
            if len(read.rows) == PAGE:
                more = True  # read on at once: the client is waiting for these
            else:
                track.settle(stable_before)
        if more:
            continue
        waits = [asyncio.ensure_future(wake.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def _cloudevents(v: Violations, fmt: int) -> bool:
    """Whether the tail sends CloudEvents (``format``); an unknown format is a violation."""
    if fmt not in common_pb2.TailFormat.values():
        v.add("format", f"unknown format {fmt}; TAIL_FORMAT_UNSPECIFIED or TAIL_FORMAT_CLOUDEVENTS")
    return fmt == common_pb2.TAIL_FORMAT_CLOUDEVENTS


async def _start(store: Store, cursors: Cursors, cursor: str, n: int) -> list[Track]:
    if cursor:
        # An expired one is refused by the first read of each track the tail follows.
        return cursors.decode(cursor)
    start = micros(await store.tails.now())
    return [Track(start, 0) for _ in range(n)]


# ---- the RPCs ---------------------------------------------------------------------------------


async def tail_events(
    store: Store,
    request: event_pb2.TailEventsRequest,
    stop: asyncio.Event | None = None,
    poll_s: float = POLL_S,
    ce_source: str = cloudevents_out.DEFAULT_SOURCE,
) -> AsyncIterator[event_pb2.TailEventsResponse]:
    """``ce_source``: the CloudEvents' ``source``, with format CLOUDEVENTS."""
    v = Violations()
    validate.filter_ref(v, "trigger_ref", request.trigger_ref)
    validate.filter_ref(v, "rule_ref", request.rule_ref)
    validate.text(v, "source_ref", request.source_ref, limits.MAX_FILTER_TEXT)
    as_cloudevents = _cloudevents(v, request.format)
    v.raise_if_any()
    reveal = may_reveal(request.reveal)
    filters = {"trigger_ref": request.trigger_ref, "source_ref": request.source_ref, "rule_ref": request.rule_ref}
    cursors = Cursors(await store.tails.signer(), _EVENTS, 1, sorted(filters.items()))
    (track,) = await _start(store, cursors, request.cursor, 1)

    def read(after: tuple[datetime, int], skip: list[int], limit: int) -> Awaitable[Read]:
        return store.tails.events(after, skip, limit, **filters)

    revealed = Revealed("event")

    async def masked(rows: list[Any]) -> list[Any]:
        nonlocal revealed
        out, revealed = await shown_unaudited(store, rows, reveal=reveal)
        return out

    source = Source(track, read, key=lambda e: e.created, shown=masked)
    async with store.tails.notices.subscribe(["event_created"]) as wake:
        if request.announce_start:
            yield event_pb2.TailEventsResponse(start=True, cursor=cursors.encode([track]))
        async for _, event in follow([source], wake, stop, poll_s):
            await revealed.audit(store, (event.id,))
            cursor = cursors.encode([track])
            if as_cloudevents:
                out = cloudevents_out.to_cloudevent(
                    convert.event(event), cloudevents_out.CREATED, source=ce_source, cursor=cursor
                )
                yield event_pb2.TailEventsResponse(cloud_event=out, cursor=cursor)
            else:
                yield event_pb2.TailEventsResponse(event=convert.event(event), cursor=cursor)


_CHANGE = enforcement_pb2.TailEnforcementsResponse


async def tail_enforcements(
    store: Store,
    request: enforcement_pb2.TailEnforcementsRequest,
    stop: asyncio.Event | None = None,
    poll_s: float = POLL_S,
    ce_source: str = cloudevents_out.DEFAULT_SOURCE,
) -> AsyncIterator[enforcement_pb2.TailEnforcementsResponse]:
    """``ce_source``: the CloudEvents' ``source``, with format CLOUDEVENTS."""
    v = Violations()
    validate.filter_ref(v, "rule_ref", request.rule_ref)
    validate.filter_ref(v, "trigger_ref", request.trigger_ref)
    if request.HasField("event"):
        validate.positive_id(v, "event", request.event)
    if request.status != 0 and request.status not in convert.ENFORCEMENT_STATUS_NAME:
        v.add("status", f"unknown status {request.status}")
    as_cloudevents = _cloudevents(v, request.format)
    v.raise_if_any()
    reveal = may_reveal(request.reveal)
    status = convert.ENFORCEMENT_STATUS_NAME.get(request.status, "")
    rule_ref, trigger_ref = request.rule_ref, request.trigger_ref
    event = request.event if request.HasField("event") else None
    filters = [["event", event], ["rule_ref", rule_ref], ["status", status], ["trigger_ref", trigger_ref]]
    cursors = Cursors(await store.tails.signer(), _ENFORCEMENTS, 2, filters)
    creations, resolutions = await _start(store, cursors, request.cursor, 2)
    follow_created = status in ("", "created")
    follow_resolved = status != "created"

    def read_created(after: tuple[datetime, int], skip: list[int], limit: int) -> Awaitable[Read]:
        return store.tails.created(after, skip, limit, rule_ref=rule_ref, trigger_ref=trigger_ref, event=event)

    def read_resolved(after: tuple[datetime, int], skip: list[int], limit: int) -> Awaitable[Read]:
        return store.tails.resolved(
            after, skip, limit, rule_ref=rule_ref, trigger_ref=trigger_ref, event=event, status=status
        )

    def creation_delivered(e: Enforcement) -> bool:
        return not follow_created or creations.delivered(micros(e.created), e.id)

    # Per source: what its last read revealed (a creation and a resolution are two messages,
    # each audited as it is sent).
    revealed = [Revealed("enforcement"), Revealed("enforcement")]

    def masker(index: int) -> Callable[[list[Any]], Awaitable[list[Any]]]:
        async def masked(rows: list[Any]) -> list[Any]:
            out, revealed[index] = await shown_unaudited(store, rows, reveal=reveal)
            return out

        return masked

    sources: list[Source] = []
    changes: list[int] = []
    channels: list[str] = []
    if follow_created:
        sources.append(Source(creations, read_created, key=lambda e: e.created, shown=masker(len(sources))))
        changes.append(_CHANGE.CHANGE_CREATED)
        channels.append("enforcement_created")
    if follow_resolved:
        sources.append(
            Source(
                resolutions,
                read_resolved,
                key=lambda e: e.resolved_at,
                ready=creation_delivered,
                shown=masker(len(sources)),
            )
        )
        changes.append(_CHANGE.CHANGE_RESOLVED)
        channels.append("enforcement_resolved")
    async with store.tails.notices.subscribe(channels) as wake:
        if request.announce_start:
            yield _CHANGE(change=_CHANGE.CHANGE_STARTED, cursor=cursors.encode([creations, resolutions]))
        async for index, row in follow(sources, wake, stop, poll_s):
            e: Enforcement = row
            change = changes[index]
            if change == _CHANGE.CHANGE_CREATED:
                # As it was stored, whatever became of it since (its resolution comes next).
                e = e._replace(status="created", resolved_at=None)
            await revealed[index].audit(store, (e.id,))
            cursor = cursors.encode([creations, resolutions])
            if as_cloudevents:
                name = cloudevents_out.CREATED if change == _CHANGE.CHANGE_CREATED else cloudevents_out.RESOLVED
                out = cloudevents_out.to_cloudevent(convert.enforcement(e), name, source=ce_source, cursor=cursor)
                yield _CHANGE(cloud_event=out, change=change, cursor=cursor)  # type: ignore[arg-type]
            else:
                yield _CHANGE(enforcement=convert.enforcement(e), change=change, cursor=cursor)  # type: ignore[arg-type]


__all__ = ["Cursors", "Track", "follow", "tail_enforcements", "tail_events"]
