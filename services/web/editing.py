"""Editing from the console: creating, changing and deleting rules and triggers.

Every change is one call of the api's own RPC (CreateRule, UpdateRule, DeleteRule,
CreateTrigger, UpdateTrigger, DeleteTrigger) made with the signed-in person's token, so the
api's roles, checks and audit trail apply exactly as they do to grpcurl; a save is never two
calls, so nothing is left half-written. The console checks only what it must to build the
request (JSON that parses, a form of the right shape) and shows the api's INVALID_ARGUMENT
next to the field it names.

A rule's conditions are edited as rows (field, operator, value) when they are a flat list of
tests, and as JSON otherwise. The tester runs the rule as typed (TestRule with an inline rule)
against a stored event or a typed payload. A change to a stored rule is shown as a diff on a
confirmation step before UpdateRule, which names only the fields that changed.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf import field_mask_pb2, json_format, struct_pb2
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from services.web.console import UNSIGNED_WARNING, Console, Refused, positive_id
from services.web.render import plain, pretty
from services.web.session import User
from shared import limits
from shared.errors import field_violations
from shared.gen.automation.v1 import common_pb2, condition_pb2, rule_pb2

log = logging.getLogger("services.web.editing")

EDIT_FORM_BYTES = 1024 * 1024
"""Largest editing form: a rule's parameters and conditions, a test payload, and (on the review
step) all of them again as hidden fields; the api bounds each part further."""
BLANK_ROWS = 3
"""Empty condition rows offered below the filled ones."""
OPERATOR_PREFIX = "CONDITION_OPERATOR_"
OPERATORS: tuple[str, ...] = tuple(
    v.name.removeprefix(OPERATOR_PREFIX).lower()
    for n, v in sorted(condition_pb2.ConditionOperator.DESCRIPTOR.values_by_number.items(), key=lambda kv: kv[0])
    if n
)
"""Every operator by its short name (the deprecated alias left out)."""
ROW_OPERATORS = tuple(op for op in OPERATORS if op != "search")
"""The operators a row can hold: search needs a nested test, which only the JSON editor has."""
NO_VALUE = ("exists", "nexists")
SCHEMA_MODES = {
    "off": rule_pb2.SCHEMA_MODE_OFF,
    "warn": rule_pb2.SCHEMA_MODE_WARN,
    "enforce": rule_pb2.SCHEMA_MODE_ENFORCE,
}
SCHEMA_MODE_NAMES = {v: k for k, v in SCHEMA_MODES.items()}
RULE_SLOTS = ("ref", "trigger_ref", "label", "description", "action_ref", "action_params", "condition", "conditions")
TRIGGER_SLOTS = ("ref", "label", "description", "out_schema", "param_schema", "schema_mode", "webhook_secret")


# ---- conditions as rows and as JSON ------------------------------------------------------------


def _short_operators(node: Any) -> Any:
    """A condition node as JSON with operators by their short names (``equals``)."""
    if isinstance(node, dict):
        return {
            k: (
                v.removeprefix(OPERATOR_PREFIX).lower()
                if k == "operator" and isinstance(v, str)
                else _short_operators(v)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_short_operators(v) for v in node]
    return node


def _full_operators(node: Any) -> Any:
    """The reverse of ``_short_operators``: what protobuf's JSON parser takes."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "operator" and isinstance(v, str) and not v.upper().startswith(OPERATOR_PREFIX):
                v = OPERATOR_PREFIX + v.upper()
            out[k] = _full_operators(v)
        return out
    if isinstance(node, list):
        return [_full_operators(v) for v in node]
    return node


def conditions_json(conditions: Any) -> str:
    """A condition tree as the JSON editor shows it."""
    nodes = [_short_operators(plain(json_format.MessageToDict(c))) for c in conditions]
    return json.dumps(nodes, indent=2, ensure_ascii=False, sort_keys=True) if nodes else "[]"


def value_text(value: struct_pb2.Value) -> str:
    """A test's value as a row shows it: text as itself unless it would read back as something
    else (``"5"``, ``"true"``, ``""``), everything else as JSON."""
    python = plain(json_format.MessageToDict(value))
    if isinstance(python, str):
        try:
            json.loads(python)
        except ValueError:
            return python if python.strip() == python and python else json.dumps(python, ensure_ascii=False)
        return json.dumps(python, ensure_ascii=False)
    return json.dumps(python, ensure_ascii=False, sort_keys=True)


def value_of(text: str) -> Any:
    """A row's value as typed: JSON when it is JSON (5, true, "5", [1, 2]), text otherwise."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


@dataclass
class Row:
    field: str = ""
    operator: str = "equals"
    value: str = ""
    error: str = ""


def rows_of(conditions: Any) -> list[Row] | None:
    """A condition tree as rows, or None when it is not a flat list of tests."""
    rows = []
    for c in conditions:
        if not c.operator or c.HasField("item") or c.all or c.any or c.HasField("not"):
            return None
        op = condition_pb2.ConditionOperator.Name(c.operator).removeprefix(OPERATOR_PREFIX).lower()
        if op not in ROW_OPERATORS:
            op = "nequals" if op == "not_equals" else op
        if op not in ROW_OPERATORS:
            return None
        rows.append(Row(c.field, op, value_text(c.value) if c.HasField("value") else ""))
    return rows


def _json_object(errors: dict[str, str], slot: str, text: str, target: struct_pb2.Struct | None) -> Any:
    """A JSON object typed in a text area, into ``target``; its problem goes to ``errors``."""
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        errors[slot] = f"not JSON: {str(exc)[:160]}"
        return None
    if not isinstance(data, dict):
        errors[slot] = "must be a JSON object ({...})"
        return None
    if target is not None:
        try:
            json_format.ParseDict(data, target)
        except (json_format.ParseError, RecursionError, ValueError) as exc:
            errors[slot] = str(exc)[:200]
            return None
    return data


def _first(form: dict[str, list[str]], name: str) -> str:
    return (form.get(name) or [""])[0]


def _slot(path: str, slots: tuple[str, ...]) -> str:
    """The form field an api violation names (``rule.conditions[2].value`` -> ``conditions[2]``)."""
    for prefix in ("rule.inline.", "rule.", "trigger."):
        if path.startswith(prefix):
            path = path.removeprefix(prefix)
            break
    if m := re.match(r"conditions\[(\d+)\]", path):
        return f"conditions[{m.group(1)}]"
    name = re.split(r"[.\[]", path, maxsplit=1)[0]
    return name if name in slots else ""


# ---- the rule form -----------------------------------------------------------------------------


@dataclass
class RuleForm:
    """A rule as its form holds it: the text typed, never lost on a refusal."""

    ref: str = ""
    trigger_ref: str = ""
    label: str = ""
    description: str = ""
    action_ref: str = ""
    action_params: str = "{}"
    condition: str = "all"
    backstop: bool = False
    enabled: bool = True
    mode: str = "rows"
    rows: list[Row] = field(default_factory=list)
    conditions: str = "[]"
    event_id: str = ""
    payload: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    rows_possible: bool = True

    @classmethod
    def of_rule(cls, r: rule_pb2.Rule) -> RuleForm:
        rows = rows_of(r.conditions)
        return cls(
            ref=r.ref,
            trigger_ref=r.trigger_ref,
            label=r.label,
            description=r.description,
            action_ref=r.action_ref,
            action_params=pretty(r.action_params),
            condition="any" if r.condition == common_pb2.ENFORCEMENT_CONDITION_ANY else "all",
            backstop=r.backstop,
            enabled=r.enabled if r.HasField("enabled") else True,
            mode="rows" if rows is not None else "json",
            rows=rows or [],
            conditions=conditions_json(r.conditions),
            rows_possible=rows is not None,
        )

    @classmethod
    def of_form(cls, form: dict[str, list[str]]) -> RuleForm:
        fields, ops, values = form.get("row_field", []), form.get("row_operator", []), form.get("row_value", [])
        if max(len(fields), len(ops), len(values)) > limits.MAX_CONDITIONS + BLANK_ROWS * 2:
            raise Refused(400, f"conditions: at most {limits.MAX_CONDITIONS} rows")
        rows = [
            Row(f.strip(), o, v)
            for f, o, v in zip(fields, ops + [""] * len(fields), values + [""] * len(fields), strict=False)
        ]
        return cls(
            ref=_first(form, "ref").strip(),
            trigger_ref=_first(form, "trigger_ref").strip(),
            label=_first(form, "label"),
            description=_first(form, "description"),
            action_ref=_first(form, "action_ref").strip(),
            action_params=_first(form, "action_params"),
            condition="any" if _first(form, "condition") == "any" else "all",
            backstop=_first(form, "backstop") == "yes",
            enabled=_first(form, "enabled") == "yes",
            mode="json" if _first(form, "mode") == "json" else "rows",
            rows=[r for r in rows if r.field or r.value],
            conditions=_first(form, "conditions") or "[]",
            event_id=_first(form, "event_id").strip(),
            payload=_first(form, "payload"),
        )

    def shown_rows(self, extra: int = BLANK_ROWS) -> list[Row]:
        return self.rows + [Row() for _ in range(extra)]

    def build(self) -> tuple[rule_pb2.Rule, list[int]]:
        """The rule this form describes, and which row each condition came from; the problems
        the console can see go to ``errors`` (the api checks the rest)."""
        rule = rule_pb2.Rule(
            ref=self.ref,
            trigger_ref=self.trigger_ref,
            label=self.label,
            description=self.description,
            action_ref=self.action_ref,
            condition=common_pb2.ENFORCEMENT_CONDITION_ANY
            if self.condition == "any"
            else common_pb2.ENFORCEMENT_CONDITION_ALL,
            backstop=self.backstop,
            enabled=self.enabled,
        )
        _json_object(self.errors, "action_params", self.action_params, rule.action_params)
        origin: list[int] = []
        if self.mode == "rows":
            for i, row in enumerate(self.rows):
                if row.operator not in ROW_OPERATORS:
                    row.error = f"operator: one of {', '.join(ROW_OPERATORS)}"
                    continue
                c = rule.conditions.add(
                    field=row.field,
                    operator=condition_pb2.ConditionOperator.Value(OPERATOR_PREFIX + row.operator.upper()),
                )
                if row.operator not in NO_VALUE or row.value:
                    try:
                        json_format.ParseDict(value_of(row.value), c.value)
                    except (json_format.ParseError, RecursionError, ValueError) as exc:
                        row.error = f"value: {str(exc)[:160]}"
                origin.append(i)
        else:
            try:
                nodes = json.loads(self.conditions)
            except (ValueError, RecursionError) as exc:
                self.errors["conditions"] = f"not JSON: {str(exc)[:160]}"
                nodes = []
            if not isinstance(nodes, list):
                self.errors["conditions"] = "must be a JSON list of conditions ([...])"
                nodes = []
            if len(nodes) > limits.MAX_CONDITIONS:
                self.errors["conditions"] = f"at most {limits.MAX_CONDITIONS} conditions"
                nodes = []
            try:
                json_format.ParseDict({"conditions": _full_operators(nodes)}, rule)
            except (json_format.ParseError, RecursionError, ValueError) as exc:
                self.errors["conditions"] = str(exc)[:200]
            origin = list(range(len(rule.conditions)))
        return rule, origin

    def refused(self, exc: grpc.aio.AioRpcError, origin: list[int]) -> None:
        """The api's refusal, next to the fields it names (a row, in the rows editor)."""
        violations = field_violations(exc)
        if not violations:
            self.errors[""] = exc.details() or "refused"
        for path, why in violations:
            slot = _slot(path, RULE_SLOTS)
            if m := re.fullmatch(r"conditions\[(\d+)\]", slot):
                index = int(m.group(1))
                if self.mode == "rows" and index < len(origin):
                    row = self.rows[origin[index]]
                    row.error = "; ".join(filter(None, [row.error, f"{path.split('].', 1)[-1]}: {why}"]))
                    continue
                slot = "conditions"
            where = slot or ""
            self.errors[where] = "; ".join(
                filter(None, [self.errors.get(where, ""), f"{path}: {why}" if not slot else why])
            )

    def sync(self, rule: rule_pb2.Rule) -> None:
        """Both editors show the conditions that were read, whichever one was typed in."""
        if self.mode == "rows":
            self.conditions = conditions_json(rule.conditions)
        else:
            rows = rows_of(rule.conditions)
            self.rows_possible = rows is not None
            if rows is not None:
                self.rows = rows

    @property
    def ok(self) -> bool:
        return not self.errors and not any(r.error for r in self.rows)


def rule_text(r: rule_pb2.Rule) -> list[str]:
    """The editable part of a rule as lines a diff compares."""
    combine = "any one must hold" if r.condition == common_pb2.ENFORCEMENT_CONDITION_ANY else "all must hold"
    lines = [
        f"label: {r.label}",
        f"description: {r.description}",
        f"action: {r.action_ref or '(none: its enforcements resolve disabled)'}",
        f"backstop: {'yes' if r.backstop else 'no'}",
        f"conditions ({combine}):",
    ]
    lines += ["  " + line for line in conditions_json(r.conditions).splitlines()]
    lines.append("action parameters:")
    lines += ["  " + line for line in pretty(r.action_params).splitlines()]
    return lines


def diff(old: rule_pb2.Rule, new: rule_pb2.Rule) -> list[tuple[str, str]]:
    """Every line of the rule, marked ``-`` (removed), ``+`` (added) or `` `` (kept)."""
    out = []
    for line in difflib.ndiff(rule_text(old), rule_text(new)):
        if line.startswith("? "):
            continue
        out.append((line[0], line[2:]))
    return out


def rule_changes(old: rule_pb2.Rule, new: rule_pb2.Rule) -> list[str]:
    """The update mask of an edit: only what differs, so that a save never rewrites a field
    someone else changed meanwhile and the audit record holds the change only."""
    changed = [
        name for name in ("label", "description", "action_ref", "backstop") if getattr(old, name) != getattr(new, name)
    ]
    if (old.condition or common_pb2.ENFORCEMENT_CONDITION_ALL) != (
        new.condition or common_pb2.ENFORCEMENT_CONDITION_ALL
    ):
        changed.append("condition")
    if conditions_json(old.conditions) != conditions_json(new.conditions):
        changed.append("conditions")
    if pretty(old.action_params) != pretty(new.action_params):
        changed.append("action_params")
    return changed


def stamp(r: rule_pb2.Rule | rule_pb2.Trigger) -> str:
    """Which version of a record a form was opened on (its last change's time)."""
    return f"{r.updated.seconds}.{r.updated.nanos:09d}"


# ---- the trigger form --------------------------------------------------------------------------


@dataclass
class TriggerForm:
    ref: str = ""
    label: str = ""
    description: str = ""
    out_schema: str = ""
    param_schema: str = ""
    schema_mode: str = ""
    webhook_enabled: bool = False
    secret: str = "keep"
    webhook_secret: str = ""
    unsigned_ok: bool = False
    signed: bool = False
    errors: dict[str, str] = field(default_factory=dict)
    warn_unsigned: bool = False

    @classmethod
    def of_trigger(cls, t: rule_pb2.Trigger) -> TriggerForm:
        return cls(
            ref=t.ref,
            label=t.label,
            description=t.description,
            out_schema=pretty(t.out_schema) if t.HasField("out_schema") else "",
            param_schema=pretty(t.param_schema) if t.HasField("param_schema") else "",
            schema_mode=SCHEMA_MODE_NAMES.get(t.schema_mode, "off"),
            webhook_enabled=t.webhook_enabled,
            signed=t.webhook_signed,
        )

    @classmethod
    def of_form(cls, form: dict[str, list[str]], signed: bool = False) -> TriggerForm:
        secret = _first(form, "secret")
        return cls(
            ref=_first(form, "ref").strip(),
            label=_first(form, "label"),
            description=_first(form, "description"),
            out_schema=_first(form, "out_schema"),
            param_schema=_first(form, "param_schema"),
            schema_mode=_first(form, "schema_mode") if _first(form, "schema_mode") in SCHEMA_MODES else "",
            webhook_enabled=_first(form, "webhook_enabled") == "yes",
            secret=secret if secret in ("keep", "set", "remove") else "keep",
            webhook_secret=_first(form, "webhook_secret"),
            unsigned_ok=_first(form, "unsigned_ok") == "yes",
            signed=signed,
        )

    def build(self) -> rule_pb2.Trigger:
        t = rule_pb2.Trigger(
            ref=self.ref,
            label=self.label,
            description=self.description,
            webhook_enabled=self.webhook_enabled,
            schema_mode=SCHEMA_MODES.get(self.schema_mode, rule_pb2.SCHEMA_MODE_UNSPECIFIED),
        )
        for name in ("out_schema", "param_schema"):
            if getattr(self, name).strip():
                _json_object(self.errors, name, getattr(self, name), getattr(t, name))
        if self.secret == "set":
            if not self.webhook_secret:
                self.errors["webhook_secret"] = "type the secret, or choose to keep or remove it"
            t.webhook_secret = self.webhook_secret
        return t

    @property
    def signed_after(self) -> bool:
        return self.secret == "set" or (self.secret == "keep" and self.signed)

    def unsigned_needs_confirming(self, was_enabled: bool, was_signed: bool) -> bool:
        """Whether this save would newly open an unsigned webhook (enabling one without a secret,
        or removing the secret of an enabled one) without the person having said they mean it."""
        opens = self.webhook_enabled and not self.signed_after and (not was_enabled or was_signed)
        self.warn_unsigned = opens and not self.unsigned_ok
        return self.warn_unsigned

    def refused(self, exc: grpc.aio.AioRpcError) -> None:
        violations = field_violations(exc)
        if not violations:
            self.errors[""] = exc.details() or "refused"
        for path, why in violations:
            slot = _slot(path, TRIGGER_SLOTS)
            self.errors[slot] = "; ".join(filter(None, [self.errors.get(slot, ""), why if slot else f"{path}: {why}"]))


def _same_json(text: str, current: struct_pb2.Struct | None) -> bool:
    """Whether a schema as typed is the stored one (numbers compared as JSON, 3 == 3.0)."""
    typed = json.loads(text) if text.strip() else None
    stored = plain(json_format.MessageToDict(current)) if current is not None else None
    return json.dumps(plain(typed), sort_keys=True) == json.dumps(stored, sort_keys=True)


def trigger_changes(old: rule_pb2.Trigger, form: TriggerForm, new: rule_pb2.Trigger) -> list[str]:
    changed = [name for name in ("label", "description", "webhook_enabled") if getattr(old, name) != getattr(new, name)]
    for name in ("out_schema", "param_schema"):
        if not _same_json(getattr(form, name), getattr(old, name) if old.HasField(name) else None):
            changed.append(name)
    if form.schema_mode and SCHEMA_MODES[form.schema_mode] != old.schema_mode:
        changed.append("schema_mode")
    if form.secret == "set" or (form.secret == "remove" and old.webhook_signed):
        changed.append("webhook_secret")
    return changed


# ---- the pages ---------------------------------------------------------------------------------


class Editing:
    """The editing pages, rendered and guarded by the console (``Console.page``)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.api = console.api

    async def _form(self, request: Request, user: User) -> dict[str, list[str]]:
        """A posted editing form: CSRF checked first, then the operator role (a viewer's forged
        form is refused here, and would be by the api too: the call carries their token)."""
        form = await self.console.form_lists(request, user, EDIT_FORM_BYTES)
        self.console.operator(user)
        return form

    def _render(self, request: Request, user: User, template: str, status: int = 200, **ctx: Any) -> Response:
        return self.console.render(request, user, template, status, **ctx)

    # ---- rules ----

    async def new_rule(self, request: Request, user: User) -> Response:
        self.console.operator(user)
        form = RuleForm(trigger_ref=request.query_params.get("trigger_ref", "")[: limits.MAX_REF])
        return await self._rule_form(request, user, form, None)

    async def _rule_form(
        self,
        request: Request,
        user: User,
        form: RuleForm,
        stored: rule_pb2.Rule | None,
        status: int = 200,
        test: dict[str, Any] | None = None,
        extra_rows: int = BLANK_ROWS,
        notice: str = "",
        focus_row: int = 0,
    ) -> Response:
        triggers = await self.api.rules.ListTriggers(
            rule_pb2.ListTriggersRequest(page_size=200), **self.console.call(user)
        )
        if not form.ok and status == 200:
            status = 400
        return self._render(
            request,
            user,
            "rule_form.html",
            status,
            form=form,
            stored=stored,
            rows=form.shown_rows(extra_rows),
            operators=ROW_OPERATORS,
            triggers=[t.ref for t in triggers.triggers],
            test=test or {},
            form_notice=notice,
            focus_row=focus_row,
            action=f"/rules/{stored.ref}/edit" if stored else "/rules/new",
        )

    async def _test(self, user: User, form: RuleForm, rule: rule_pb2.Rule, origin: list[int]) -> dict[str, Any]:
        """TestRule with the rule as typed; the tester's own problems in its box, the rule's next
        to its fields."""
        test: dict[str, Any] = {}
        req = rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(inline=rule))
        if form.event_id:
            if (event_id := positive_id(form.event_id)) is None:
                return {"error": "event id: must be a positive whole number"}
            req.event_id = event_id
        else:
            errors: dict[str, str] = {}
            _json_object(errors, "payload", form.payload or "{}", req.payload)
            if errors:
                return {"error": f"payload: {errors['payload']}"}
        try:
            test["result"] = await self.api.rules.TestRule(req, **self.console.call(user))
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise
            mine = [(p, w) for p, w in field_violations(exc) if p.startswith("rule.")]
            if mine:
                form.refused(exc, origin)
                test["error"] = "the rule as typed is refused: see the fields marked"
            else:
                test["error"] = exc.details() or "refused"
        return test

    async def _validate(self, user: User, form: RuleForm, rule: rule_pb2.Rule, origin: list[int]) -> None:
        """The api's checks of a rule (as CreateRule makes them), without writing anything: a
        TestRule of the rule as typed on an empty payload."""
        req = rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(inline=rule), payload=struct_pb2.Struct())
        try:
            await self.api.rules.TestRule(req, **self.console.call(user))
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise
            form.refused(exc, origin)

    async def create_rule(self, request: Request, user: User) -> Response:
        fields = await self._form(request, user)
        form = RuleForm.of_form(fields)
        step = _first(fields, "step")
        rule, origin = form.build()
        if form.ok:
            form.sync(rule)
        if step == "rows":
            return await self._rule_form(
                request, user, form, None, extra_rows=BLANK_ROWS * 2, focus_row=len(form.rows) + 1
            )
        if step == "test":
            test = await self._test(user, form, rule, origin) if form.ok else {}
            return await self._rule_form(request, user, form, None, test=test)
        if form.ok:
            try:
                created = await self.api.rules.CreateRule(
                    rule_pb2.CreateRuleRequest(rule=rule), **self.console.call(user)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.ALREADY_EXISTS,
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ):
                    raise
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    form.errors["ref"] = exc.details() or "a rule with this ref exists"
                elif exc.code() == grpc.StatusCode.NOT_FOUND:
                    form.errors["trigger_ref"] = exc.details() or "no such trigger"
                else:
                    form.refused(exc, origin)
            else:
                log.info("console: %s created rule %s", user.name, created.ref)
                return RedirectResponse(f"/rules/{quote(created.ref)}?notice=created", status_code=303)
        return await self._rule_form(request, user, form, None)

    async def edit_rule(self, request: Request, user: User) -> Response:
        self.console.operator(user)
        stored = await self._get_rule(request, user)
        return await self._rule_form(request, user, RuleForm.of_rule(stored), stored)

    async def _get_rule(self, request: Request, user: User) -> rule_pb2.Rule:
        ref = request.path_params["ref"]
        return await self.api.rules.GetRule(rule_pb2.GetRuleRequest(ref=ref), **self.console.call(user))

    async def update_rule(self, request: Request, user: User) -> Response:
        fields = await self._form(request, user)
        stored = await self._get_rule(request, user)
        form = RuleForm.of_form(fields)
        # What cannot change is the stored rule's, whatever the form says.
        form.ref, form.trigger_ref, form.enabled = stored.ref, stored.trigger_ref, stored.enabled
        step = _first(fields, "step")
        rule, origin = form.build()
        if form.ok:
            form.sync(rule)
        if step == "rows":
            return await self._rule_form(
                request, user, form, stored, extra_rows=BLANK_ROWS * 2, focus_row=len(form.rows) + 1
            )
        if step == "test":
            test = await self._test(user, form, rule, origin) if form.ok else {}
            return await self._rule_form(request, user, form, stored, test=test)
        if step == "edit" or not form.ok:
            return await self._rule_form(request, user, form, stored)
        await self._validate(user, form, rule, origin)
        if not form.ok:
            return await self._rule_form(request, user, form, stored)
        changed = rule_changes(stored, rule)
        if not changed:
            return await self._rule_form(
                request, user, form, stored, notice="Nothing changed: there is nothing to save."
            )
        base = _first(fields, "base")
        if step != "save" or base != stamp(stored):
            # The confirmation: the diff against the rule as stored now. A save whose base is
            # not the stored version (someone changed it meanwhile) is shown the new diff again.
            return self._render(
                request,
                user,
                "rule_review.html",
                200 if step != "save" else 409,
                form=form,
                stored=stored,
                lines=diff(stored, rule),
                changed=changed,
                base=stamp(stored),
                moved=step == "save",
            )
        try:
            await self.api.rules.UpdateRule(
                rule_pb2.UpdateRuleRequest(
                    rule=rule_pb2.Rule(
                        id=stored.id,
                        label=rule.label,
                        description=rule.description,
                        action_ref=rule.action_ref,
                        action_params=rule.action_params,
                        conditions=rule.conditions,
                        condition=rule.condition,
                        backstop=rule.backstop,
                    ),
                    update_mask=field_mask_pb2.FieldMask(paths=changed),
                ),
                **self.console.call(user),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            form.refused(exc, origin)
            return await self._rule_form(request, user, form, stored)
        log.info("console: %s changed %s of rule %s", user.name, ", ".join(changed), stored.ref)
        return RedirectResponse(f"/rules/{quote(stored.ref)}?notice=saved", status_code=303)

    async def confirm_delete_rule(self, request: Request, user: User) -> Response:
        self.console.operator(user)
        stored = await self._get_rule(request, user)
        return self._render(request, user, "delete.html", kind="rule", ref=stored.ref, record=stored, rules=[])

    async def delete_rule(self, request: Request, user: User) -> Response:
        await self._form(request, user)
        ref = request.path_params["ref"]
        await self.api.rules.DeleteRule(rule_pb2.DeleteRuleRequest(ref=ref), **self.console.call(user))
        log.info("console: %s deleted rule %s", user.name, ref)
        return RedirectResponse("/rules?notice=rule-deleted", status_code=303)

    # ---- triggers ----

    def _trigger_form(
        self, request: Request, user: User, form: TriggerForm, stored: rule_pb2.Trigger | None, notice: str = ""
    ) -> Response:
        status = 400 if form.errors or form.warn_unsigned else 200
        return self._render(
            request,
            user,
            "trigger_form.html",
            status,
            form=form,
            stored=stored,
            modes=list(SCHEMA_MODES),
            warning=UNSIGNED_WARNING,
            form_notice=notice,
            min_secret=limits.MIN_WEBHOOK_SECRET,
            action=f"/triggers/{stored.ref}/edit" if stored else "/triggers/new",
        )

    async def new_trigger(self, request: Request, user: User) -> Response:
        self.console.operator(user)
        return self._trigger_form(request, user, TriggerForm(secret="set"), None)

    async def create_trigger(self, request: Request, user: User) -> Response:
        fields = await self._form(request, user)
        form = TriggerForm.of_form(fields)
        if form.secret == "keep":
            form.secret = "set" if form.webhook_secret else "remove"
        trigger = form.build()
        if form.errors or form.unsigned_needs_confirming(was_enabled=False, was_signed=False):
            return self._trigger_form(request, user, form, None)
        try:
            created = await self.api.rules.CreateTrigger(
                rule_pb2.CreateTriggerRequest(trigger=trigger), **self.console.call(user)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
                raise
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                form.errors["ref"] = exc.details() or "a trigger with this ref exists"
            else:
                form.refused(exc)
            return self._trigger_form(request, user, form, None)
        log.info("console: %s created trigger %s", user.name, created.ref)
        return RedirectResponse(f"/triggers/{quote(created.ref)}?notice=created", status_code=303)

    async def _get_trigger(self, request: Request, user: User) -> rule_pb2.Trigger:
        ref = request.path_params["ref"]
        return await self.api.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=ref), **self.console.call(user))

    async def edit_trigger(self, request: Request, user: User) -> Response:
        self.console.operator(user)
        stored = await self._get_trigger(request, user)
        return self._trigger_form(request, user, TriggerForm.of_trigger(stored), stored)

    async def update_trigger(self, request: Request, user: User) -> Response:
        fields = await self._form(request, user)
        stored = await self._get_trigger(request, user)
        form = TriggerForm.of_form(fields, signed=stored.webhook_signed)
        form.ref = stored.ref
        trigger = form.build()
        if form.errors or form.unsigned_needs_confirming(stored.webhook_enabled, stored.webhook_signed):
            return self._trigger_form(request, user, form, stored)
        changed = trigger_changes(stored, form, trigger)
        if not changed:
            return self._trigger_form(request, user, form, stored, notice="Nothing changed: there is nothing to save.")
        trigger.id = stored.id
        try:
            await self.api.rules.UpdateTrigger(
                rule_pb2.UpdateTriggerRequest(trigger=trigger, update_mask=field_mask_pb2.FieldMask(paths=changed)),
                **self.console.call(user),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            form.refused(exc)
            return self._trigger_form(request, user, form, stored)
        # The secret is never logged, only that it changed.
        log.info("console: %s changed %s of trigger %s", user.name, ", ".join(changed), stored.ref)
        return RedirectResponse(f"/triggers/{quote(stored.ref)}?notice=saved", status_code=303)

    async def confirm_delete_trigger(self, request: Request, user: User) -> Response:
        self.console.operator(user)
        stored = await self._get_trigger(request, user)
        rules = await self.api.rules.ListRules(
            rule_pb2.ListRulesRequest(trigger_ref=stored.ref, page_size=50), **self.console.call(user)
        )
        return self._render(
            request, user, "delete.html", kind="trigger", ref=stored.ref, record=stored, rules=list(rules.rules)
        )

    async def delete_trigger(self, request: Request, user: User) -> Response:
        await self._form(request, user)
        ref = request.path_params["ref"]
        await self.api.rules.DeleteTrigger(rule_pb2.DeleteTriggerRequest(ref=ref), **self.console.call(user))
        log.info("console: %s deleted trigger %s", user.name, ref)
        return RedirectResponse("/triggers?notice=trigger-deleted", status_code=303)
