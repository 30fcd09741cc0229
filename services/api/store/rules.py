"""Triggers and rules.

Every change takes an optional ``Actor``: given one (the servicers always do), the row's
``updated_by`` names its principal and an audit record of the change is written in the same
transaction (``audit.py``). Without one, ``updated_by`` is unset and nothing is recorded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg

from services.api.conditions import count_nodes
from shared.errors import AlreadyExists, FailedPrecondition, NotFound
from shared.limits import MAX_CONDITIONS_PER_TRIGGER, MAX_RULES_PER_TRIGGER

from . import audit
from ._db import Connection, guarded
from ._paging import Paged, Where
from .types import JSON, Actor, Page, Rule, Trigger, Webhook, columns

_TRIGGER = columns(Trigger)
_RULE = columns(Rule)

_INSERT_TRIGGER = f"""
INSERT INTO trigger (ref, label, description, param_schema, out_schema, updated_by, webhook_enabled, webhook_secret,
                     schema_mode)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {_TRIGGER}"""
_TRIGGER_BY_ID = f"SELECT {_TRIGGER} FROM trigger WHERE id = $1"
_TRIGGER_BY_REF = f"SELECT {_TRIGGER} FROM trigger WHERE ref = $1"
_LOCK_TRIGGER_BY_ID = f"{_TRIGGER_BY_ID} FOR UPDATE"
_LOCK_TRIGGER_BY_REF = f"{_TRIGGER_BY_REF} FOR UPDATE"
_ROTATE_KEY = f"""
UPDATE trigger SET webhook_key = DEFAULT, updated = now(), updated_by = $2 WHERE id = $1 RETURNING {_TRIGGER}"""
_WEBHOOK = "SELECT id, ref, webhook_enabled, webhook_secret FROM trigger WHERE webhook_key = $1"
_DELETE_TRIGGER_BY_ID = "DELETE FROM trigger WHERE id = $1 RETURNING id, ref"
_DELETE_TRIGGER_BY_REF = "DELETE FROM trigger WHERE ref = $1 RETURNING id, ref"

_INSERT_RULE = f"""
INSERT INTO rule (ref, label, description, trigger, trigger_ref, action_ref, action_params,
                  conditions, condition, enabled, updated_by, backstop, condition_nodes)
SELECT $1, $2, $3, t.id, t.ref, $5, $6, $7, $8::enforcement_condition, $9, $10, $11, $12
FROM trigger t WHERE t.ref = $4
RETURNING {_RULE}"""
# Rules of one trigger are counted under a lock of that trigger, so that concurrent creators
# cannot pass MAX_RULES_PER_TRIGGER together.
_LOCK_TRIGGER_RULES = "SELECT pg_advisory_xact_lock(hashtextextended($1, 2))"
_TRIGGER_LOAD = """
SELECT count(*) AS rules, coalesce(sum(condition_nodes), 0) AS conditions
  FROM rule WHERE trigger_ref = $1 AND id IS DISTINCT FROM $2"""
_RULE_TRIGGER_BY_ID = "SELECT id, trigger_ref FROM rule WHERE id = $1"
_RULE_TRIGGER_BY_REF = "SELECT id, trigger_ref FROM rule WHERE ref = $1"
_RULE_BY_ID = f"SELECT {_RULE} FROM rule WHERE id = $1"
_TRIGGERS_OF_RULES = "SELECT id, trigger_ref FROM rule WHERE id = ANY($1::bigint[])"
_RULE_BY_REF = f"SELECT {_RULE} FROM rule WHERE ref = $1"
# The rule as it was, locked until the update commits: the audit record's "old" values.
_LOCK_RULE_BY_ID = f"{_RULE_BY_ID} FOR UPDATE"
_LOCK_RULE_BY_REF = f"{_RULE_BY_REF} FOR UPDATE"
_DELETE_RULE_BY_ID = "DELETE FROM rule WHERE id = $1 RETURNING id, ref"
_DELETE_RULE_BY_REF = "DELETE FROM rule WHERE ref = $1 RETURNING id, ref"

# What the audit record of a create holds.
_TRIGGER_FIELDS = (
    "ref",
    "label",
    "description",
    "param_schema",
    "out_schema",
    "schema_mode",
    "webhook_enabled",
    "webhook_signed",
)
_RULE_FIELDS = (
    "ref",
    "label",
    "description",
    "trigger_ref",
    "action_ref",
    "action_params",
    "conditions",
    "condition",
    "enabled",
    "backstop",
)

# Columns UpdateTrigger may change. The secret is audited as set or removed, never its value.
TRIGGER_UPDATABLE = (
    "label",
    "description",
    "webhook_enabled",
    "webhook_secret",
    "param_schema",
    "out_schema",
    "schema_mode",
)
SCHEMA_SETTINGS = frozenset({"out_schema", "schema_mode"})
"""Changing either gives the trigger's schema a new version (ingest compiles it again)."""

# Columns UpdateRule may change, with the SQL cast each needs.
UPDATABLE = {
    "label": "",
    "description": "",
    "action_ref": "",
    "action_params": "",
    "conditions": "",
    "condition": "::enforcement_condition",
    "enabled": "",
    "backstop": "",
}


async def _check_trigger_load(conn: Connection, trigger_ref: str, rule_id: int | None, conditions: int) -> None:
    """Refuses a rule (new, or ``rule_id`` changed) that would give its trigger more rules or
    conditions than MAX_RULES_PER_TRIGGER and MAX_CONDITIONS_PER_TRIGGER: every event of the
    trigger is matched against all of them, so these bound what one event costs. Locks the
    trigger's rules until the transaction ends, so concurrent writers cannot pass together."""
    await conn.execute(_LOCK_TRIGGER_RULES, trigger_ref)
    load = await conn.fetchrow(_TRIGGER_LOAD, trigger_ref, rule_id)
    assert load is not None
    if rule_id is None and load["rules"] >= MAX_RULES_PER_TRIGGER:
        raise FailedPrecondition(
            f"trigger {trigger_ref} has {MAX_RULES_PER_TRIGGER} rules, the most one trigger may have "
            "(each event is matched against all of them); delete one or use another trigger",
            reason="TOO_MANY_RULES",
        )
    if load["conditions"] + conditions > MAX_CONDITIONS_PER_TRIGGER:
        raise FailedPrecondition(
            f"the rules of trigger {trigger_ref} would have {load['conditions'] + conditions} conditions in all; "
            f"at most {MAX_CONDITIONS_PER_TRIGGER} (each event is matched against all of them)",
            reason="TOO_MANY_CONDITIONS",
        )


def _trigger(row: asyncpg.Record | None, key: int | str) -> Trigger:
    if row is None:
        raise NotFound(f"trigger {key} not found")
    return Trigger(*row)


async def _locked_trigger(conn: Connection, key: int | str) -> Trigger:
    """The trigger as it is, locked until the transaction ends: an audit record's old values."""
    sql = _LOCK_TRIGGER_BY_ID if isinstance(key, int) else _LOCK_TRIGGER_BY_REF
    return _trigger(await conn.fetchrow(sql, key), key)


def _rule(row: asyncpg.Record | None, key: int | str) -> Rule:
    if row is None:
        raise NotFound(f"rule {key} not found")
    return Rule(*row)


def _by(actor: Actor | None) -> str | None:
    return actor.principal if actor else None


class Rules(Paged):
    """Triggers and the rules that watch them."""

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        """A connection in a transaction: the change and its audit record commit together."""
        async with guarded(), self._pool.acquire() as conn, conn.transaction():
            yield conn

    async def create_trigger(
        self,
        ref: str,
        label: str,
        description: str,
        param_schema: JSON | None,
        out_schema: JSON | None,
        *,
        webhook_enabled: bool = False,
        webhook_secret: str | None = None,
        schema_mode: str = "off",
        actor: Actor | None = None,
    ) -> Trigger:
        try:
            async with self._transaction() as conn:
                row = await conn.fetchrow(
                    _INSERT_TRIGGER,
                    ref,
                    label,
                    description,
                    param_schema,
                    out_schema,
                    _by(actor),
                    webhook_enabled,
                    webhook_secret,
                    schema_mode,
                )
                created = _trigger(row, ref)
                if actor:
                    await audit.record(
                        conn, actor, "trigger", created.id, created.ref, audit.created(created, _TRIGGER_FIELDS)
                    )
        except AlreadyExists:
            raise AlreadyExists(f"trigger {ref} already exists") from None
        return created

    async def get_trigger(self, key: int | str) -> Trigger:
        sql = _TRIGGER_BY_ID if isinstance(key, int) else _TRIGGER_BY_REF
        return _trigger(await self._fetchrow(sql, key), key)

    async def list_triggers(self, size: int, token: str, pack_ref: str = "") -> Page[Trigger]:
        where = Where()
        if pack_ref:
            where.add("pack_ref = {}", pack_ref)
        return await self._page(f"SELECT {_TRIGGER} FROM trigger", where, token, size, Trigger)

    async def update_trigger(self, key: int | str, changes: dict[str, JSON], actor: Actor | None = None) -> Trigger:
        """Sets the given columns (TRIGGER_UPDATABLE) of one trigger, and ``updated_by``."""
        where = Where()
        sets = [f"{name} = {where.param(value)}" for name, value in changes.items()]
        sets += ["updated = now()", f"updated_by = {where.param(_by(actor))}"]
        async with self._transaction() as conn:
            old = await _locked_trigger(conn, key)
            bumped = any(changes[name] != getattr(old, name) for name in SCHEMA_SETTINGS & changes.keys())
            if bumped:
                # A new version only for a real change: events checked against the old one
                # keep naming it, and ingest compiles the schema again once.
                sets.append("schema_version = schema_version + 1")
            sql = f"UPDATE trigger SET {', '.join(sets)} WHERE id = {where.param(old.id)} RETURNING {_TRIGGER}"
            new = _trigger(await conn.fetchrow(sql, *where.args), key)
            if actor:
                names = [n for n in changes if n != "webhook_secret"] + (["schema_version"] if bumped else [])
                change = audit.updated(old, new, names)
                if "webhook_secret" in changes:
                    change["webhook_secret"] = "set" if changes["webhook_secret"] else "removed"
                await audit.record(conn, actor, "trigger", new.id, new.ref, change)
        return new

    async def rotate_webhook_key(self, key: int | str, actor: Actor | None = None) -> Trigger:
        """A new webhook key for the trigger; the old one stops working at commit."""
        async with self._transaction() as conn:
            old = await _locked_trigger(conn, key)
            new = _trigger(await conn.fetchrow(_ROTATE_KEY, old.id, _by(actor)), key)
            if actor:
                # The keys themselves are credentials: the record says that one changed.
                await audit.record(conn, actor, "trigger", new.id, new.ref, {"webhook_key": "rotated"})
        return new

    async def webhook(self, key: str) -> Webhook:
        """The trigger a webhook key belongs to; NotFound when no trigger has it."""
        row = await self._fetchrow(_WEBHOOK, key)
        if row is None:
            raise NotFound("no webhook has this key")
        return Webhook(row["id"], row["ref"], row["webhook_enabled"], row["webhook_secret"])

    async def delete_trigger(self, key: int | str, actor: Actor | None = None) -> None:
        sql = _DELETE_TRIGGER_BY_ID if isinstance(key, int) else _DELETE_TRIGGER_BY_REF
        async with self._transaction() as conn:
            row = await conn.fetchrow(sql, key)
            if row is None:
                raise NotFound(f"trigger {key} not found")
            if actor:
                await audit.record(conn, actor, "trigger", row["id"], row["ref"], {"id": row["id"], "ref": row["ref"]})

    async def create_rule(
        self,
        *,
        ref: str,
        label: str,
        description: str,
        trigger_ref: str,
        action_ref: str | None,
        action_params: dict[str, JSON],
        conditions: list[dict[str, JSON]],
        condition: str,
        enabled: bool,
        backstop: bool = False,
        actor: Actor | None = None,
    ) -> Rule:
        nodes = count_nodes(conditions)
        try:
            async with self._transaction() as conn:
                await _check_trigger_load(conn, trigger_ref, None, nodes)
                row = await conn.fetchrow(
                    _INSERT_RULE,
                    ref,
                    label,
                    description,
                    trigger_ref,
                    action_ref,
                    action_params,
                    conditions,
                    condition,
                    enabled,
                    _by(actor),
                    backstop,
                    nodes,
                )
                if row is None:
                    raise NotFound(f"trigger {trigger_ref} not found")
                created = Rule(*row)
                if actor:
                    await audit.record(
                        conn, actor, "rule", created.id, created.ref, audit.created(created, _RULE_FIELDS)
                    )
        except AlreadyExists:
            raise AlreadyExists(f"rule {ref} already exists") from None
        return created

    async def triggers_of(self, ids: Sequence[int]) -> dict[int, str]:
        """The trigger each of these rules watches now (absent: no such rule any more)."""
        if not ids:
            return {}
        return {int(r["id"]): str(r["trigger_ref"]) for r in await self._fetch(_TRIGGERS_OF_RULES, list(ids))}

    async def get_rule(self, key: int | str) -> Rule:
        sql = _RULE_BY_ID if isinstance(key, int) else _RULE_BY_REF
        return _rule(await self._fetchrow(sql, key), key)

    async def list_rules(
        self,
        size: int,
        token: str,
        *,
        pack_ref: str = "",
        trigger_ref: str = "",
        action_ref: str = "",
        enabled: bool | None = None,
    ) -> Page[Rule]:
        where = Where()
        if pack_ref:
            where.add("pack_ref = {}", pack_ref)
        if trigger_ref:
            where.add("trigger_ref = {}", trigger_ref)
        if action_ref:
            where.add("action_ref = {}", action_ref)
        if enabled is not None:
            where.add("enabled = {}", enabled)
        return await self._page(f"SELECT {_RULE} FROM rule", where, token, size, Rule)

    async def update_rule(self, key: int | str, changes: dict[str, JSON], actor: Actor | None = None) -> Rule:
        """Sets the given columns (keys of UPDATABLE only) of one rule, and ``updated_by``.

        The audit record names the fields whose stored value changed, old and new; a change
        to the values the rule already had is recorded with none.
        """
        where = Where()
        sets = [f"{name} = {where.param(value)}{UPDATABLE[name]}" for name, value in changes.items()]
        sets.append(f"updated_by = {where.param(_by(actor))}")
        if isinstance(changes.get("conditions"), list):
            sets.append(f"condition_nodes = {where.param(count_nodes(changes['conditions']))}")
        lock, lock_key = (_LOCK_RULE_BY_ID if isinstance(key, int) else _LOCK_RULE_BY_REF), key
        async with self._transaction() as conn:
            conditions = changes.get("conditions")
            if isinstance(conditions, list):
                # The trigger's lock before the rule's, as create_rule takes it (a rule's
                # trigger_ref never changes, so it can be read before the rule is locked).
                found = await conn.fetchrow(_RULE_TRIGGER_BY_ID if isinstance(key, int) else _RULE_TRIGGER_BY_REF, key)
                if found is None:
                    raise NotFound(f"rule {key} not found")
                await _check_trigger_load(conn, found["trigger_ref"], found["id"], count_nodes(conditions))
                lock, lock_key = _LOCK_RULE_BY_ID, found["id"]
            # Locked: the old values stay the old values until this commits.
            old = _rule(await conn.fetchrow(lock, lock_key), key)
            sql = f"UPDATE rule SET {', '.join(sets)} WHERE id = {where.param(old.id)} RETURNING {_RULE}"
            new = _rule(await conn.fetchrow(sql, *where.args), key)
            if actor:
                await audit.record(conn, actor, "rule", new.id, new.ref, audit.updated(old, new, changes))
        return new

    async def delete_rule(self, key: int | str, actor: Actor | None = None) -> None:
        sql = _DELETE_RULE_BY_ID if isinstance(key, int) else _DELETE_RULE_BY_REF
        async with self._transaction() as conn:
            row = await conn.fetchrow(sql, key)
            if row is None:
                raise NotFound(f"rule {key} not found")
            if actor:
                await audit.record(conn, actor, "rule", row["id"], row["ref"], {"id": row["id"], "ref": row["ref"]})
