"""Leased hand-out of pending enforcements to executors (the ``enforcement_dispatch`` table).

Each pending enforcement has one dispatch row (kept by triggers). A watch stream claims rows
with ``FOR UPDATE SKIP LOCKED`` (so concurrent streams on any api replica never get the same
row), holding each under a lease that the stream renews while it lives. A lease that is not
renewed expires and the row is claimed again; every claim counts an attempt, and a row out of
attempts is marked exhausted and waits for an operator's retry. Leases live in PostgreSQL,
never in api memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from shared.errors import FailedPrecondition, NotFound, PermissionDenied

from . import audit
from ._db import Repo, guarded
from ._paging import Where
from .types import JSON, Actor, Delivery, DispatchState, Enforcement, ExhaustedEnforcement, columns

_ENFORCEMENT_E = columns(Enforcement, "e.")
_N_ENF = len(_ENFORCEMENT_E.split(", "))

_CLAIM = (
    """
WITH picked AS (
    SELECT enforcement FROM enforcement_dispatch
     WHERE exhausted_at IS NULL AND attempts < {max_attempts}
       AND (lease_expires_at IS NULL OR lease_expires_at <= now())
       {filters}
     ORDER BY enforcement_created, enforcement
     LIMIT {limit}
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE enforcement_dispatch d
       SET leased_by = {executor}, lease_token = {token}, lease_principal = {principal},
           lease_expires_at = now() + {lease} * interval '1 second',
           attempts = d.attempts + 1,
           last_error = CASE WHEN d.leased_by IS NOT NULL
                             THEN 'lease of ' || d.leased_by || ' expired' ELSE d.last_error END
      FROM picked p
     WHERE d.enforcement = p.enforcement
    RETURNING d.enforcement, d.enforcement_created, d.attempts, d.lease_expires_at
)
SELECT """
    + _ENFORCEMENT_E
    + """, c.attempts, c.lease_expires_at, e.traceparent
  FROM claimed c
  -- One lookup per claimed row (LIMIT 1 keeps the planner from turning it into a join, which
  -- with a backlog became a hash join over every chunk: 0.4 s a claim on 10 days of 100k
  -- rows); each row goes to its one chunk, which TimescaleDB picks at run time from `created`.
  CROSS JOIN LATERAL (
      SELECT """
    + _ENFORCEMENT_E
    + """, e.traceparent FROM enforcement e
       WHERE e.id = c.enforcement AND e.created = c.enforcement_created LIMIT 1
  ) e
 ORDER BY e.created, e.id
"""
)

_RENEW = """
UPDATE enforcement_dispatch SET lease_expires_at = now() + $2 * interval '1 second'
 WHERE lease_token = $1
RETURNING enforcement"""

_RELEASE_STREAM = """
UPDATE enforcement_dispatch
   SET leased_by = NULL, lease_token = NULL, lease_expires_at = NULL, last_error = $2
 WHERE lease_token = $1"""

# Only the principal holding a live lease may give it back (an operator's forced release
# is Dispatch.force_release). $4 NULL: authentication is off.
_RELEASE_ONE = """
UPDATE enforcement_dispatch
   SET leased_by = NULL, lease_token = NULL, lease_expires_at = NULL, last_error = $3
 WHERE enforcement = $1 AND leased_by = $2 AND ($4::text IS NULL OR lease_principal IS NOT DISTINCT FROM $4)
RETURNING enforcement"""
_HOLDER = """
SELECT lease_principal FROM enforcement_dispatch
 WHERE enforcement = $1 AND leased_by = $2 AND lease_expires_at > now()"""

_EXHAUST = """
UPDATE enforcement_dispatch
   SET exhausted_at = now(), leased_by = NULL, lease_token = NULL, lease_expires_at = NULL,
       last_error = COALESCE(CASE WHEN leased_by IS NOT NULL
                                  THEN 'lease of ' || leased_by || ' expired' END,
                             last_error, 'attempts exhausted')
 WHERE exhausted_at IS NULL AND attempts >= $1
   AND (lease_expires_at IS NULL OR lease_expires_at <= now())
RETURNING enforcement"""

_STATE = """
SELECT count(*) AS pending,
       count(*) FILTER (WHERE exhausted_at IS NULL
                          AND (lease_expires_at IS NULL OR lease_expires_at <= now())) AS waiting,
       count(*) FILTER (WHERE exhausted_at IS NOT NULL) AS exhausted_count,
       min(enforcement_created) AS oldest,
       now() AS now
  FROM enforcement_dispatch"""
_LEASES = """
SELECT leased_by, count(*) FROM enforcement_dispatch
 WHERE lease_expires_at > now() GROUP BY leased_by ORDER BY leased_by"""
_EXHAUSTED = """
SELECT enforcement, rule_ref, attempts, last_error, enforcement_created FROM enforcement_dispatch
 WHERE exhausted_at IS NOT NULL ORDER BY enforcement_created, enforcement LIMIT $1"""
# Returns what the row held before (the audit record's): the attempts and error it exhausted with.
_RETRY = """
WITH old AS (
    SELECT enforcement, attempts, last_error FROM enforcement_dispatch
     WHERE enforcement = $1 AND exhausted_at IS NOT NULL
       FOR UPDATE
)
UPDATE enforcement_dispatch d
   SET exhausted_at = NULL, attempts = 0, leased_by = NULL, lease_token = NULL, lease_expires_at = NULL
  FROM old
 WHERE d.enforcement = old.enforcement
RETURNING d.enforcement, d.rule_ref, old.attempts, old.last_error"""
# An operator's release of whatever lease an enforcement is under, whoever holds it; returns
# the holder it had (the audit record's).
_FORCE_RELEASE = """
WITH held AS (
    SELECT enforcement, leased_by, lease_principal, lease_expires_at FROM enforcement_dispatch
     WHERE enforcement = $1 AND leased_by IS NOT NULL
       FOR UPDATE
)
UPDATE enforcement_dispatch d
   SET leased_by = NULL, lease_token = NULL, lease_principal = NULL, lease_expires_at = NULL, last_error = $2
  FROM held
 WHERE d.enforcement = held.enforcement
RETURNING d.enforcement, d.rule_ref, held.leased_by, held.lease_principal, held.lease_expires_at"""
_DISPATCH_ROW = "SELECT exhausted_at FROM enforcement_dispatch WHERE enforcement = $1"
# Retention (drop_chunks) removes enforcements without firing triggers, so a pending one older
# than the retention window leaves its dispatch row behind; this forgets such orphans.
_PURGE_ORPHANS = """
DELETE FROM enforcement_dispatch d
 WHERE d.enforcement_created < now() - interval '89 days'
   AND NOT EXISTS (SELECT 1 FROM enforcement e
                    WHERE e.id = d.enforcement AND e.created = d.enforcement_created)
RETURNING d.enforcement"""
_PURGE_REQUESTS = "DELETE FROM ingest_request WHERE created < now() - $1 * interval '1 hour'"
# Outcomes of delivery attempts (0018) are kept as long as the enforcements they describe.
_PURGE_ATTEMPTS = "DELETE FROM enforcement_attempt WHERE time < now() - interval '90 days'"

_PENDING = """
SELECT attempts, leased_by, lease_expires_at, last_error, exhausted_at FROM enforcement_dispatch
 WHERE enforcement = $1"""
# The newest 200, returned oldest first: an enforcement retried for weeks keeps a bounded page.
_ATTEMPTS = """
SELECT attempt, outcome, executor_id, principal, error, time FROM (
    SELECT * FROM enforcement_attempt WHERE enforcement = $1 ORDER BY id DESC LIMIT 200
) a ORDER BY id"""
# Live leases per stream (lease token): the executors view matches them to its streams.
_LEASES_BY_TOKEN = """
SELECT lease_token, count(*) FROM enforcement_dispatch
 WHERE lease_token = ANY($1::text[]) AND lease_expires_at > now() GROUP BY lease_token"""
# Exhausted rows matching a bulk retry, oldest first, with how many match in all. Not locked
# here (a window function cannot be): the UPDATE checks exhausted_at again, so of two
# concurrent retries of one row only the first retries it, and only it is recorded.
_EXHAUSTED_MATCHING = """
SELECT enforcement, count(*) OVER () AS matched FROM enforcement_dispatch
 {where}
 ORDER BY enforcement_created, enforcement
 LIMIT {limit}"""
_RETRY_MANY = """
UPDATE enforcement_dispatch
   SET exhausted_at = NULL, attempts = 0, leased_by = NULL, lease_token = NULL, lease_expires_at = NULL
 WHERE enforcement = ANY($1::bigint[]) AND exhausted_at IS NOT NULL
RETURNING enforcement, enforcement_created"""

RETRY_BATCH = 1000
"""Most enforcements one bulk retry offers again (one audit record lists them all)."""


@dataclass(frozen=True, slots=True)
class PendingDispatch:
    """A pending enforcement's dispatch row, as the enforcement page shows it."""

    attempts: int
    leased_by: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    exhausted_at: datetime | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One recorded outcome of a delivery attempt (``enforcement_attempt``, 0018)."""

    attempt: int
    outcome: str
    executor_id: str | None
    principal: str | None
    error: str | None
    time: datetime


@dataclass(frozen=True, slots=True)
class ExhaustedFilter:
    """Which exhausted enforcements a bulk retry takes: named ones, or all matching refs and a
    creation range."""

    ids: Sequence[int] = ()
    rule_ref: str = ""
    trigger_ref: str = ""
    created_from: datetime | None = None
    created_to: datetime | None = None

    def where(self) -> Where:
        where = Where()
        where.add("exhausted_at IS NOT NULL")
        if self.ids:
            where.add("enforcement = ANY({}::bigint[])", list(self.ids))
        if self.rule_ref:
            where.add("rule_ref = {}", self.rule_ref)
        if self.trigger_ref:
            where.add("trigger_ref = {}", self.trigger_ref)
        if self.created_from is not None:
            where.add("enforcement_created >= {}", self.created_from)
        if self.created_to is not None:
            where.add("enforcement_created < {}", self.created_to)
        return where

    def described(self) -> dict[str, JSON]:
        """The filter as the audit record keeps it (only what was given)."""
        out: dict[str, JSON] = {}
        if self.rule_ref:
            out["rule_ref"] = self.rule_ref
        if self.trigger_ref:
            out["trigger_ref"] = self.trigger_ref
        if self.created_from is not None:
            out["created_from"] = self.created_from.isoformat()
        if self.created_to is not None:
            out["created_to"] = self.created_to.isoformat()
        return out


class Dispatch(Repo):
    """Claims, renews and releases leases on pending enforcements."""

    async def claim(
        self,
        *,
        executor_id: str,
        token: str,
        principal: str | None = None,
        limit: int,
        lease_s: float,
        max_attempts: int,
        rule_refs: Sequence[str] = (),
        trigger_refs: Sequence[str] = (),
    ) -> list[Delivery]:
        """Leases up to ``limit`` waiting enforcements to one stream, oldest first."""
        where = Where()
        parts = {
            "executor": where.param(executor_id),
            "token": where.param(token),
            "principal": f"{where.param(principal)}::text",
            "lease": where.param(lease_s),
            "max_attempts": where.param(max_attempts),
            # A constant, not a parameter: as a generic plan, LIMIT $n is taken for a tenth of
            # the waiting rows, and with a backlog the planner then sorted the whole dispatch
            # table instead of reading its index in order. A stream's credit is a small
            # integer, so there are a few such texts, each prepared once per connection.
            "limit": str(int(limit)),
        }
        filters = []
        if rule_refs:
            filters.append(f"AND rule_ref = ANY({where.param(list(rule_refs))}::text[])")
        if trigger_refs:
            filters.append(f"AND trigger_ref = ANY({where.param(list(trigger_refs))}::text[])")
        sql = _CLAIM.format(filters=" ".join(filters), **parts)
        rows = await self._fetch(sql, *where.args)
        return [
            Delivery(Enforcement(*list(r.values())[:_N_ENF]), r["attempts"], r["lease_expires_at"], r["traceparent"])
            for r in rows
        ]

    async def renew(self, token: str, lease_s: float) -> set[int]:
        """Extends every lease of a stream; returns the enforcements it still holds."""
        return {r["enforcement"] for r in await self._fetch(_RENEW, token, lease_s)}

    async def release_stream(self, token: str, reason: str) -> None:
        """Gives back everything a closing stream holds, so other executors get it at once."""
        await self._execute(_RELEASE_STREAM, token, reason)

    async def release(self, enforcement: int, executor_id: str, error: str, principal: str | None = None) -> bool:
        """Gives back one enforcement held by ``executor_id`` of ``principal``; False when it
        held none. PermissionDenied when another principal's stream holds it under that id."""
        if await self._fetchval(_RELEASE_ONE, enforcement, executor_id, error, principal) is not None:
            return True
        if principal is not None:
            holder = await self._fetchrow(_HOLDER, enforcement, executor_id)
            if holder is not None and holder["lease_principal"] not in (None, principal):
                raise PermissionDenied(
                    f"enforcement {enforcement} is leased to another principal's executor {executor_id}; "
                    "only its holder (or an operator, forcing) may release it"
                )
        return False

    async def exhaust(self, max_attempts: int) -> list[int]:
        """Marks enforcements out of attempts (and not under a live lease) as exhausted."""
        return [r["enforcement"] for r in await self._fetch(_EXHAUST, max_attempts)]

    async def state(self, exhausted_limit: int) -> DispatchState:
        row = await self._fetchrow(_STATE)
        assert row is not None
        leases = [(r[0], r[1]) for r in await self._fetch(_LEASES)]
        exhausted = [ExhaustedEnforcement(*r) for r in await self._fetch(_EXHAUSTED, exhausted_limit)]
        return DispatchState(
            pending=row["pending"],
            waiting=row["waiting"],
            oldest_pending_created=row["oldest"],
            now=row["now"],
            leases=leases,
            exhausted=exhausted,
            exhausted_count=row["exhausted_count"],
        )

    async def retry(self, enforcement: int, actor: Actor | None = None) -> None:
        """Offers an exhausted enforcement again with its attempts reset. With an ``actor``, an
        audit record of it (the attempts and error it had) commits with it."""
        async with guarded(), self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_RETRY, enforcement)
            if row is not None:
                if actor:
                    change = {
                        "enforcement": enforcement,
                        "rule_ref": row["rule_ref"],
                        "attempts": row["attempts"],
                        "last_error": row["last_error"],
                    }
                    await audit.record(conn, actor, "enforcement", enforcement, None, change)
                return
        row = await self._fetchrow(_DISPATCH_ROW, enforcement)
        if row is not None:
            raise FailedPrecondition(
                f"enforcement {enforcement} has not exhausted its attempts; it is still being offered",
                reason="NOT_EXHAUSTED",
            )
        raise NotFound(f"enforcement {enforcement} is not pending (unknown or already resolved)")

    async def force_release(self, enforcement: int, actor: Actor, reason: str) -> bool:
        """An operator's release of one enforcement's lease, whichever executor and principal
        hold it, recorded in the audit trail in the same transaction (the holder it had and
        ``reason``, which also becomes the row's last_error). False, and nothing recorded,
        when it is under no lease."""
        async with guarded(), self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_FORCE_RELEASE, enforcement, reason)
            if row is None:
                return False
            expires = row["lease_expires_at"]
            change = {
                "enforcement": enforcement,
                "rule_ref": row["rule_ref"],
                "reason": reason,
                "executor_id": row["leased_by"],
                "lease_principal": row["lease_principal"],
                "lease_expires_at": expires.isoformat() if expires is not None else None,
            }
            await audit.record(conn, actor, "enforcement", enforcement, None, change)
        return True

    async def vacuum(self) -> None:
        """Clears the dead rows of the dispatch table (every row is inserted and deleted within
        seconds). Left to autovacuum, which visits a database about once a minute, tens of
        thousands of dead index entries pile up at the head of the claim index and every claim
        walks through them: claims slow down just when a backlog needs them. SKIP_LOCKED: if
        another replica is vacuuming it, this round skips."""
        await self._execute("VACUUM (SKIP_LOCKED) enforcement_dispatch")

    async def purge_orphans(self) -> list[int]:
        """Forgets dispatch rows whose enforcement retention dropped (see _PURGE_ORPHANS), and
        attempt outcomes as old as the enforcements retention drops."""
        orphans = [r["enforcement"] for r in await self._fetch(_PURGE_ORPHANS)]
        await self._execute(_PURGE_ATTEMPTS)
        return orphans

    async def pending(self, enforcement: int) -> PendingDispatch | None:
        """The enforcement's dispatch row; None when it has none (resolved, or unknown)."""
        row = await self._fetchrow(_PENDING, enforcement)
        return PendingDispatch(*row.values()) if row is not None else None

    async def attempts(self, enforcement: int) -> list[Attempt]:
        """Recorded outcomes of its delivery attempts, oldest first (the newest 200)."""
        return [Attempt(*r.values()) for r in await self._fetch(_ATTEMPTS, enforcement)]

    async def leases_by_token(self, tokens: Sequence[str]) -> dict[str, int]:
        """Live leases held by each of these streams (lease tokens); absent: none."""
        if not tokens:
            return {}
        return {r[0]: r[1] for r in await self._fetch(_LEASES_BY_TOKEN, list(tokens))}

    async def retry_many(
        self, which: ExhaustedFilter, actor: Actor | None = None, validate_only: bool = False
    ) -> tuple[list[int], int]:
        """Offers exhausted enforcements again (the oldest ``RETRY_BATCH`` matching ``which``),
        with one audit record naming them all, committed with the change. Returns the ids
        retried (oldest first) and how many matched in all. ``validate_only``: the same answer,
        nothing changed or recorded."""
        where = which.where()
        sql = _EXHAUSTED_MATCHING.format(where=where.sql(), limit=RETRY_BATCH)
        async with guarded(), self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(sql, *where.args)
            matched = int(rows[0]["matched"]) if rows else 0
            ids = [int(r["enforcement"]) for r in rows]
            if validate_only or not ids:
                return ids, matched
            done = await conn.fetch(_RETRY_MANY, ids)
            retried = [int(r["enforcement"]) for r in sorted(done, key=lambda r: (r[1], r[0]))]
            if actor and retried:
                change: dict[str, JSON] = {"enforcements": list(retried), "count": len(retried), "matched": matched}
                if described := which.described():
                    change["filter"] = described
                await audit.record(conn, actor, "enforcement", None, None, change)
        return retried, matched

    async def purge_requests(self, older_than_h: float) -> int:
        """Forgets idempotency keys older than ``older_than_h`` hours."""
        status = await self._execute(_PURGE_REQUESTS, older_than_h)
        return int(status.split()[-1])
