"""Turning api messages into HTML: the Jinja environment and the filters templates use.

Everything a page shows is rendered here, on the server; the browser's script only swaps in
fragments the server rendered (live updates) and shows timestamps in the viewer's local time.
Autoescaping is on for every template: payloads are arbitrary sender data.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape

from shared.gen.automation.v1 import audit_pb2, common_pb2, condition_pb2, enforcement_pb2, execution_pb2

HERE = Path(__file__).resolve().parent

STATUS_NAMES: dict[int, str] = {
    common_pb2.ENFORCEMENT_STATUS_CREATED: "created",
    common_pb2.ENFORCEMENT_STATUS_PROCESSED: "processed",
    common_pb2.ENFORCEMENT_STATUS_DISABLED: "disabled",
}
STATUS_BY_NAME: dict[str, int] = {v: k for k, v in STATUS_NAMES.items()}


def timestamp(ts: Timestamp | None, missing: str = "") -> Markup:
    """A ``<time>`` the page script shows in local time, with UTC on hover."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return Markup('<span class="muted">{}</span>').format(missing)
    at = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC)
    iso = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    utc = at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(iso, utc, utc)


def field_time(message: Message, name: str, missing: str = "") -> Markup:
    return timestamp(getattr(message, name) if message.HasField(name) else None, missing)


def status_badge(status: int) -> Markup:
    name = STATUS_NAMES.get(status, "unknown")
    return Markup('<span class="badge badge-{}" data-status="{}">{}</span>').format(name, name, name)


def execution_badge(status: execution_pb2.ExecutionStatus.ValueType) -> Markup:
    name = execution_pb2.ExecutionStatus.Name(status).removeprefix("EXECUTION_STATUS_").lower()
    kind = {"completed": "processed", "failed": "failed", "timeout": "failed", "abandoned": "failed"}.get(name, "")
    return Markup('<span class="badge badge-{}">{}</span>').format(kind or "neutral", name)


def plain(value: Any) -> Any:
    """JSON as a person wrote it: Struct keeps every number as a double, so 3 would show as 3.0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def pretty(message: Message | None) -> str:
    """A Struct (or any message) as indented JSON, keys sorted: a Struct is a map, whose
    order protobuf does not keep (nor does jsonb), so sorting is what makes it stable."""
    if message is None:
        return "{}"
    return json.dumps(plain(json_format.MessageToDict(message)), indent=2, ensure_ascii=False, sort_keys=True)


def value_json(message: Message, name: str) -> str:
    """A google.protobuf.Value field as compact JSON ("" when unset)."""
    if not message.HasField(name):
        return ""
    return json.dumps(plain(json_format.MessageToDict(getattr(message, name))), ensure_ascii=False, sort_keys=True)


def compact(message: Message | None) -> str:
    """A Struct as one line of JSON, keys sorted (a table cell's preview)."""
    if message is None:
        return "{}"
    return json.dumps(plain(json_format.MessageToDict(message)), ensure_ascii=False, sort_keys=True)


def attempt_outcome(outcome: enforcement_pb2.AttemptOutcome.ValueType) -> Markup:
    name = enforcement_pb2.AttemptOutcome.Name(outcome).removeprefix("ATTEMPT_OUTCOME_").lower()
    kind = {"exhausted": "failed", "lease_expired": "created", "retried": "processed"}.get(name, "neutral")
    return Markup('<span class="badge badge-{}">{}</span>').format(kind, name.replace("_", " "))


def audit_target(r: audit_pb2.AuditRecord) -> Markup:
    """What an audit record changed, linked to its page where it has one."""
    kind, ref = r.entity_type, r.entity_ref
    if kind == "rule" and ref:
        return Markup('rule <a href="/rules/{}">{}</a>').format(ref, ref)
    if kind == "trigger" and ref:
        return Markup('trigger <a href="/triggers/{}">{}</a>').format(ref, ref)
    if kind == "enforcement" and r.HasField("entity_id"):
        return Markup('enforcement <a href="/enforcements/{}">{}</a>').format(r.entity_id, r.entity_id)
    if kind == "enforcement":
        # A bulk retry: one record naming every enforcement it retried.
        ids = r.change.fields["enforcements"].list_value.values if "enforcements" in r.change.fields else []
        first = [int(v.number_value) for v in ids[:5]]
        links = Markup(", ").join(Markup('<a href="/enforcements/{}">{}</a>').format(i, i) for i in first)
        more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
        return Markup("{} enforcements: {}{}").format(len(ids), links, more)
    return Markup("{} <code>{}</code>").format(kind, ref or (r.entity_id if r.HasField("entity_id") else ""))


def operator_name(op: condition_pb2.ConditionOperator.ValueType) -> str:
    return condition_pb2.ConditionOperator.Name(op).removeprefix("CONDITION_OPERATOR_").lower()


def condition_tree(nodes: Any) -> Markup:
    """A rule's condition tree as nested lists: groups, tests and search items."""

    def node(n: condition_pb2.RuleCondition) -> Markup:
        for kind in ("all", "any"):
            if children := getattr(n, kind):
                inner = Markup("").join(node(c) for c in children)
                return Markup('<li><span class="group">{}</span><ul>{}</ul></li>').format(kind, inner)
        if n.HasField("not"):
            return Markup('<li><span class="group">not</span><ul>{}</ul></li>').format(node(getattr(n, "not")))
        item = Markup("")
        if n.HasField("item"):
            item = Markup('<ul><li><span class="group">each item</span><ul>{}</ul></li></ul>').format(node(n.item))
        return Markup('<li><code>{}</code> <span class="op">{}</span> <code>{}</code>{}</li>').format(
            n.field, operator_name(n.operator), value_json(n, "value"), item
        )

    items = list(nodes)
    if not items:
        return Markup('<p class="muted">No conditions: every event of the trigger matches.</p>')
    return Markup('<ul class="tree">{}</ul>').format(Markup("").join(node(n) for n in items))


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ts=timestamp,
        status=status_badge,
        execution_status=execution_badge,
        pretty=pretty,
        tree=condition_tree,
        duration=duration,
        operator=operator_name,
        compact=compact,
        outcome=attempt_outcome,
    )
    env.globals.update(
        field_time=field_time,
        value_json=value_json,
        STATUS_NAMES=STATUS_NAMES,
        escape=escape,
        audit_target=audit_target,
        EXECUTION_STATUS_NAMES=[
            execution_pb2.ExecutionStatus.Name(v).removeprefix("EXECUTION_STATUS_").lower()
            for v in execution_pb2.ExecutionStatus.values()
            if v
        ],
        # The api's audit ENTITY_TYPES (the web service does not import the api's code).
        AUDITED_ENTITIES=("enforcement", "event", "execution", "rule", "token", "trigger"),
    )
    return env


def macros(env: Environment, template: str) -> Any:
    """A template's macros, to render one fragment (``macros(env, "_rows.html").event_row(e)``)."""
    return env.get_template(template).module
