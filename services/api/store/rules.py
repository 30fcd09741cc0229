"""Triggers and rules."""

from __future__ import annotations

import asyncpg

from shared.errors import AlreadyExists, NotFound

from ._db import Repo
from ._paging import Where, keyset_query, page_of
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


def _trigger(row: asyncpg.Record | None, key: int | str) -> Trigger:
    if row is None:
        raise NotFound(f"trigger {key} not found")
    return Trigger(*row)


def _rule(row: asyncpg.Record | None, key: int | str) -> Rule:
    if row is None:
        raise NotFound(f"rule {key} not found")
    return Rule(*row)


class Rules(Repo):
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
        sql, args = keyset_query(f"SELECT {_TRIGGER} FROM trigger", where, token, size)
        return page_of([Trigger(*r) for r in await self._fetch(sql, *args)], size)

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
            row = await self._fetchrow(
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
        sql, args = keyset_query(f"SELECT {_RULE} FROM rule", where, token, size)
        return page_of([Rule(*r) for r in await self._fetch(sql, *args)], size)

    async def update_rule(self, key: int | str, changes: dict[str, JSON]) -> Rule:
        """Sets the given columns (keys of UPDATABLE only) of one rule."""
        where = Where()
        sets = []
        for name, value in changes.items():
            sets.append(f"{name} = {where.param(value)}{UPDATABLE[name]}")
        match = "id" if isinstance(key, int) else "ref"
        sql = f"UPDATE rule SET {', '.join(sets)} WHERE {match} = {where.param(key)} RETURNING {_RULE}"
        return _rule(await self._fetchrow(sql, *where.args), key)

    async def delete_rule(self, key: int | str) -> None:
        sql = _DELETE_RULE_BY_ID if isinstance(key, int) else _DELETE_RULE_BY_REF
        if await self._fetchval(sql, key) is None:
            raise NotFound(f"rule {key} not found")
