"""Triggers and rules."""

from __future__ import annotations

import asyncpg

from shared.errors import AlreadyExists, FailedPrecondition, NotFound
from shared.limits import MAX_CONDITIONS_PER_TRIGGER, MAX_RULES_PER_TRIGGER

from ._db import Connection, guarded
from ._paging import Paged, Where
from .types import JSON, Page, Rule, Trigger, columns

_TRIGGER = columns(Trigger)
_RULE = columns(Rule)

_INSERT_TRIGGER = f"""
INSERT INTO trigger (ref, label, description, param_schema, out_schema)
VALUES ($1, $2, $3, $4, $5) RETURNING {_TRIGGER}"""
_TRIGGER_BY_ID = f"SELECT {_TRIGGER} FROM trigger WHERE id = $1"
_TRIGGER_BY_REF = f"SELECT {_TRIGGER} FROM trigger WHERE ref = $1"
_DELETE_TRIGGER_BY_ID = "DELETE FROM trigger WHERE id = $1 RETURNING id"
_DELETE_TRIGGER_BY_REF = "DELETE FROM trigger WHERE ref = $1 RETURNING id"

_INSERT_RULE = f"""
INSERT INTO rule (ref, label, description, trigger, trigger_ref, action_ref, action_params,
                  conditions, condition, enabled)
SELECT $1, $2, $3, t.id, t.ref, $5, $6, $7, $8::enforcement_condition, $9
FROM trigger t WHERE t.ref = $4
RETURNING {_RULE}"""
# Rules of one trigger are counted under a lock of that trigger, so that concurrent creators
# cannot pass MAX_RULES_PER_TRIGGER together.
_LOCK_TRIGGER_RULES = "SELECT pg_advisory_xact_lock(hashtextextended($1, 2))"
_TRIGGER_LOAD = """
SELECT count(*) AS rules, coalesce(sum(jsonb_array_length(conditions)), 0) AS conditions
  FROM rule WHERE trigger_ref = $1 AND id IS DISTINCT FROM $2"""
_RULE_TRIGGER = "SELECT trigger_ref FROM rule WHERE id = $1"
_RULE_TRIGGER_BY_REF = "SELECT trigger_ref FROM rule WHERE ref = $1"
_RULE_BY_ID = f"SELECT {_RULE} FROM rule WHERE id = $1"
_RULE_BY_REF = f"SELECT {_RULE} FROM rule WHERE ref = $1"
_DELETE_RULE_BY_ID = "DELETE FROM rule WHERE id = $1 RETURNING id"
_DELETE_RULE_BY_REF = "DELETE FROM rule WHERE ref = $1 RETURNING id"

# Columns UpdateRule may change, with the SQL cast each needs.
UPDATABLE = {
    "label": "",
    "description": "",
    "action_ref": "",
    "action_params": "",
    "conditions": "",
    "condition": "::enforcement_condition",
    "enabled": "",
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


def _rule(row: asyncpg.Record | None, key: int | str) -> Rule:
    if row is None:
        raise NotFound(f"rule {key} not found")
    return Rule(*row)


class Rules(Paged):
    """Triggers and the rules that watch them."""

    async def create_trigger(
        self, ref: str, label: str, description: str, param_schema: JSON | None, out_schema: JSON | None
    ) -> Trigger:
        try:
            row = await self._fetchrow(_INSERT_TRIGGER, ref, label, description, param_schema, out_schema)
        except AlreadyExists:
            raise AlreadyExists(f"trigger {ref} already exists") from None
        return _trigger(row, ref)

    async def get_trigger(self, key: int | str) -> Trigger:
        sql = _TRIGGER_BY_ID if isinstance(key, int) else _TRIGGER_BY_REF
        return _trigger(await self._fetchrow(sql, key), key)

    async def list_triggers(self, size: int, token: str, pack_ref: str = "") -> Page[Trigger]:
        where = Where()
        if pack_ref:
            where.add("pack_ref = {}", pack_ref)
        return await self._page(f"SELECT {_TRIGGER} FROM trigger", where, token, size, Trigger)

    async def delete_trigger(self, key: int | str) -> None:
        sql = _DELETE_TRIGGER_BY_ID if isinstance(key, int) else _DELETE_TRIGGER_BY_REF
        if await self._fetchval(sql, key) is None:
            raise NotFound(f"trigger {key} not found")

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
    ) -> Rule:
        try:
            async with guarded(), self._pool.acquire() as conn, conn.transaction():
                await _check_trigger_load(conn, trigger_ref, None, len(conditions))
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
                )
        except AlreadyExists:
            raise AlreadyExists(f"rule {ref} already exists") from None
        if row is None:
            raise NotFound(f"trigger {trigger_ref} not found")
        return Rule(*row)

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

    async def update_rule(self, key: int | str, changes: dict[str, JSON]) -> Rule:
        """Sets the given columns (keys of UPDATABLE only) of one rule."""
        where = Where()
        sets = []
        for name, value in changes.items():
            sets.append(f"{name} = {where.param(value)}{UPDATABLE[name]}")
        match = "id" if isinstance(key, int) else "ref"
        sql = f"UPDATE rule SET {', '.join(sets)} WHERE {match} = {where.param(key)} RETURNING {_RULE}"
        conditions = changes.get("conditions")
        if not isinstance(conditions, list):
            return _rule(await self._fetchrow(sql, *where.args), key)
        async with guarded(), self._pool.acquire() as conn, conn.transaction():
            trigger_ref = await conn.fetchval(_RULE_TRIGGER if isinstance(key, int) else _RULE_TRIGGER_BY_REF, key)
            if trigger_ref is None:
                raise NotFound(f"rule {key} not found")
            rule_id = key if isinstance(key, int) else await conn.fetchval("SELECT id FROM rule WHERE ref = $1", key)
            await _check_trigger_load(conn, trigger_ref, rule_id, len(conditions))
            return _rule(await conn.fetchrow(sql, *where.args), key)

    async def delete_rule(self, key: int | str) -> None:
        sql = _DELETE_RULE_BY_ID if isinstance(key, int) else _DELETE_RULE_BY_REF
        if await self._fetchval(sql, key) is None:
            raise NotFound(f"rule {key} not found")
