"""RuleService: triggers, rules and the tools around rules (TestRule, ReplayRule).

Condition trees arrive as ``RuleCondition`` messages and are stored as JSON nodes
(``conditions.py``): converted and bounded here, then checked by ``conditions.problems``
(operators, value types, RE2 patterns), all before anything is written.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import empty_pb2, json_format, struct_pb2

from services.api import conditions, convert, matching, schemas, secrets, validate
from services.api._rpc import rpc
from services.api.auth import current_principal
from services.api.dispatcher import Dispatcher
from services.api.encoded import Measure
from services.api.servicers.requests import (
    Context,
    actor_of_call,
    check_filters,
    key_of,
    may_reveal,
    page_of,
    refuse_masked_values,
    shown_rules,
    volume_range,
)
from services.api.store import Event, Page, Store, Trigger, derive, page_size
from services.api.store.rules import TRIGGER_UPDATABLE, UPDATABLE
from shared import limits
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Violations, clip
from shared.gen.automation.v1 import condition_pb2, rule_pb2, rule_pb2_grpc

_FOUND_MAX_BYTES = 4096
"""A found value larger than this (encoded) is not echoed by TestRule."""
_REPLAY_PAGE = 500
"""Events read per round trip while replaying."""


def _node(v: Violations, where: str, c: condition_pb2.RuleCondition, depth: int, budget: list[int]) -> dict[str, Any]:
    """One RuleCondition as a stored JSON node; its problems go to ``v``."""
    budget[0] -= 1
    if budget[0] < 0:
        return {}
    if depth > limits.MAX_CONDITION_DEPTH:
        v.add(where, f"is nested too deep: at most {limits.MAX_CONDITION_DEPTH} levels")
        return {}
    negated = c.HasField("not")
    kinds = [name for name, on in (("all", bool(c.all)), ("any", bool(c.any)), ("not", negated)) if on]
    test = bool(c.operator or c.field or c.HasField("value") or c.HasField("item"))
    if len(kinds) + test != 1:
        v.add(where, "set exactly one of: operator (a test), all, any or not (a group; an empty group is no group)")
        return {}
    if kinds:
        kind = kinds[0]
        if kind == "not":
            return {"not": _node(v, f"{where}.not", getattr(c, "not"), depth + 1, budget)}
        children = c.all if kind == "all" else c.any
        return {kind: [_node(v, f"{where}.{kind}[{i}]", child, depth + 1, budget) for i, child in enumerate(children)]}
    operator = convert.OPERATOR_NAME.get(c.operator, "")
    if not operator:
        v.add(
            f"{where}.operator",
            "is required for a test" if not c.operator else f"is not a ConditionOperator ({c.operator})",
        )
    out: dict[str, Any] = {"field": c.field, "operator": operator}
    if "\x00" in c.field:
        v.add(f"{where}.field", "contains a NUL character, which cannot be stored")
    elif why := matching.path_problem(c.field):
        v.add(f"{where}.field", why)
    if c.HasField("value"):
        out["value"] = validate.json_value(v, f"{where}.value", c.value, limits.MAX_CONDITION_VALUE_BYTES)
    elif operator not in conditions.NO_VALUE:
        v.add(f"{where}.value", "is required")
    if c.HasField("item"):
        out["item"] = _node(v, f"{where}.item", c.item, depth + 1, budget)
    return out


def _conditions(v: Violations, field: str, nodes: Any) -> list[dict[str, Any]]:
    """A rule's condition tree, converted and checked; its problems go to ``v``."""
    before = len(v.items)
    budget = [limits.MAX_CONDITIONS]
    out = [_node(v, f"{field}[{i}]", c, 1, budget) for i, c in enumerate(nodes)]
    if budget[0] < 0:
        v.add(field, f"may hold at most {limits.MAX_CONDITIONS} conditions (tests and groups)")
        return []
    if len(v.items) == before:
        for where, why in conditions.problems(out, field):
            v.add(where, why)
    return out


def _message_key(msg: rule_pb2.Trigger | rule_pb2.Rule, what: str) -> int | str:
    """Which trigger or rule an update names: its id or, when the id is 0, its ref."""
    if msg.id:
        return validate.id_or_raise(f"{what}.id", msg.id)
    if msg.ref:
        return validate.ref_or_raise(f"{what}.ref", msg.ref)
    raise InvalidArgument.one(what, f"give the {what}'s id or ref")


def _webhook_secret(v: Violations, secret: str) -> None:
    if secret and not limits.MIN_WEBHOOK_SECRET <= len(secret) <= limits.MAX_WEBHOOK_SECRET:
        v.add(
            "trigger.webhook_secret",
            f"must be {limits.MIN_WEBHOOK_SECRET} to {limits.MAX_WEBHOOK_SECRET} characters, got {len(secret)}",
        )
    elif "\x00" in secret:
        v.add("trigger.webhook_secret", "contains a NUL character, which cannot be stored")


def _schema_mode(v: Violations, value: int) -> str:
    name = convert.SCHEMA_MODE_NAME.get(value)  # type: ignore[call-overload]
    if name is None:
        v.add("trigger.schema_mode", "must be SCHEMA_MODE_OFF, SCHEMA_MODE_WARN or SCHEMA_MODE_ENFORCE")
        return "off"
    return str(name)


_INLINE_SCHEMA_BYTES = 4096
"""Schemas (encoded) up to this size are compiled on the event loop; larger ones in a thread."""


async def _check_out_schema(schema: dict[str, Any], field: str = "trigger.out_schema") -> schemas.Schema:
    """The out_schema compiled; refused when it does not compile or breaks the bounds of
    ``schemas.py``, naming its node, before anything is written."""
    large = len(json.dumps(schema)) > _INLINE_SCHEMA_BYTES
    compiled, problems = (
        await asyncio.to_thread(schemas.compile_schema, schema, field)
        if large
        else schemas.compile_schema(schema, field)
    )
    if compiled is None:
        raise InvalidArgument(problems)
    return compiled


def _condition(v: Violations, value: int) -> str:
    name = convert.CONDITION_NAME.get(value)  # type: ignore[call-overload]
    if name is None:
        v.add("rule.condition", "must be ENFORCEMENT_CONDITION_ALL or ENFORCEMENT_CONDITION_ANY")
        return "all"
    return str(name)


def _action_params(v: Violations, params: Any) -> dict[str, Any]:
    out = validate.json_object(v, "rule.action_params", params, limits.MAX_ACTION_PARAMS_BYTES)
    for f, why in matching.template_violations(out, "rule.action_params"):
        v.add(f, why)
    return out


@dataclass(slots=True)
class _RuleUnderTest:
    """A stored or inline rule, as matching sees it."""

    id: int | None
    ref: str
    trigger_ref: str
    enabled: bool
    backstop: bool
    action_params: dict[str, Any]
    conditions: list[dict[str, Any]]
    condition: str

    def as_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ref": self.ref,
            "action_params": self.action_params,
            "conditions": self.conditions,
            "condition": self.condition,
        }


def _context(rule: _RuleUnderTest, payload: dict[str, Any], event: Event | None) -> dict[str, Any]:
    return matching.template_context(
        event_id=event.id if event else None,
        trigger_ref=rule.trigger_ref,
        created_iso=event.created.isoformat() if event else None,
        payload=payload,
        rule_ref=rule.ref,
        source_ref=event.source_ref if event else None,
    )


def _render(rule: _RuleUnderTest, payload: dict[str, Any], event: Event | None, field: str) -> dict[str, Any]:
    config, _ = derive(
        rule.as_row(),
        rule.trigger_ref,
        payload,
        _context(rule, payload, event),
        matching.Budget(limits.MAX_CREATE_RESPONSE_BYTES),
        Measure(),
        field,
    )
    return config


def _result(r: conditions.Result) -> rule_pb2.ConditionResult:
    msg = rule_pb2.ConditionResult(node=r.node, holds=r.holds, kind=r.kind, field=r.field, note=r.note)
    if r.expected is not matching.MISSING:
        convert.set_value(msg.expected, r.expected)
    if r.kind in conditions.GROUPS or r.node == "conditions":
        return msg
    if r.found is matching.MISSING:
        msg.missing = True
        return msg
    found = struct_pb2.Value()
    convert.set_value(found, r.found)
    if found.ByteSize() > _FOUND_MAX_BYTES:
        msg.note = (msg.note + "; " if msg.note else "") + f"the value found is {found.ByteSize():,} bytes, not shown"
    else:
        msg.found.CopyFrom(found)
    return msg


def _flag_impossible(results: Any, schema: dict[str, Any]) -> None:
    """Marks the tests whose field the schema rules out (``schemas.cannot_exist``)."""
    known: dict[str, str | None] = {}
    for r in results:
        if not r.field or r.kind in conditions.GROUPS:
            continue
        if r.field not in known:
            known[r.field] = schemas.cannot_exist(schema, r.field)
        why = known[r.field]
        if why is not None:
            r.cannot_exist = True
            r.cannot_exist_note = clip(why, schemas.MAX_ERROR_TEXT)


class RuleService(rule_pb2_grpc.RuleServiceServicer):
    def __init__(self, store: Store, dispatcher: Dispatcher | None = None) -> None:
        self._store = store
        self._dispatcher = dispatcher

    @rpc
    async def CreateTrigger(self, request: rule_pb2.CreateTriggerRequest, context: Context) -> rule_pb2.Trigger:
        t = request.trigger
        v = Violations()
        validate.ref(v, "trigger.ref", t.ref)
        validate.text(v, "trigger.label", t.label, limits.MAX_LABEL)
        validate.text(v, "trigger.description", t.description, limits.MAX_DESCRIPTION)
        schemas = [
            validate.json_object(v, f"trigger.{name}", getattr(t, name), limits.MAX_SCHEMA_BYTES)
            if t.HasField(name)
            else None
            for name in ("param_schema", "out_schema")
        ]
        _webhook_secret(v, t.webhook_secret)
        mode = "enforce" if schemas[1] is not None else "off"
        if t.schema_mode != rule_pb2.SCHEMA_MODE_UNSPECIFIED:
            mode = _schema_mode(v, t.schema_mode)
        v.raise_if_any()
        if schemas[1] is not None:
            await _check_out_schema(schemas[1])
        actor = actor_of_call()
        created = await self._store.rules.create_trigger(
            t.ref,
            t.label,
            t.description,
            *schemas,
            webhook_enabled=t.webhook_enabled,
            webhook_secret=t.webhook_secret or None,
            schema_mode=mode,
            actor=actor,
        )
        return convert.trigger(created)

    @rpc
    async def UpdateTrigger(self, request: rule_pb2.UpdateTriggerRequest, context: Context) -> rule_pb2.Trigger:
        t = request.trigger
        key = _message_key(t, "trigger")
        v = Violations()
        paths = list(request.update_mask.paths)
        if not paths:
            v.add("update_mask", f"is required: name the fields to change ({', '.join(TRIGGER_UPDATABLE)})")
        changes: dict[str, Any] = {}
        for path in paths:
            if path not in TRIGGER_UPDATABLE:
                v.add("update_mask", f"cannot change {path!r}; changeable: {', '.join(TRIGGER_UPDATABLE)}")
            elif path == "webhook_enabled":
                changes[path] = t.webhook_enabled
            elif path == "webhook_secret":
                _webhook_secret(v, t.webhook_secret)
                changes[path] = t.webhook_secret or None
            elif path in ("param_schema", "out_schema"):
                # Unset in the message: the schema is removed.
                given = t.HasField("param_schema" if path == "param_schema" else "out_schema")
                changes[path] = (
                    validate.json_object(v, f"trigger.{path}", getattr(t, path), limits.MAX_SCHEMA_BYTES)
                    if given
                    else None
                )
            elif path == "schema_mode":
                changes[path] = _schema_mode(v, t.schema_mode)
            else:
                value = getattr(t, path)
                validate.text(
                    v, f"trigger.{path}", value, limits.MAX_DESCRIPTION if path == "description" else limits.MAX_LABEL
                )
                changes[path] = value
        v.raise_if_any()
        if changes.get("out_schema") is not None:
            await _check_out_schema(changes["out_schema"])
        return convert.trigger(await self._store.rules.update_trigger(key, changes, actor_of_call()))

    @rpc
    async def RotateWebhookKey(self, request: rule_pb2.RotateWebhookKeyRequest, context: Context) -> rule_pb2.Trigger:
        key = key_of(request, "trigger")
        return convert.trigger(await self._store.rules.rotate_webhook_key(key, actor_of_call()))

    @rpc
    async def GetTrigger(self, request: rule_pb2.GetTriggerRequest, context: Context) -> rule_pb2.Trigger:
        return convert.trigger(await self._store.rules.get_trigger(key_of(request, "trigger")))

    @rpc
    async def ListTriggers(
        self, request: rule_pb2.ListTriggersRequest, context: Context
    ) -> rule_pb2.ListTriggersResponse:
        check_filters(request, texts=("pack_ref",))
        page = await self._store.rules.list_triggers(page_size(request.page_size), request.page_token, request.pack_ref)
        triggers, token = page_of(page, convert.trigger)
        return rule_pb2.ListTriggersResponse(triggers=triggers, next_page_token=token)

    @rpc
    async def DeleteTrigger(self, request: rule_pb2.DeleteTriggerRequest, context: Context) -> empty_pb2.Empty:
        actor = actor_of_call()
        await self._store.rules.delete_trigger(key_of(request, "trigger"), actor)
        return empty_pb2.Empty()

    @staticmethod
    def _new_rule(v: Violations, r: rule_pb2.Rule, field: str, ref_required: bool = True) -> dict[str, Any]:
        """A rule message checked as CreateRule checks it: the store's keyword arguments."""
        validate.ref(v, f"{field}.ref", r.ref, required=ref_required)
        validate.ref(v, f"{field}.trigger_ref", r.trigger_ref)
        validate.ref(v, f"{field}.action_ref", r.action_ref, required=False)
        validate.text(v, f"{field}.label", r.label, limits.MAX_LABEL)
        validate.text(v, f"{field}.description", r.description, limits.MAX_DESCRIPTION)
        return {
            "ref": r.ref,
            "label": r.label,
            "description": r.description,
            "trigger_ref": r.trigger_ref,
            "action_ref": r.action_ref or None,
            "action_params": _action_params(v, r.action_params),
            "conditions": _conditions(v, f"{field}.conditions", r.conditions),
            "condition": _condition(v, r.condition),
            "enabled": r.enabled if r.HasField("enabled") else True,
            "backstop": r.backstop,
        }

    @rpc
    async def CreateRule(self, request: rule_pb2.CreateRuleRequest, context: Context) -> rule_pb2.Rule:
        v = Violations()
        fields = self._new_rule(v, request.rule, "rule")
        v.raise_if_any()
        await refuse_masked_values(self._store, request.rule.trigger_ref, fields["conditions"], "rule.conditions")
        created = await self._store.rules.create_rule(**fields, actor=actor_of_call())
        # Its writer sent the values; the answer is masked like every read of the rule.
        (created,), _ = await shown_rules(self._store, [created])
        return convert.rule(created)

    @rpc
    async def GetRule(self, request: rule_pb2.GetRuleRequest, context: Context) -> rule_pb2.Rule:
        key = key_of(request, "rule")
        reveal = may_reveal(request.reveal)
        (rule,), revealed = await shown_rules(self._store, [await self._store.rules.get_rule(key)], reveal=reveal)
        await revealed.audit(self._store, (rule.id,))
        return convert.rule(rule)

    @rpc
    async def ListRules(self, request: rule_pb2.ListRulesRequest, context: Context) -> rule_pb2.ListRulesResponse:
        check_filters(request, refs=("trigger_ref", "action_ref"), texts=("pack_ref",))
        reveal = may_reveal(request.reveal)
        page = await self._store.rules.list_rules(
            page_size(request.page_size),
            request.page_token,
            pack_ref=request.pack_ref,
            trigger_ref=request.trigger_ref,
            action_ref=request.action_ref,
            enabled=request.enabled if request.HasField("enabled") else None,
        )
        items, revealed = await shown_rules(self._store, page.items, reveal=reveal)
        rules, token = page_of(Page(items, page.next_token, page.token_after), convert.rule)
        await revealed.audit(self._store, (r.id for r in rules))
        return rule_pb2.ListRulesResponse(rules=rules, next_page_token=token)

    @rpc
    async def UpdateRule(self, request: rule_pb2.UpdateRuleRequest, context: Context) -> rule_pb2.Rule:
        r = request.rule
        key = _message_key(r, "rule")
        paths = list(request.update_mask.paths)
        v = Violations()
        if not paths:
            v.add("update_mask", f"is required: name the fields to change ({', '.join(UPDATABLE)})")
        changes: dict[str, Any] = {}
        for path in paths:
            if path not in UPDATABLE:
                v.add("update_mask", f"cannot change {path!r}; changeable: {', '.join(UPDATABLE)}")
            elif path == "action_ref":
                validate.ref(v, "rule.action_ref", r.action_ref, required=False)
                changes[path] = r.action_ref or None
            elif path == "action_params":
                changes[path] = _action_params(v, r.action_params)
            elif path == "conditions":
                changes[path] = _conditions(v, "rule.conditions", r.conditions)
            elif path == "condition":
                changes[path] = _condition(v, r.condition)
            elif path == "enabled":
                if not r.HasField("enabled"):
                    v.add("rule.enabled", "must be set when update_mask names it")
                changes[path] = r.enabled
            elif path == "backstop":
                changes[path] = r.backstop
            else:
                value = getattr(r, path)
                validate.text(
                    v, f"rule.{path}", value, limits.MAX_DESCRIPTION if path == "description" else limits.MAX_LABEL
                )
                changes[path] = value
        v.raise_if_any()
        if "conditions" in changes and secrets.MASK in json.dumps(changes["conditions"]):
            stored = await self._store.rules.get_rule(key)
            await refuse_masked_values(self._store, stored.trigger_ref, changes["conditions"], "rule.conditions")
        actor = actor_of_call()
        (updated,), _ = await shown_rules(self._store, [await self._store.rules.update_rule(key, changes, actor)])
        return convert.rule(updated)

    @rpc
    async def DeleteRule(self, request: rule_pb2.DeleteRuleRequest, context: Context) -> empty_pb2.Empty:
        actor = actor_of_call()
        await self._store.rules.delete_rule(key_of(request, "rule"), actor)
        return empty_pb2.Empty()

    async def _rule_under_test(self, source: rule_pb2.RuleSource) -> _RuleUnderTest:
        which = source.WhichOneof("source")
        if which == "inline":
            v = Violations()
            fields = self._new_rule(v, source.inline, "rule.inline", ref_required=False)
            v.raise_if_any()
            await self._store.rules.get_trigger(fields["trigger_ref"])
            return _RuleUnderTest(
                None,
                fields["ref"] or "inline",
                fields["trigger_ref"],
                fields["enabled"],
                fields["backstop"],
                fields["action_params"],
                fields["conditions"],
                fields["condition"],
            )
        if which == "id":
            key: int | str = validate.id_or_raise("rule.id", source.id)
        elif which == "ref":
            key = validate.ref_or_raise("rule.ref", source.ref)
        else:
            raise InvalidArgument.one("rule", "give a stored rule's id or ref, or an inline rule")
        r = await self._store.rules.get_rule(key)
        return _RuleUnderTest(
            r.id, r.ref, r.trigger_ref, r.enabled, r.backstop, r.action_params, r.conditions, r.condition
        )

    async def _trigger_if_any(self, ref: str) -> Trigger | None:
        """The trigger a rule watches, or None once it was deleted (the rule keeps its ref)."""
        try:
            return await self._store.rules.get_trigger(ref)
        except NotFound:
            return None

    @rpc
    async def TestRule(self, request: rule_pb2.TestRuleRequest, context: Context) -> rule_pb2.TestRuleResponse:
        rule = await self._rule_under_test(request.rule)
        event: Event | None = None
        which = request.WhichOneof("event")
        if which == "event_id":
            event = await self._store.events.get(validate.id_or_raise("event_id", request.event_id))
            if event.trigger_ref != rule.trigger_ref:
                raise FailedPrecondition(
                    f"event {event.id} is of trigger {event.trigger_ref}; rule {rule.ref} watches {rule.trigger_ref}"
                )
            payload = event.payload
        elif which == "payload":
            v = Violations()
            payload = validate.json_object(v, "payload", request.payload, limits.MAX_PAYLOAD_BYTES)
            v.raise_if_any()
        else:
            raise InvalidArgument.one("event", "give a stored event's event_id or an inline payload")
        rule_set = await self._store.events.rule_set(rule.trigger_ref) if rule.backstop else None
        trigger = await self._trigger_if_any(rule.trigger_ref)

        def test() -> rule_pb2.TestRuleResponse:
            facts = matching.Facts(payload)
            try:
                matched, results = conditions.explain(rule.conditions, rule.condition, facts)
            except matching.SearchTooCostly:
                raise InvalidArgument.one("event", matching.SEARCH_TOO_COSTLY) from None
            out = rule_pb2.TestRuleResponse(
                matched=matched, trigger_ref=rule.trigger_ref, results=[_result(r) for r in results]
            )
            if rule_set is not None:
                out.taken_by.extend(r["ref"] for r in rule_set.standard_matches(facts) if r["id"] != rule.id)
            out.would_fire = matched and rule.enabled and not out.taken_by
            if matched:
                convert.fill_struct(out.config, _render(rule, payload, event, "payload"))
            if trigger is not None and trigger.out_schema is not None:
                out.schema_version = trigger.schema_version
                out.schema_mode = convert.SCHEMA_MODE[trigger.schema_mode]
                _flag_impossible(out.results, trigger.out_schema)
            return out

        # Large payloads and regexes over them cost milliseconds: off the event loop.
        answer = await asyncio.to_thread(test)
        await self._mask_test(answer, rule, event)
        return answer

    async def _mask_test(self, out: rule_pb2.TestRuleResponse, rule: _RuleUnderTest, event: Event | None) -> None:
        """TestRule shows what a stored event holds and what a stored rule compares with: at a
        secret path, as every read does, ``"***"`` (no reveal here: a tester needs the shape,
        not the value). A typed payload and an inline rule are the caller's own: shown as sent."""
        keys: list[tuple[str, int | None, datetime]] = []
        if event is not None:
            keys.append((event.trigger_ref, event.schema_version, event.created))
        if rule.id is not None:
            keys.append((rule.trigger_ref, None, datetime.max.replace(tzinfo=UTC)))
        if not keys:
            return
        found = await self._store.schema_versions.secret_paths(keys)
        paths = [p for ps in found for p in ps]
        if not paths:
            return
        clear: list[Any] = secrets.secret_values(event.payload, found[0]) if event is not None else []
        for r in out.results:
            if r.field and secrets.field_is_secret(r.field, paths):
                for part in ("expected", "found"):
                    if r.HasField(part):
                        value = getattr(r, part)
                        clear.append(json_format.MessageToDict(value))
                        value.Clear()
                        value.string_value = secrets.MASK
        for r in out.results:
            r.note = secrets.mask_rendered(r.note, clear)[0]
        if out.HasField("config"):
            masked, changed = secrets.mask_rendered(json_format.MessageToDict(out.config), clear)
            if changed:
                out.ClearField("config")
                convert.fill_struct(out.config, masked)

    @rpc
    async def ReplayRule(
        self, request: rule_pb2.ReplayRuleRequest, context: Context
    ) -> AsyncIterator[rule_pb2.ReplayRuleResponse]:
        rule = await self._rule_under_test(request.rule)
        v = Violations()
        if not 0 <= request.limit <= limits.MAX_REPLAY_MATCHES:
            v.add("limit", f"must be 0 (default {limits.DEFAULT_REPLAY_MATCHES}) to {limits.MAX_REPLAY_MATCHES:,}")
        v.raise_if_any()
        start, end = volume_range(request.created, "created")
        cap = request.limit or limits.DEFAULT_REPLAY_MATCHES
        if request.fire:
            if rule.id is None:
                raise InvalidArgument.one("fire", "needs a stored rule: an inline rule cannot own enforcements")
            if not current_principal().is_operator:
                raise PermissionDenied("fire creates enforcements: it needs the operator role")
            if not rule.enabled:
                raise FailedPrecondition(f"rule {rule.ref} is disabled: enable it before firing a replay")
        actor = actor_of_call() if request.fire else None
        rule_set = await self._store.events.rule_set(rule.trigger_ref) if rule.backstop else None
        pred = conditions.compile_rule(rule.conditions, rule.condition)

        def matches(page: list[Event], room: int) -> tuple[list[tuple[Event, dict[str, Any]]], int]:
            """The page's first ``room`` matches (rendered), and how many events were looked
            at to find them: the scan stops at the limit, not at the end of the page."""
            out = []
            for looked, event in enumerate(page, 1):
                facts = matching.Facts(event.payload)
                try:
                    if not pred(facts):
                        continue
                    if rule_set is not None and any(r["id"] != rule.id for r in rule_set.standard_matches(facts)):
                        continue
                except matching.SearchTooCostly:
                    raise FailedPrecondition(f"event {event.id}: {matching.SEARCH_TOO_COSTLY}") from None
                out.append((event, _render(rule, event.payload, event, f"event {event.id}")))
                if len(out) == room:
                    return out, looked
            return out, len(page)

        async def more_after(page: list[Event], looked: int) -> bool:
            """Whether the range holds events after the first ``looked`` of this page."""
            if looked < len(page):
                return True
            if len(page) < _REPLAY_PAGE:
                return False
            last = (page[-1].created, page[-1].id)
            return bool(await self._store.events.scan(rule.trigger_ref, start, end, last, 1))

        scanned = matched = fired = 0
        truncated = done = False
        after: tuple[datetime, int] | None = None
        while not done:
            page = await self._store.events.scan(rule.trigger_ref, start, end, after, _REPLAY_PAGE)
            if not page:
                break
            after = (page[-1].created, page[-1].id)
            found, looked = await asyncio.to_thread(matches, page, cap - matched)
            scanned += looked
            if len(found) == cap - matched or scanned >= limits.MAX_REPLAY_SCAN:
                # Stopped by the limit or the scan bound: truncated only when events of the
                # range are left unseen (a limit reached by the range's last event cuts nothing).
                done = True
                truncated = await more_after(page, looked)
            made: dict[int, tuple[int, bool]] = {}
            if found and actor is not None:
                assert rule.id is not None
                made, created = await self._store.enforcements.fire(rule.id, found, actor)
                fired += len(created)
                if created and self._dispatcher is not None:
                    self._dispatcher.wake(len(created))
                    self._dispatcher.announce([], created, [])
            for event, config in found:
                match = rule_pb2.ReplayMatch(event_id=event.id, created=convert.ts(event.created))
                convert.fill_struct(match.config, config)
                if event.id in made:
                    match.enforcement_id, match.existed = made[event.id]
                yield rule_pb2.ReplayRuleResponse(match=match)
            matched += len(found)
        yield rule_pb2.ReplayRuleResponse(
            summary=rule_pb2.ReplaySummary(scanned=scanned, matched=matched, fired=fired, truncated=truncated)
        )

    @rpc
    async def CheckSchema(self, request: rule_pb2.CheckSchemaRequest, context: Context) -> rule_pb2.CheckSchemaResponse:
        which = request.WhichOneof("trigger")
        if which == "trigger_id":
            key: int | str = validate.id_or_raise("trigger_id", request.trigger_id)
        elif which == "trigger_ref":
            key = validate.ref_or_raise("trigger_ref", request.trigger_ref)
        else:
            raise InvalidArgument.one("trigger", "give the trigger's trigger_id or trigger_ref")
        v = Violations()
        if not 0 <= request.limit <= limits.MAX_SCHEMA_CHECK:
            v.add("limit", f"must be 0 (default {limits.DEFAULT_SCHEMA_CHECK:,}) to {limits.MAX_SCHEMA_CHECK:,}")
        proposed = (
            validate.json_object(v, "out_schema", request.out_schema, limits.MAX_SCHEMA_BYTES)
            if request.HasField("out_schema")
            else None
        )
        v.raise_if_any()
        trigger = await self._store.rules.get_trigger(key)
        schema = proposed if proposed is not None else trigger.out_schema
        if schema is None:
            raise FailedPrecondition(f"trigger {trigger.ref} has no out_schema: give the one to check in out_schema")
        compiled = await _check_out_schema(schema, "out_schema")
        cap = request.limit or limits.DEFAULT_SCHEMA_CHECK
        out = rule_pb2.CheckSchemaResponse(
            trigger_ref=trigger.ref, draft=compiled.draft, schema_version=trigger.schema_version
        )

        def check(page: list[Event]) -> list[tuple[Event, tuple[str, str]]]:
            failed = []
            for event in page:
                problem = compiled.first_problem(event.payload, "event.payload")
                if problem is not None:
                    failed.append((event, problem))
            return failed

        # Every event a trigger could have: the scan is newest first and stops at the limit.
        start, end = datetime(1970, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=1)
        after: tuple[datetime, int] | None = None
        while out.checked < cap:
            page = await self._store.events.scan(trigger.ref, start, end, after, min(_REPLAY_PAGE, cap - out.checked))
            if not page:
                break
            after = (page[-1].created, page[-1].id)
            # A page of large payloads costs milliseconds to validate: off the event loop.
            for event, (path, keyword) in await asyncio.to_thread(check, page):
                out.failing += 1
                if len(out.examples) < limits.MAX_SCHEMA_CHECK_EXAMPLES:
                    out.examples.add(
                        event_id=event.id, created=convert.ts(event.created), path=clip(path, 200), keyword=keyword
                    )
            out.checked += len(page)
        return out
