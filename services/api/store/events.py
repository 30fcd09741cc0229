"""Events: immutable once stored; storing one also stores the enforcements it produces.

``create_many`` serves CreateEvent (one event) and CreateEvents (up to 1,000) with two round
trips and no explicit transaction:

1. one read gathers the triggers, the versions of their rule sets (compiled rules are cached
   per trigger and loaded again only when their version changed: ``_rulesets.py``), fresh
   event ids and any idempotency keys already used;
2. after matching and rendering in Python, one INSERT statement (CTEs over ``unnest``
   arrays) writes the events, their enforcements, the new idempotency keys and, when a
   watch stream of this api has the credit, the enforcements' dispatch rows already leased
   to it (direct hand-off). A single statement is atomic: all of it is stored or none of it.

Matching reads the rules as they are at step 1; a rule disabled just after still gets its
enforcement, which the executor then resolves DISABLED.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.api import matching, metrics
from services.api.conditions import Compiled, RuleSet
from services.api.encoded import Measure, record_size
from shared import limits
from shared.errors import InvalidArgument, NotFound

from ._chunks import ById
from ._db import Connection, ReadRoute, guarded, is_row, until_deadline
from ._derive import derive
from ._paging import Count, Keys, Paged, Where, json_as_text
from ._rulesets import EMPTY, RuleSets, Schemas, TriggerSchema
from .types import CreatedEvent, Enforcement, Event, Lease, NewEvent, Page, columns

_INLINE_WORK = 256
"""Conditions (plus one per rule) a call may evaluate on the event loop; more go to a thread."""
_SCHEMA_WORK = 2
"""What checking one event against its trigger's schema counts as, in conditions: a few
microseconds for a 40-property schema (README, Schemas)."""
_Plan = tuple[
    list[list[Any]],
    list[list[Any]],
    list[list[Any]],
    list["Event | None"],
    list[tuple[dict[str, Any], NewEvent, int, Any]],
    dict[str, int],
]

LeaseFor = Callable[[int], Lease | None]
"""Asked with the number of enforcements about to be inserted: the stream to hand them to."""

_EVENT = columns(Event)
_LIST = json_as_text(Event, "event", ("config", "payload", "schema_errors"))

_ENFORCEMENT = columns(Enforcement)

_PREPARE = """
SELECT now() AS now,
       ARRAY(SELECT nextval('event_id_seq') FROM generate_series(1, $1::int)) AS ids,
       (SELECT coalesce(jsonb_object_agg(t.ref, t.id), '{}')
          FROM trigger t WHERE t.ref = ANY($2::text[])) AS triggers,
       (SELECT coalesce(jsonb_object_agg(s.trigger_ref, s.version), '{}')
          FROM rule_set s WHERE s.trigger_ref = ANY($2::text[])) AS versions,
       (SELECT coalesce(jsonb_object_agg(t.ref, jsonb_build_array(t.id, t.schema_version)), '{}')
          FROM trigger t WHERE t.ref = ANY($2::text[]) AND t.schema_mode <> 'off'
           AND t.out_schema IS NOT NULL) AS schemas,
       (SELECT coalesce(jsonb_object_agg(r.ref, r.trigger_ref), '{}')
          FROM rule r WHERE r.ref = ANY($3::text[])) AS targeted,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'request_id', q.request_id, 'fingerprint', q.fingerprint,
                   'id', q.entity_id, 'created', q.entity_created)), '[]')
          FROM ingest_request q
         WHERE q.kind = 'event' AND q.request_id = ANY($4::text[])) AS replays
"""

_INSERT = """
WITH ev AS (
    INSERT INTO event (id, trigger, trigger_ref, config, payload, source, source_ref, rule,
                       rule_ref, created, reemit_of, schema_version, schema_errors)
    SELECT u.i, u.t, u.tr, u.c::jsonb, u.p::jsonb, u.s, u.sr, u.r, u.rr, $10::timestamptz, u.ro,
           u.sv, u.se::jsonb
      -- $28/$29 (schema versions and problems) are NULL when no event was checked.
      FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                  $6::bigint[], $7::text[], $8::bigint[], $9::text[], $26::bigint[],
                  $28::int[], $29::text[])
           AS u(i, t, tr, c, p, s, sr, r, rr, ro, sv, se)
), req AS (
    INSERT INTO ingest_request (kind, request_id, fingerprint, entity_id, entity_created)
    SELECT 'event', u.*, $10::timestamptz
      FROM unnest($11::text[], $12::text[], $13::bigint[]) AS u
), enf AS (
    INSERT INTO enforcement (rule, rule_ref, trigger_ref, config, event, payload, condition,
                             conditions, created, traceparent)
    SELECT u.r, u.rr, u.tr, u.c::jsonb, u.e, u.p::jsonb, u.cond::enforcement_condition,
           u.conds::jsonb, $10::timestamptz, u.tp
      -- $27 (traceparents) is NULL when tracing is off: unnest pads it with NULLs.
      FROM unnest($14::bigint[], $15::text[], $16::text[], $17::text[], $18::bigint[],
                  $19::text[], $20::text[], $21::text[], $27::text[]) AS u(r, rr, tr, c, e, p, cond, conds, tp)
    RETURNING id, event, rule, created, rule_ref, trigger_ref
), handed AS (
    -- Direct hand-off ($23, a stream's lease token, given): the dispatch rows are written here,
    -- already leased, and the tracking trigger leaves them so (migration 0006).
    INSERT INTO enforcement_dispatch (enforcement, enforcement_created, rule_ref, trigger_ref,
                                      attempts, leased_by, lease_token, lease_expires_at,
                                      lease_principal)
    SELECT id, created, rule_ref, trigger_ref, 1, $22::text, $23::text,
           now() + $24::float8 * interval '1 second', $25::text
      FROM enf WHERE $23::text IS NOT NULL
)
SELECT id, event, rule FROM enf
"""

_REPLAY_EVENTS = f"""
SELECT {_EVENT} FROM event
 WHERE (id, created) IN (SELECT * FROM unnest($1::bigint[], $2::timestamptz[]))"""
_REPLAY_ENFORCEMENTS = f"""
SELECT {_ENFORCEMENT} FROM enforcement WHERE event = ANY($1::bigint[]) ORDER BY id"""
_VERSION = "SELECT version FROM rule_set WHERE trigger_ref = $1"
# ReplayRule: one trigger's events in a range, newest first, through the index on
# (trigger_ref, created DESC, id DESC); the next page starts after the last (created, id).
_SCAN = f"""
SELECT {_EVENT} FROM event
 WHERE trigger_ref = $1 AND created >= $2 AND created < $3
 ORDER BY created DESC, id DESC LIMIT $4"""
_SCAN_AFTER = f"""
SELECT {_EVENT} FROM event
 WHERE trigger_ref = $1 AND created >= $2 AND (created, id) < ($3, $4)
 ORDER BY created DESC, id DESC LIMIT $5"""
_RULE_EXISTS = "SELECT trigger_ref FROM rule WHERE ref = $1"


def fingerprint(e: NewEvent) -> str:
    """A digest of what an event request asks for, to tell a retry from a reused key."""
    body = [e.trigger_ref, e.payload, e.config if e.config_in_fingerprint else None, e.source, e.source_ref, e.rule_ref]
    if e.reemit_of is not None:
        body.append(e.reemit_of)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _check_schemas(
    new: Sequence[NewEvent], many: bool, schemas: dict[str, TriggerSchema], replays: dict[str, Any]
) -> list[tuple[int | None, list[str] | None]]:
    """Each event checked against its trigger's schema: (the version checked against, its
    problems when stored in 'warn' mode). Refuses the call, naming every event that fails an
    'enforce' schema (payload path and keyword; bounded as every error is), before anything
    is written; an event answered from an earlier request is not checked again."""
    out: list[tuple[int | None, list[str] | None]] = []
    refused: list[tuple[str, str]] = []
    for i, e in enumerate(new):
        checked = schemas.get(e.trigger_ref)
        if checked is None or (e.request_id and e.request_id in replays):
            out.append((None, None))
            continue
        problems = checked.schema.problems(e.payload, _field(i, many, "payload"))
        if not problems:
            out.append((checked.version, None))
        elif checked.mode == "enforce":
            out.append((None, None))
            if len(refused) <= limits.MAX_VIOLATIONS:
                refused.extend(problems)
        else:
            out.append((checked.version, [f"{where}: {why}" for where, why in problems]))
    if refused:
        raise InvalidArgument(refused)
    return out


def _json(value: object) -> str | None:
    """JSON text for a jsonb column sent inside an array (cast back with ::jsonb in SQL).

    A Python list given for a jsonb[] parameter would be read as array dimensions.
    """
    return None if value is None else json.dumps(value)


def _field(index: int, many: bool, name: str) -> str:
    return f"events[{index}].{name}" if many else f"event.{name}"


_PREPARE_TRIES = 3


async def _prepare(conn: Connection, *args: Any) -> asyncpg.Record | None:
    """Runs ``_PREPARE``, again when PostgreSQL chose it as a deadlock's victim.

    It only reads (and draws ids), so running it again is safe. TimescaleDB's retention job
    takes an exclusive lock on the hypertables' catalog objects while it drops chunks, in an
    order that can close a cycle with this statement's reads (seen on the bench's server); the
    victim's retry then simply waits for the job.
    """
    for attempt in range(_PREPARE_TRIES):
        try:
            return await conn.fetchrow(_PREPARE, *args)
        except asyncpg.DeadlockDetectedError:
            if attempt == _PREPARE_TRIES - 1:
                raise
    raise AssertionError("unreachable")


class Events(Paged):
    """Stores and reads events."""

    def __init__(self, pool: asyncpg.Pool, keys: Keys | None = None, reads: ReadRoute | None = None) -> None:
        super().__init__(pool, keys, reads)
        self._rule_sets = RuleSets()
        self._schemas = Schemas()
        self.by_id = ById(pool, "event", _EVENT)

    async def create_many(
        self, new: Sequence[NewEvent], many: bool = False, lease: LeaseFor | None = None
    ) -> list[CreatedEvent]:
        """Stores the events and their enforcements (all or nothing); replays known keys.

        ``lease(n)``, called just before the insert with the number of new enforcements, may
        name a watch stream to hand them to: their dispatch rows are then written leased to it
        (attempt 1, expiring after ``Lease.seconds``) in the same statement.
        """
        async with guarded():
            for _attempt in range(3):
                try:
                    return await self._create_many(new, many, lease)
                except asyncpg.UniqueViolationError as exc:
                    # A concurrent request with the same idempotency key committed first: go
                    # round again, and the read step will find it and replay it.
                    if exc.constraint_name != "ingest_request_pkey":
                        raise
        raise InvalidArgument.one("request_id", "is being used by concurrent requests; retry")

    async def _create_many(self, new: Sequence[NewEvent], many: bool, lease: LeaseFor | None) -> list[CreatedEvent]:
        keys = [e.request_id for e in new if e.request_id]
        prints = [fingerprint(e) if e.request_id else "" for e in new]
        seen: dict[str, tuple[str, int]] = {}
        for i, e in enumerate(new):
            if not e.request_id:
                continue
            if e.request_id in seen and seen[e.request_id][0] != prints[i]:
                raise InvalidArgument.one(
                    _field(i, many, "request_id"), "is used twice in this batch for different events"
                )
            seen.setdefault(e.request_id, (prints[i], i))

        async with self._pool.acquire(timeout=until_deadline()) as conn:
            prep = await _prepare(
                conn,
                len(new),
                list({e.trigger_ref for e in new}),
                [e.rule_ref for e in new if e.rule_ref],
                keys,
            )
            assert prep is not None
            now: datetime = prep["now"]
            ids: list[int] = prep["ids"]
            triggers: dict[str, int] = prep["triggers"]
            replays = {r["request_id"]: r for r in prep["replays"]}
            targeted_trigger: dict[str, str] = prep["targeted"]
            sets = await self._rule_sets.get(conn, prep["versions"])
            schemas = await self._schemas.get(conn, prep["schemas"]) if prep["schemas"] else {}

            def plan() -> _Plan:
                # Columns 11 and 12: the schema version each event was checked against, and its
                # problems (JSON text) when stored in 'warn' mode.
                ev_cols: list[list[Any]] = [[] for _ in range(12)]
                req_cols: list[list[Any]] = [[], [], []]
                # The 9th column: each enforcement's traceparent (that of its event's call).
                enf_cols: list[list[Any]] = [[] for _ in range(9)]
                events: list[Event | None] = []
                unsaved: list[tuple[dict[str, Any], NewEvent, int, Any]] = []
                first_of_key: dict[str, int] = {}
                created_iso = now.isoformat()
                recorder = metrics.current
                measure = Measure()
                call_bytes = 0
                checked = _check_schemas(new, many, schemas, replays) if schemas else None
                for i, e in enumerate(new):
                    if e.request_id and e.request_id in replays:
                        if replays[e.request_id]["fingerprint"] != prints[i]:
                            raise InvalidArgument.one(
                                _field(i, many, "request_id"),
                                "was already used for a different event (keys are kept at least 24 hours)",
                            )
                        events.append(None)
                        continue
                    if e.request_id and e.request_id in first_of_key:
                        events.append(None)
                        continue
                    trigger_id = triggers.get(e.trigger_ref)
                    if trigger_id is None:
                        raise NotFound(f"{_field(i, many, 'trigger_ref')}: trigger {e.trigger_ref} not found")
                    rule_set = sets.get(e.trigger_ref, EMPTY)
                    targeted: Compiled | None = None
                    if e.rule_ref:
                        watched = targeted_trigger.get(e.rule_ref)
                        if watched is not None and watched != e.trigger_ref:
                            raise InvalidArgument.one(
                                _field(i, many, "rule_ref"),
                                f"rule {e.rule_ref} watches {watched}, not {e.trigger_ref}",
                            )
                        targeted = rule_set.by_ref.get(e.rule_ref)
                        if targeted is None:
                            raise NotFound(f"{_field(i, many, 'rule_ref')}: rule {e.rule_ref} not found")
                    event_id = ids[i]
                    values = (
                        event_id,
                        trigger_id,
                        e.trigger_ref,
                        e.config,
                        e.payload,
                        e.source,
                        e.source_ref,
                        targeted.rule["id"] if targeted else None,
                        e.rule_ref,
                        e.reemit_of,
                    )
                    payload_json = _json(e.payload)
                    for col, value in zip(
                        ev_cols[:10], (*values[:3], _json(e.config), payload_json, *values[5:]), strict=True
                    ):
                        col.append(value)
                    version, problems = checked[i] if checked is not None else (None, None)
                    ev_cols[10].append(version)
                    ev_cols[11].append(_json(problems))
                    events.append(
                        Event(
                            *values[:9],
                            created=now,
                            reemit_of=e.reemit_of,
                            schema_version=version,
                            schema_errors=problems,
                        )
                    )
                    if e.request_id:
                        first_of_key[e.request_id] = i
                        for col, value in zip(req_cols, (e.request_id, prints[i], event_id), strict=True):
                            col.append(value)
                    facts = matching.Facts(e.payload)
                    budget = matching.Budget(limits.MAX_CREATE_RESPONSE_BYTES)
                    event_bytes = record_size(
                        measure, [e.trigger_ref, e.source_ref or "", e.rule_ref or ""], [e.payload, e.config], []
                    )
                    started = time.perf_counter() if recorder.enabled else 0.0
                    try:
                        if targeted is None:
                            fired = rule_set.matching(facts)
                        else:
                            fired = [targeted.rule] if targeted.rule["enabled"] and targeted.pred(facts) else []
                    except matching.SearchTooCostly:
                        raise InvalidArgument.one(_field(i, many, "payload"), matching.SEARCH_TOO_COSTLY) from None
                    if recorder.enabled:
                        recorder.matched(time.perf_counter() - started)
                    for rule in fired:
                        context = matching.template_context(
                            event_id=event_id,
                            trigger_ref=e.trigger_ref,
                            created_iso=created_iso,
                            payload=e.payload,
                            rule_ref=rule["ref"],
                            source_ref=e.source_ref,
                        )
                        config, size = derive(
                            rule, e.trigger_ref, e.payload, context, budget, measure, _field(i, many, "payload")
                        )
                        event_bytes += size
                        if event_bytes > limits.MAX_CREATE_RESPONSE_BYTES:
                            raise InvalidArgument.one(
                                _field(i, many, "payload"),
                                f"this event would make enforcements of more than {limits.MAX_CREATE_RESPONSE_BYTES:,} "
                                "bytes in all (each carries the payload); send a smaller payload or match fewer rules",
                            )
                        row = (
                            rule["id"],
                            rule["ref"],
                            e.trigger_ref,
                            _json(config),
                            event_id,
                            payload_json,
                            rule["condition"],
                            rule["conditions_json"],
                            e.traceparent,
                        )
                        for col, value in zip(enf_cols, row, strict=True):
                            col.append(value)
                        unsaved.append((rule, e, event_id, config))
                    call_bytes += event_bytes
                    if call_bytes > limits.MAX_DERIVED_PER_CALL_BYTES:
                        raise InvalidArgument.one(
                            "events" if many else "event",
                            "these events and their enforcements would be more than "
                            f"{limits.MAX_DERIVED_PER_CALL_BYTES:,} bytes; send them in smaller batches",
                        )
                return ev_cols, req_cols, enf_cols, events, unsaved, first_of_key

            # Matching and rendering cost grows with the conditions evaluated (bounded per
            # trigger by MAX_CONDITIONS_PER_TRIGGER) and the payloads searched: past a small
            # amount it runs in a thread, so that the event loop keeps serving other calls.
            work = sum(sets.get(e.trigger_ref, EMPTY).cost if not e.rule_ref else 1 for e in new)
            work += _SCHEMA_WORK * sum(1 for e in new if e.trigger_ref in schemas)
            planned = await asyncio.to_thread(plan) if work > _INLINE_WORK else plan()
            ev_cols, req_cols, enf_cols, events, unsaved, first_of_key = planned

            # Replays are read before the insert: once it has committed, nothing here may fail
            # (a batch of separate calls that fails is stored again one event at a time, and
            # an event stored by the failed attempt would be answered to nobody).
            wanted = dict.fromkeys(e.request_id for e in new if e.request_id in replays)
            replayed = await self._replay(conn, [replays[k] for k in wanted if k])

            enforcements: list[Enforcement] = []
            if ev_cols[0]:
                # Only the ids come back: every other value is already here, and decoding
                # the JSON columns of thousands of rows again would cost more than the insert.
                to = lease(len(unsaved)) if lease is not None and unsaved else None
                rows = await conn.fetch(
                    _INSERT,
                    *ev_cols[:9],
                    now,
                    *req_cols,
                    *enf_cols[:8],
                    to.executor_id if to else None,
                    to.token if to else None,
                    to.seconds if to else 0.0,
                    to.principal if to else None,
                    ev_cols[9],
                    enf_cols[8] if any(enf_cols[8]) else None,
                    ev_cols[10] if any(v is not None for v in ev_cols[10]) else None,
                    ev_cols[11] if any(ev_cols[11]) else None,
                )
                ids_by_key = {(r["event"], r["rule"]): r["id"] for r in rows}
                enforcements = [
                    Enforcement(
                        ids_by_key[(event_id, rule["id"])],
                        rule["id"],
                        rule["ref"],
                        e.trigger_ref,
                        config,
                        event_id,
                        "created",
                        e.payload,
                        rule["condition"],
                        rule["conditions"],
                        now,
                        None,
                    )
                    for rule, e, event_id, config in unsaved
                ]

        by_event: dict[int, list[Enforcement]] = {}
        for enf in enforcements:
            assert enf.event is not None
            by_event.setdefault(enf.event, []).append(enf)
        results: list[CreatedEvent] = []
        for e, ev in zip(new, events, strict=True):
            if ev is not None:
                results.append(CreatedEvent(ev, by_event.get(ev.id, []), traceparent=e.traceparent))
            elif e.request_id in replayed:
                results.append(replayed[e.request_id])
            else:
                # A key repeated inside this batch: the same result as its first use.
                first = results[first_of_key[e.request_id or ""]]
                results.append(CreatedEvent(first.event, first.enforcements, replayed=True))
        return results

    async def _replay(self, conn: Connection, stored: list[dict[str, Any]]) -> dict[str, CreatedEvent]:
        if not stored:
            return {}
        ids = [s["id"] for s in stored]
        created = [datetime.fromisoformat(s["created"]) for s in stored]
        ev_rows = await conn.fetch(_REPLAY_EVENTS, ids, created)
        enf_rows = await conn.fetch(_REPLAY_ENFORCEMENTS, ids)
        events = {r["id"]: Event(*r) for r in ev_rows}
        by_event: dict[int, list[Enforcement]] = {}
        for r in enf_rows:
            by_event.setdefault(r["event"], []).append(Enforcement(*r))
        out = {}
        for s in stored:
            event = events.get(s["id"])
            if event is None:
                raise NotFound(f"event {s['id']} of request {s['request_id']} no longer exists")
            out[s["request_id"]] = CreatedEvent(event, by_event.get(s["id"], []), replayed=True)
        return out

    async def rule_set(self, trigger_ref: str) -> RuleSet:
        """The compiled rules of one trigger as they are now (cached as ingest caches them)."""
        async with guarded(), self._pool.acquire() as conn:
            version = await conn.fetchval(_VERSION, trigger_ref)
            if version is None:
                return EMPTY
            return (await self._rule_sets.get(conn, {trigger_ref: version})).get(trigger_ref, EMPTY)

    async def scan(
        self, trigger_ref: str, start: datetime, end: datetime, after: tuple[datetime, int] | None, size: int
    ) -> list[Event]:
        """Up to ``size`` events of a trigger created in [start, end), newest first, after the
        (created, id) of the previous page's last event."""
        if after is None:
            rows = await self._fetch(_SCAN, trigger_ref, start, end, size)
        else:
            rows = await self._fetch(_SCAN_AFTER, trigger_ref, start, after[0], after[1], size)
        return [Event(*r) for r in rows]

    async def get(self, id_: int, *, fresh: bool = False) -> Event:
        """The event ``id_``: on the read route (an event missing there is asked of the primary),
        or with ``fresh`` on the primary (what a write is about to be based on)."""
        if fresh:
            row = await self.by_id.fetchrow(id_)
        else:
            row = await self._reads.run(lambda pool: self.by_id.fetchrow(id_, pool), found=is_row)
        if row is None:
            raise NotFound(f"event {id_} not found")
        return Event(*row)

    async def compressed_until(self) -> datetime | None:
        """Where compressed events end (events created before it may be compressed, and have
        no usable payload index there), as of at most a minute ago; None on a store without
        compressed chunks (plain PostgreSQL, the Apache edition, or nothing compressed yet)."""
        return await self.by_id.finder.compressed_until()

    def listing(
        self,
        *,
        trigger_ref: str = "",
        source_ref: str = "",
        rule_ref: str = "",
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        reemit_of: int | None = None,
        payload_contains: str | None = None,
    ) -> tuple[str, Where]:
        """The SELECT and filters of the list (what its page tokens are bound to).
        ``payload_contains``: JSON text of an object (``search.as_json``), answered by the GIN
        index of migration 0021."""
        where = Where()
        if payload_contains is not None:
            # As text, then cast: the connection's jsonb codec would encode a str again.
            where.add("payload @> {}::text::jsonb", payload_contains)
        if reemit_of is not None:
            where.add("reemit_of = {}", reemit_of)
        if trigger_ref:
            where.add("trigger_ref = {}", trigger_ref)
        if source_ref:
            where.add("source_ref = {}", source_ref)
        if rule_ref:
            where.add("rule_ref = {}", rule_ref)
        if created_from is not None:
            where.add("created >= {}", created_from)
        if created_to is not None:
            where.add("created < {}", created_to)
        return f"SELECT {_EVENT} FROM event", where

    async def list(
        self,
        size: int,
        token: str,
        *,
        trigger_ref: str = "",
        source_ref: str = "",
        rule_ref: str = "",
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        reemit_of: int | None = None,
        payload_contains: str | None = None,
    ) -> Page[Event]:
        select, where = self.listing(
            trigger_ref=trigger_ref,
            source_ref=source_ref,
            rule_ref=rule_ref,
            created_from=created_from,
            created_to=created_to,
            reemit_of=reemit_of,
            payload_contains=payload_contains,
        )
        bounded = "payload_contains" if payload_contains is not None else None
        return await self._page(select, where, token, size, Event, run=_LIST, bounded=bounded)

    async def count(self, **filters: Any) -> Count:
        """How many events match ``filters`` (those of ``listing``), at most MAX_COUNT."""
        _select, where = self.listing(**filters)
        return await self._count("event", where, search=filters.get("payload_contains") is not None)
