"""Enforcements: created pending, resolved exactly once.

Resolution is one conditional statement (``... AND status = 'created'``), normally one round
trip (see ``_RESOLVE_PROCESSED_MANY``). For PROCESSED it
also share-locks the rule and requires it enabled with an action, and inserts the execution
in the same statement: a rule disabled (or deleted) before the resolution commits can never
get an execution, and a concurrent disable waits for the resolution instead. The partial
unique index on execution(enforcement) backs this up. When the statement changes nothing, a
second read tells a retry (same outcome: answer with the stored rows) from a conflict.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import logging
import random
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.api import matching
from services.api.encoded import Measure
from shared.errors import Aborted, DomainError, FailedPrecondition, InvalidArgument, NotFound
from shared.limits import MAX_CREATE_RESPONSE_BYTES

from . import audit
from ._chunks import ById
from ._db import CUSTOM_PLAN, ReadRoute, guarded, is_row
from ._derive import derive
from ._paging import Count, Keys, Paged, Where, json_as_text
from .types import JSON, Actor, Enforcement, Event, Execution, Page, Resolution, columns

_ENFORCEMENT = columns(Enforcement)
_ENFORCEMENT_E = columns(Enforcement, "e.")
_EXECUTION = columns(Execution)
_EXECUTION_X = columns(Execution, "x.")
_N_ENF = len(_ENFORCEMENT.split(", "))
_LIST = json_as_text(Enforcement, "enforcement", ("config", "payload", "conditions"))

_log = logging.getLogger(__name__)
_DEADLOCK_RETRIES = 4
_PER_ROW_CONCURRENCY = 4
"""Per-row resolutions of one call run on at most this many connections at once."""
_PER_ROW_TRIES = 3
"""Times the per-row path looks a pending row up and updates it (see ``_resolve_one``)."""
_RECENT = "/* recent */"
"""Where a set-wise resolution gets its lower bound on ``created`` (``_recent``)."""

# Only the principal whose stream holds a live lease may resolve a leased enforcement (its
# executor decided it); unleased work anyone with the role may. $2 NULL: an operator, or
# authentication off.
_HOLDS = (
    "($2::text IS NULL OR d.lease_expires_at IS NULL OR d.lease_expires_at <= now()"
    " OR d.lease_principal IS NOT DISTINCT FROM $2)"
)
_HELD_BY_ANOTHER = """
SELECT 1 FROM enforcement_dispatch d
 WHERE d.enforcement = $1 AND d.lease_expires_at > now() AND d.lease_principal IS DISTINCT FROM $2"""

# The dispatch row exists exactly while the enforcement is pending (triggers keep it so) and
# carries `created`. The per-row path (``_resolve_one``) finds the pending row through it, then
# updates it by (id, created, rule_ref) under custom plans (``CUSTOM_PLAN``): on TimescaleDB
# an UPDATE decompresses, before it runs, every compressed batch its conditions cannot rule
# out, and only constants rule batches out (a parameter of a generic plan, or a value from a
# join, does not). With constants the chunk is chosen at planning, and the segment (rule_ref)
# and the batch's time range leave one batch to decompress.
_TARGET_DISPATCH = f"""
SELECT d.enforcement_created AS created, d.rule_ref FROM enforcement_dispatch d WHERE d.enforcement = $1 AND {_HOLDS}
"""
_TARGET_RULE = (
    "SELECT e.rule FROM enforcement e WHERE e.id = $1 AND e.created = $2 AND e.rule_ref = $3 AND e.status = 'created'"
)

_RESOLVE_PROCESSED = f"""
WITH live_rule AS (
    SELECT r.id, r.action_ref FROM rule r
     WHERE r.id = $3 AND r.enabled AND r.action_ref IS NOT NULL
       FOR SHARE
), resolved AS (
    UPDATE enforcement e SET status = 'processed', resolved_at = now()
      FROM live_rule l
     WHERE e.id = $1 AND e.created = $2 AND e.rule_ref = $4 AND e.status = 'created' AND e.rule = l.id
    RETURNING {_ENFORCEMENT_E}
), x AS (
    INSERT INTO execution (action_ref, config, enforcement)
    SELECT l.action_ref, COALESCE(r.config, '{{}}'::jsonb), r.id FROM resolved r, live_rule l
    RETURNING {_EXECUTION}
)
SELECT r.*, {_EXECUTION_X} FROM resolved r, x
"""

# The same resolutions in one round trip, for one id or many (ResolveEnforcements): the
# pending rows found through their dispatch rows and the rule through the dispatch row's
# rule_ref (FOR SHARE OF the rule, as above). They change nothing for a renamed rule, a row
# with nothing to resolve, or (TimescaleDB) a row that may lie in a compressed chunk: the
# per-row path (``_resolve_one``) then decides or explains each of those.
#
# On TimescaleDB the UPDATE names only the chunks newer than the newest compressed one
# (``_RECENT``, see ``_recent``): its join cannot tell TimescaleDB which compressed batches it
# needs, so with compressed chunks in its plan it would check every batch of every one of them
# (4-5 ms a call on 90 days of 600k enforcements) and decompress every batch holding a pending
# row (1.4M rows and 15 s a call, then refused, when an executor came back after a week).
_RESOLVE_PROCESSED_MANY = f"""
WITH live_rule AS (
    SELECT d.enforcement, d.enforcement_created AS created, r.id, r.action_ref
      FROM enforcement_dispatch d
      JOIN rule r ON r.ref = d.rule_ref
     WHERE d.enforcement = ANY($1::bigint[]) AND r.enabled AND r.action_ref IS NOT NULL AND {_HOLDS}
     ORDER BY d.enforcement
       FOR SHARE OF r
), resolved AS (
    UPDATE enforcement e SET status = 'processed', resolved_at = now()
      FROM live_rule l
     WHERE e.id = l.enforcement AND e.created = l.created AND e.status = 'created' AND e.rule = l.id {_RECENT}
    RETURNING {_ENFORCEMENT_E}
), x AS (
    INSERT INTO execution (action_ref, config, enforcement)
    SELECT l.action_ref, COALESCE(r.config, '{{}}'::jsonb), r.id
      FROM resolved r JOIN live_rule l ON l.enforcement = r.id
    RETURNING {_EXECUTION}
)
SELECT r.*, {_EXECUTION_X} FROM resolved r JOIN x ON x.enforcement = r.id
"""

_RESOLVE_DISABLED_MANY = f"""
UPDATE enforcement e SET status = 'disabled', resolved_at = now()
  FROM enforcement_dispatch d
 WHERE d.enforcement = ANY($1::bigint[]) AND e.id = d.enforcement
   AND e.created = d.enforcement_created AND e.status = 'created' AND {_HOLDS} {_RECENT}
RETURNING {_ENFORCEMENT_E}
"""

_RESOLVE_DISABLED = f"""
UPDATE enforcement e SET status = 'disabled', resolved_at = now()
 WHERE e.id = $1 AND e.created = $2 AND e.rule_ref = $3 AND e.status = 'created'
RETURNING {_ENFORCEMENT_E}
"""

_STORED = f"""
SELECT {_ENFORCEMENT_E}, {_EXECUTION_X},
       r.id IS NOT NULL AS rule_exists, COALESCE(r.enabled, false) AS rule_enabled,
       r.action_ref AS rule_action_ref
  FROM enforcement e
  LEFT JOIN execution x ON x.enforcement = e.id
  LEFT JOIN rule r ON r.id = e.rule
 WHERE e.id = $1
"""

_RULE = "SELECT id, ref, trigger_ref, action_params, conditions, condition FROM rule WHERE ref = $1"
_EVENT_CREATED = "SELECT created FROM event WHERE id = $1"
_EXISTING_FOR_EVENT = f"SELECT {_ENFORCEMENT} FROM enforcement WHERE event = $1 AND rule = $2 LIMIT 1"
_REQUEST = """
SELECT fingerprint, entity_id, entity_created FROM ingest_request
 WHERE kind = 'enforcement' AND request_id = $1"""
_INSERT = f"""
INSERT INTO enforcement (rule, rule_ref, trigger_ref, config, event, payload, condition, conditions)
VALUES ($1, $2, $3, $4, $5, $6, $7::enforcement_condition, $8)
RETURNING {_ENFORCEMENT}"""
_RECORD_REQUEST = """
INSERT INTO ingest_request (kind, request_id, fingerprint, entity_id, entity_created)
VALUES ('enforcement', $1, $2, $3, $4)"""
_BY_ID_CREATED = f"SELECT {_ENFORCEMENT} FROM enforcement WHERE id = $1 AND created = $2"
# ReplayRule with fire: the same per-(rule, event) locks as ``create`` takes, in event order.
_FIRE_RULE = "SELECT id, ref, trigger_ref, enabled, conditions, condition FROM rule WHERE id = $1 FOR SHARE"
_FIRE_LOCK = """
SELECT count(pg_advisory_xact_lock($1::int, (e % 2147483648)::int))
  FROM (SELECT DISTINCT e FROM unnest($2::bigint[]) AS e ORDER BY e) AS x"""
_FIRE_EXISTING = "SELECT event, id FROM enforcement WHERE rule = $1 AND event = ANY($2::bigint[])"
_FIRE_INSERT = f"""
INSERT INTO enforcement (rule, rule_ref, trigger_ref, config, event, payload, condition, conditions)
SELECT $1, $2, $3, u.c::jsonb, u.e, u.p::jsonb, $4::enforcement_condition, $5::jsonb
  FROM unnest($6::text[], $7::bigint[], $8::text[]) AS u(c, e, p)
RETURNING {_ENFORCEMENT}"""


def _execution(row: asyncpg.Record) -> Execution | None:
    values = list(row.values())[_N_ENF : _N_ENF + len(_EXECUTION.split(", "))]
    return None if values[0] is None else Execution(*values)


def _recent(template: str, compressed_until: datetime | None) -> str:
    """A set-wise resolution that leaves alone the rows stamped before ``compressed_until``.

    The bound is a constant in the statement's text, not a parameter: TimescaleDB drops chunks
    from an UPDATE's plan, and chooses the compressed batches to decompress, from constants
    only, and the api's statements run as generic plans. The value comes from TimescaleDB's
    catalog, rendered from a datetime (digits and separators); it moves when a chunk is
    compressed, about once a day, and each new text is prepared once per connection.
    """
    if compressed_until is None:
        return template.replace(_RECENT, "")
    return template.replace(_RECENT, f"AND e.created >= '{compressed_until.isoformat()}'::timestamptz")


class Enforcements(Paged):
    """Stores, reads and resolves enforcements."""

    def __init__(self, pool: asyncpg.Pool, keys: Keys | None = None, reads: ReadRoute | None = None) -> None:
        super().__init__(pool, keys, reads)
        self.by_id = ById(pool, "enforcement", _ENFORCEMENT)

    async def create(
        self,
        *,
        rule_ref: str,
        event: int | None,
        payload: dict[str, JSON],
        config: dict[str, JSON] | None,
        request_id: str | None,
    ) -> tuple[Enforcement, bool]:
        """Records an enforcement; returns it and whether it answers an earlier request."""
        fp = hashlib.sha256(json.dumps([rule_ref, event, payload, config], sort_keys=True).encode()).hexdigest()
        async with guarded(), self._pool.acquire() as conn, conn.transaction():
            if request_id:
                # Serialises requests with the same key; the loser sees the winner's row.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 1))", request_id)
                stored = await conn.fetchrow(_REQUEST, request_id)
                if stored is not None:
                    if stored["fingerprint"] != fp:
                        raise InvalidArgument.one(
                            "request_id",
                            "was already used for a different enforcement (keys are kept at least 24 hours)",
                        )
                    row = await conn.fetchrow(_BY_ID_CREATED, stored["entity_id"], stored["entity_created"])
                    if row is None:
                        raise NotFound(f"enforcement {stored['entity_id']} of request {request_id} no longer exists")
                    return Enforcement(*row), True
            rule = await conn.fetchrow(_RULE, rule_ref)
            if rule is None:
                raise NotFound(f"rule {rule_ref} not found")
            if event is not None:
                # At most one enforcement per (rule, event): a hypertable cannot hold a unique
                # index without `created`, so concurrent creators take turns on a lock instead.
                await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", rule["id"] % 2**31, event % 2**31)
                existing = await conn.fetchrow(_EXISTING_FOR_EVENT, event, rule["id"])
                if existing is not None:
                    found = Enforcement(*existing)
                    if request_id:
                        # Remember the key too, so that its next retry is answered by key.
                        await conn.execute(_RECORD_REQUEST, request_id, fp, found.id, found.created)
                    return found, True
            if config is None:
                created = await conn.fetchval(_EVENT_CREATED, event) if event is not None else None
                context = matching.template_context(
                    event_id=event,
                    trigger_ref=rule["trigger_ref"],
                    created_iso=created.isoformat() if created else None,
                    payload=payload,
                    rule_ref=rule_ref,
                )
                measure = Measure()
                config, _ = derive(
                    dict(rule),
                    rule["trigger_ref"],
                    payload,
                    context,
                    matching.Budget(MAX_CREATE_RESPONSE_BYTES),
                    measure,
                    "payload",
                )
            row = await conn.fetchrow(
                _INSERT,
                rule["id"],
                rule_ref,
                rule["trigger_ref"],
                config,
                event,
                payload,
                rule["condition"],
                rule["conditions"],
            )
            assert row is not None
            enforcement = Enforcement(*row)
            if request_id:
                await conn.execute(_RECORD_REQUEST, request_id, fp, enforcement.id, enforcement.created)
            return enforcement, False

    async def fire(
        self, rule_id: int, matched: Sequence[tuple[Event, dict[str, JSON]]], actor: Actor
    ) -> tuple[dict[int, tuple[int, bool]], list[Enforcement]]:
        """Creates the enforcements of ``rule_id`` for the matched events (each with its
        rendered config) that it does not have yet, in one transaction with one audit record.

        Returns, per event id, the enforcement id and whether it already existed, and the new
        enforcements. FailedPrecondition when the rule is gone or disabled.
        """
        ids = [event.id for event, _ in matched]
        async with guarded(), self._pool.acquire() as conn, conn.transaction():
            rule = await conn.fetchrow(_FIRE_RULE, rule_id)
            if rule is None or not rule["enabled"]:
                raise FailedPrecondition(f"rule {rule_id} was deleted or disabled during the replay")
            await conn.fetchval(_FIRE_LOCK, rule_id % 2**31, ids)
            out = {r["event"]: (r["id"], True) for r in await conn.fetch(_FIRE_EXISTING, rule_id, ids)}
            fresh = [(event, config) for event, config in matched if event.id not in out]
            created: list[Enforcement] = []
            if fresh:
                rows = await conn.fetch(
                    _FIRE_INSERT,
                    rule_id,
                    rule["ref"],
                    rule["trigger_ref"],
                    rule["condition"],
                    rule["conditions"],
                    [json.dumps(config) for _, config in fresh],
                    [event.id for event, _ in fresh],
                    [json.dumps(event.payload) for event, _ in fresh],
                )
                created = [Enforcement(*r) for r in rows]
                for e in created:
                    assert e.event is not None
                    out[e.event] = (e.id, False)
                await audit.record(
                    conn,
                    actor,
                    "rule",
                    rule_id,
                    rule["ref"],
                    {"fired": {"events": [e.event for e in created], "enforcements": [e.id for e in created]}},
                )
        return out, created

    async def get(self, id_: int, *, fresh: bool = False) -> Enforcement:
        """The enforcement ``id_``: on the read route (one missing there is asked of the
        primary; its status may be older by the route's lag), or with ``fresh`` on the primary."""
        if fresh:
            row = await self.by_id.fetchrow(id_)
        else:
            row = await self._reads.run(lambda pool: self.by_id.fetchrow(id_, pool), found=is_row)
        if row is None:
            raise NotFound(f"enforcement {id_} not found")
        return Enforcement(*row)

    def listing(
        self,
        *,
        rule_ref: str = "",
        event: int | None = None,
        status: str = "",
        trigger_ref: str = "",
        created_from: datetime | None = None,
        created_to: datetime | None = None,
    ) -> tuple[str, Where]:
        """The SELECT and filters of the list (what its page tokens are bound to)."""
        where = Where()
        if rule_ref:
            where.add("rule_ref = {}", rule_ref)
        if event is not None:
            where.add("event = {}", event)
        if status:
            where.add("status = {}::enforcement_status", status)
        if trigger_ref:
            where.add("trigger_ref = {}", trigger_ref)
        if created_from is not None:
            where.add("created >= {}", created_from)
        if created_to is not None:
            where.add("created < {}", created_to)
        return f"SELECT {_ENFORCEMENT} FROM enforcement", where

    async def list(
        self,
        size: int,
        token: str,
        *,
        rule_ref: str = "",
        event: int | None = None,
        status: str = "",
        trigger_ref: str = "",
        created_from: datetime | None = None,
        created_to: datetime | None = None,
    ) -> Page[Enforcement]:
        select, where = self.listing(
            rule_ref=rule_ref,
            event=event,
            status=status,
            trigger_ref=trigger_ref,
            created_from=created_from,
            created_to=created_to,
        )
        return await self._page(select, where, token, size, Enforcement, run=_LIST)

    async def count(self, **filters: Any) -> Count:
        """How many enforcements match ``filters`` (those of ``listing``), at most MAX_COUNT."""
        _select, where = self.listing(**filters)
        return await self._count("enforcement", where)

    async def resolve(self, id_: int, status: str, holder: str | None = None) -> Resolution:
        """Resolves a pending enforcement as 'processed' or 'disabled' (see the module doc)."""
        (result,) = await self.resolve_many([(id_, status)], holder)
        if isinstance(result, DomainError):
            raise result
        return result

    async def _resolve_one(self, id_: int, status: str, holder: str | None) -> Resolution:
        """The per-row path: finds the pending row through its dispatch row, then updates it
        by (id, created, rule_ref) under custom plans (see ``_TARGET_DISPATCH``).

        The lookup or the UPDATE can find nothing although the row is pending (its dispatch row
        says so): TimescaleDB moves a compressed batch's rows out when it decompresses it, and
        when another transaction did so for the same batch while this statement ran, the moved
        rows are not in its snapshot. A next statement has a new snapshot, so the lookup and the
        UPDATE are tried again."""
        async with guarded(), self._pool.acquire() as conn, conn.transaction():
            await conn.execute(CUSTOM_PLAN)
            target = await conn.fetchrow(_TARGET_DISPATCH, id_, holder)
            created, rule_ref = target.values() if target is not None else (None, None)
            for _ in range(_PER_ROW_TRIES if target is not None else 0):
                rule = await conn.fetchrow(_TARGET_RULE, id_, created, rule_ref)
                if rule is None:
                    continue  # not in this statement's snapshot either (see above)
                if status == "processed" and rule["rule"] is None:
                    break
                if status == "processed":
                    row = await conn.fetchrow(_RESOLVE_PROCESSED, id_, created, rule["rule"], rule_ref)
                    if row is not None:
                        return Resolution(Enforcement(*list(row.values())[:_N_ENF]), _execution(row))
                else:
                    row = await conn.fetchrow(_RESOLVE_DISABLED, id_, created, rule_ref)
                    if row is not None:
                        return Resolution(Enforcement(*row), None)
        return await self._explain_unresolved(id_, status, holder)

    async def resolve_many(
        self, decisions: Sequence[tuple[int, str]], holder: str | None = None
    ) -> Sequence[Resolution | DomainError]:
        """Resolves each (id, 'processed' | 'disabled'), set-wise where it can, the rest one by
        one. Per decision: its Resolution, or why it was refused (NotFound, FailedPrecondition).
        Any other failure (the database is down) fails the whole call; what was
        resolved before it stays resolved, and a retry answers it as replayed. ``holder``: the
        principal resolving; a pending enforcement under another principal's live lease is
        refused (None: no such check, for operators)."""
        done: dict[int, Resolution] = {}
        compressed_until = await self.by_id.finder.compressed_until()
        for status, sql in (("processed", _RESOLVE_PROCESSED_MANY), ("disabled", _RESOLVE_DISABLED_MANY)):
            ids = sorted(i for i, s in decisions if s == status)
            if not ids:
                continue
            for row in await self._set_wise(_recent(sql, compressed_until), ids, holder):
                enforcement = Enforcement(*list(row.values())[:_N_ENF])
                done[enforcement.id] = Resolution(enforcement, _execution(row) if status == "processed" else None)
        # The rest one by one, a few at a time (rows in compressed chunks cost a plan and a
        # batch each); a second decision for the same id waits for the first.
        rest: dict[int, Resolution | DomainError] = {}
        first: builtins.list[tuple[int, int, str]] = []
        again: builtins.list[tuple[int, int, str]] = []
        taken: set[int] = set()
        for k, (id_, status) in enumerate(decisions):
            if id_ not in done:
                (again if id_ in taken else first).append((k, id_, status))
                taken.add(id_)
        slots = asyncio.Semaphore(_PER_ROW_CONCURRENCY)

        async def one(k: int, id_: int, status: str) -> None:
            async with slots:
                try:
                    rest[k] = await self._resolve_one(id_, status, holder)
                except (NotFound, FailedPrecondition) as exc:
                    rest[k] = exc

        await asyncio.gather(*(one(*d) for d in first))
        for d in again:
            await one(*d)
        return [done[id_] if id_ in done else rest[k] for k, (id_, _) in enumerate(decisions)]

    async def _set_wise(self, sql: str, *args: Any) -> builtins.list[asyncpg.Record]:
        """A set-wise resolution, run again when PostgreSQL broke a deadlock by aborting it.

        Two batches that share enforcements (an operator's and an executor's, or overlapping
        retries) lock their rows in whatever order their plans visit them; PostgreSQL resolves
        the cycle by aborting one statement, which changed nothing, so running it again is safe.
        A statement TimescaleDB refused for the rows it would have had to decompress (a chunk
        compressed since the bound of ``_recent`` was read) changed nothing either: it answers
        no rows, and the per-row path takes every decision.
        """
        for attempt in range(_DEADLOCK_RETRIES):
            try:
                async with guarded():
                    try:
                        return await self._pool.fetch(sql, *args)
                    except asyncpg.ConfigurationLimitExceededError as exc:
                        _log.info("set-wise resolution refused (%s); resolving row by row", exc)
                        return []
            except Aborted:
                if attempt == _DEADLOCK_RETRIES - 1:
                    raise
                await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))  # let the other finish first
        raise AssertionError("unreachable")

    async def _explain_unresolved(self, id_: int, status: str, holder: str | None = None) -> Resolution:
        row = await self._fetchrow(_STORED, id_)
        if row is None:
            raise NotFound(f"enforcement {id_} not found")
        stored = Enforcement(*list(row.values())[:_N_ENF])
        if stored.status == status:
            return Resolution(stored, _execution(row), replayed=True)
        if stored.status != "created":
            raise FailedPrecondition(
                f"enforcement {id_} is already {stored.status}; it cannot become {status}",
                reason="ALREADY_RESOLVED",
            )
        if holder is not None and await self._fetchval(_HELD_BY_ANOTHER, id_, holder):
            raise FailedPrecondition(
                f"enforcement {id_} is leased to another principal's executor; only its holder may resolve it",
                reason="LEASED_BY_ANOTHER",
            )
        # Still pending, so PROCESSED was refused because of the rule.
        if not row["rule_exists"]:
            why = f"rule {stored.rule_ref} was deleted"
        elif not row["rule_enabled"]:
            why = f"rule {stored.rule_ref} is disabled"
        elif row["rule_action_ref"] is None:
            why = f"rule {stored.rule_ref} has no action"
        else:
            why = "it changed concurrently; retry"
        raise FailedPrecondition(
            f"enforcement {id_} cannot be processed: {why}; resolve it as DISABLED", reason="RULE_NOT_ENABLED"
        )
