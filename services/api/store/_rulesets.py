"""Compiled rule sets and trigger schemas, one per trigger, cached in the api and checked
against the database.

Every change to a trigger's rules gives its ``rule_set`` row a new version in the change's
own transaction (migration 0010). Ingest reads the versions of its triggers in the read it
makes anyway; a set compiled at another version is loaded again, rules and version in one
statement, and compiled once (in a thread when large). So every replica uses a rule change
from the moment it commits, with no message between replicas to lose.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.api.conditions import RuleSet
from services.api.schemas import Schema, compile_schema

from ._db import Connection

_LOAD = """
SELECT s.trigger_ref, s.version,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'id', r.id, 'ref', r.ref, 'trigger_ref', r.trigger_ref, 'enabled', r.enabled,
                   'backstop', r.backstop, 'action_params', r.action_params,
                   'conditions', r.conditions, 'condition', r.condition,
                   'condition_nodes', r.condition_nodes) ORDER BY r.id), '[]')
          FROM rule r WHERE r.trigger_ref = s.trigger_ref) AS rules
  FROM rule_set s WHERE s.trigger_ref = ANY($1::text[])"""

_MAX_SETS = 1024
"""Triggers whose compiled rules are kept; the least recently used go first."""
_INLINE_COMPILE = 20
"""Rules compiled on the event loop; a larger set is compiled in a thread."""
EMPTY = RuleSet.build([])
log = logging.getLogger(__name__)


def build(rules: Iterable[dict[str, Any]]) -> RuleSet:
    rules = list(rules)
    for r in rules:
        # Serialised once per compiled set, not per enforcement: the enforcement's snapshot.
        r["conditions_json"] = json.dumps(r["conditions"])
    return RuleSet.build(rules)


class RuleSets:
    """The compiled rule sets of the triggers this api has seen."""

    def __init__(self) -> None:
        self._sets: OrderedDict[str, tuple[int, RuleSet]] = OrderedDict()

    async def get(self, conn: Connection, versions: dict[str, int]) -> dict[str, RuleSet]:
        """The rule set of each trigger reference: the cached one when compiled at the given
        version, otherwise loaded now (a reference without a version never had rules)."""
        out: dict[str, RuleSet] = {}
        stale: list[str] = []
        for ref, version in versions.items():
            known = self._sets.get(ref)
            if known is not None and known[0] == version:
                self._sets.move_to_end(ref)
                out[ref] = known[1]
            else:
                stale.append(ref)
        if stale:
            for row in await conn.fetch(_LOAD, stale):
                rules: list[dict[str, Any]] = row["rules"]
                compiled = await asyncio.to_thread(build, rules) if len(rules) > _INLINE_COMPILE else build(rules)
                ref, version = row["trigger_ref"], row["version"]
                # Equal, not newer: versions come from a sequence but may commit out of order.
                self._sets[ref] = (version, compiled)
                self._sets.move_to_end(ref)
                out[ref] = compiled
            while len(self._sets) > _MAX_SETS:
                self._sets.popitem(last=False)
        return out


# ---- trigger schemas -------------------------------------------------------------------------

_LOAD_SCHEMAS = """
SELECT id, ref, schema_version, schema_mode, out_schema FROM trigger WHERE ref = ANY($1::text[])"""
_INLINE_SCHEMA_BYTES = 4096
"""Schemas (JSON text) up to this size are compiled on the event loop; larger ones in a thread."""


@dataclass(frozen=True, slots=True)
class TriggerSchema:
    """A trigger's compiled out_schema at one version, and what to do with events that fail it."""

    version: int
    mode: str
    schema: Schema


class Schemas:
    """The compiled schemas of the triggers this api has seen, as RuleSets keeps rule sets:
    ingest reads each trigger's (id, schema_version) with the trigger, and a schema is loaded
    and compiled again only when that moved (every change of out_schema or schema_mode bumps
    it in its own statement, migration 0017). Keyed by id too: a trigger deleted and defined
    again under the same ref starts again at version 1."""

    def __init__(self) -> None:
        self._schemas: OrderedDict[str, tuple[tuple[int, int], TriggerSchema | None]] = OrderedDict()

    async def get(self, conn: Connection, versions: dict[str, list[int]]) -> dict[str, TriggerSchema]:
        """The checked schema of each trigger reference given (``[id, schema_version]``) whose
        mode is not 'off'."""
        out: dict[str, TriggerSchema] = {}
        stale: list[str] = []
        for ref, (id_, version) in versions.items():
            known = self._schemas.get(ref)
            if known is not None and known[0] == (id_, version):
                self._schemas.move_to_end(ref)
                if known[1] is not None:
                    out[ref] = known[1]
            else:
                stale.append(ref)
        if stale:
            for row in await conn.fetch(_LOAD_SCHEMAS, stale):
                compiled = await _compiled(row["ref"], row["out_schema"])
                checked = (
                    TriggerSchema(row["schema_version"], row["schema_mode"], compiled)
                    if compiled is not None and row["schema_mode"] != "off"
                    else None
                )
                self._schemas[row["ref"]] = ((row["id"], row["schema_version"]), checked)
                self._schemas.move_to_end(row["ref"])
                if checked is not None:
                    out[row["ref"]] = checked
            while len(self._schemas) > _MAX_SETS:
                self._schemas.popitem(last=False)
        return out


async def _compiled(ref: str, schema: dict[str, Any] | None) -> Schema | None:
    if schema is None:
        return None
    large = len(json.dumps(schema)) > _INLINE_SCHEMA_BYTES
    compiled, problems = (
        await asyncio.to_thread(compile_schema, schema, "out_schema") if large else compile_schema(schema, "out_schema")
    )
    if compiled is None:
        # Checked when it was stored, so only a change of the validator can get here: events
        # go unchecked (and the log says so) rather than every one being refused.
        log.error("the out_schema of trigger %s no longer compiles, events go unchecked: %s", ref, problems)
    return compiled
