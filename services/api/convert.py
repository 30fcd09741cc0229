"""Conversions between protobuf messages and the data-access layer's rows: the one place."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from services.api import conditions, store
from shared.gen.automation.v1 import (
    audit_pb2,
    common_pb2,
    condition_pb2,
    enforcement_pb2,
    execution_pb2,
    history_pb2,
    rule_pb2,
)

ENFORCEMENT_STATUS = {
    "created": common_pb2.ENFORCEMENT_STATUS_CREATED,
    "processed": common_pb2.ENFORCEMENT_STATUS_PROCESSED,
    "disabled": common_pb2.ENFORCEMENT_STATUS_DISABLED,
}
ENFORCEMENT_STATUS_NAME = {v: k for k, v in ENFORCEMENT_STATUS.items()}
CONDITION = {"all": common_pb2.ENFORCEMENT_CONDITION_ALL, "any": common_pb2.ENFORCEMENT_CONDITION_ANY}
CONDITION_NAME = {v: k for k, v in CONDITION.items()} | {common_pb2.ENFORCEMENT_CONDITION_UNSPECIFIED: "all"}
EXECUTION_STATUS = {
    name.removeprefix("EXECUTION_STATUS_").lower(): number
    for name, number in execution_pb2.ExecutionStatus.items()
    if number != execution_pb2.EXECUTION_STATUS_UNSPECIFIED
}
EXECUTION_STATUS_NAME = {v: k for k, v in EXECUTION_STATUS.items()}
OPERATOR = {
    name: condition_pb2.ConditionOperator.Value("CONDITION_OPERATOR_" + name.upper())
    for name in sorted(conditions.OPERATORS)
}
OPERATOR_NAME = {v: k for k, v in OPERATOR.items()}
"""Operator number -> stored name (NOT_EQUALS is NEQUALS's alias: the same number)."""


SCHEMA_MODE = {
    "off": rule_pb2.SCHEMA_MODE_OFF,
    "warn": rule_pb2.SCHEMA_MODE_WARN,
    "enforce": rule_pb2.SCHEMA_MODE_ENFORCE,
}
SCHEMA_MODE_NAME = {v: k for k, v in SCHEMA_MODE.items()}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_ts(out: timestamp_pb2.Timestamp, value: datetime) -> None:
    """Fills a Timestamp in place (faster than FromDatetime, which is pure Python)."""
    delta = value - _EPOCH
    out.seconds = delta.days * 86400 + delta.seconds
    out.nanos = delta.microseconds * 1000


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    set_ts(out, value)
    return out


def from_ts(value: timestamp_pb2.Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


# List pages convert thousands of JSON values per call, so these test the concrete JSON types
# directly (Struct.update goes through many abstract type checks per field) and handle the
# scalars of objects and lists in line, without a call per value. An int is stored as
# float(value): upb converts an int to a double several times slower than float() does, with
# the same rounding and the same OverflowError past the largest double.


def set_value(out: struct_pb2.Value, value: Any) -> None:
    """Fills a protobuf Value from JSON data in place."""
    kind = type(value)
    if kind is str:
        out.string_value = value
    elif kind is float:
        out.number_value = value
    elif kind is int:
        out.number_value = float(value)
    elif kind is bool:
        out.bool_value = value
    elif kind is dict:
        fill_struct(out.struct_value, value)
    elif kind is list:
        out.list_value.SetInParent()
        _fill_list(out.list_value.values, value)
    elif value is None:
        out.null_value = struct_pb2.NULL_VALUE
    else:
        raise TypeError(f"not JSON data: {kind.__name__}")


def fill_struct(out: struct_pb2.Struct, value: dict[str, Any]) -> None:
    if not value:
        out.SetInParent()  # present, though empty (a field of its own sets it otherwise)
        return
    fields = out.fields
    for key, item in value.items():
        kind = type(item)
        if kind is str:
            fields[key].string_value = item
        elif kind is float:
            fields[key].number_value = item
        elif kind is int:
            fields[key].number_value = float(item)
        else:
            set_value(fields[key], item)


def _fill_list(values: Any, items: list[Any]) -> None:
    add = values.add
    for item in items:
        kind = type(item)
        if kind is str:
            add().string_value = item
        elif kind is float:
            add().number_value = item
        elif kind is int:
            add().number_value = float(item)
        else:
            set_value(add(), item)


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        fill_struct(out, value)
    return out


def list_value(value: list[Any]) -> struct_pb2.ListValue:
    out = struct_pb2.ListValue()
    _fill_list(out.values, value)
    return out


def event(e: store.Event) -> common_pb2.Event:
    msg = common_pb2.Event()
    fill_event(msg, e)
    return msg


def fill_event(msg: common_pb2.Event, e: store.Event) -> None:
    """Fills an empty Event in place: a list page adds its messages to the response itself
    rather than copying each one in."""
    msg.id = e.id
    msg.trigger_ref = e.trigger_ref
    if e.source_ref:
        msg.source_ref = e.source_ref
    if e.rule_ref:
        msg.rule_ref = e.rule_ref
    fill_struct(msg.payload, e.payload)
    set_ts(msg.created, e.created)
    if e.config is not None:
        fill_struct(msg.config, e.config)
    if e.trigger is not None:
        msg.trigger = e.trigger
    if e.source is not None:
        msg.source = e.source
    if e.rule is not None:
        msg.rule = e.rule
    if e.reemit_of is not None:
        msg.reemit_of = e.reemit_of
    if e.schema_version is not None:
        msg.schema_version = e.schema_version
    if e.schema_errors:
        msg.nonconforming = True
        msg.schema_errors.extend(e.schema_errors)


def enforcement(e: store.Enforcement) -> common_pb2.Enforcement:
    msg = common_pb2.Enforcement()
    fill_enforcement(msg, e)
    return msg


def fill_enforcement(msg: common_pb2.Enforcement, e: store.Enforcement) -> None:
    """Fills an empty Enforcement in place (see ``fill_event``)."""
    msg.id = e.id
    msg.rule_ref = e.rule_ref
    msg.trigger_ref = e.trigger_ref
    msg.status = ENFORCEMENT_STATUS[e.status]
    msg.condition = CONDITION[e.condition]
    fill_struct(msg.payload, e.payload)
    if e.conditions:
        add = msg.conditions.add
        for node in e.conditions:
            condition_node(add(), node)
    set_ts(msg.created, e.created)
    if e.config is not None:
        fill_struct(msg.config, e.config)
    if e.rule is not None:
        msg.rule = e.rule
    if e.event is not None:
        msg.event = e.event
    if e.resolved_at is not None:
        set_ts(msg.resolved_at, e.resolved_at)


def execution(x: store.Execution) -> execution_pb2.Execution:
    msg = execution_pb2.Execution(
        id=x.id,
        action_ref=x.action_ref,
        config=struct(x.config),
        status=EXECUTION_STATUS[x.status],
        created=ts(x.created),
        updated=ts(x.updated),
    )
    if x.enforcement is not None:
        msg.enforcement = x.enforcement
    if x.parent is not None:
        msg.parent = x.parent
    if x.executor is not None:
        msg.executor = x.executor
    if isinstance(x.result, dict):
        msg.result.CopyFrom(struct(x.result))
    return msg


def trigger(t: store.Trigger) -> rule_pb2.Trigger:
    msg = rule_pb2.Trigger(
        id=t.id,
        ref=t.ref,
        pack_ref=t.pack_ref,
        label=t.label,
        description=t.description,
        created=ts(t.created),
        updated=ts(t.updated),
        webhook_enabled=t.webhook_enabled,
        webhook_key=t.webhook_key,
        webhook_signed=t.webhook_signed,
        schema_mode=SCHEMA_MODE[t.schema_mode],
        schema_version=t.schema_version,
    )
    if t.param_schema is not None:
        msg.param_schema.CopyFrom(struct(t.param_schema))
    if t.out_schema is not None:
        msg.out_schema.CopyFrom(struct(t.out_schema))
    if t.updated_by is not None:
        msg.updated_by = t.updated_by
    return msg


def condition_node(out: condition_pb2.RuleCondition, node: dict[str, Any]) -> None:
    """Fills a RuleCondition from a stored JSON node (rules and enforcement snapshots alike)."""
    for kind in ("all", "any"):
        if kind in node:
            group = getattr(out, kind)
            for child in node[kind]:
                condition_node(group.add(), child)
            return
    if "not" in node:
        condition_node(getattr(out, "not"), node["not"])
        return
    out.field = node["field"]
    out.operator = OPERATOR[conditions.operator_name(node["operator"])]
    if "value" in node:
        set_value(out.value, node["value"])
    if "item" in node:
        condition_node(out.item, node["item"])


def rule(r: store.Rule) -> rule_pb2.Rule:
    msg = rule_pb2.Rule(
        id=r.id,
        ref=r.ref,
        pack_ref=r.pack_ref,
        label=r.label,
        description=r.description,
        trigger_ref=r.trigger_ref,
        action_ref=r.action_ref or "",
        action_params=struct(r.action_params),
        condition=CONDITION[r.condition],
        enabled=r.enabled,
        created=ts(r.created),
        updated=ts(r.updated),
    )
    for node in r.conditions:
        condition_node(msg.conditions.add(), node)
    if r.backstop:
        msg.backstop = True
    if r.trigger is not None:
        msg.trigger = r.trigger
    if r.updated_by is not None:
        msg.updated_by = r.updated_by
    return msg


def history(h: store.HistoryRecord) -> history_pb2.HistoryRecord:
    return history_pb2.HistoryRecord(
        id=h.id,
        time=ts(h.time),
        operation=h.operation,
        entity_id=h.entity_id,
        entity_ref=h.entity_ref or "",
        changed_fields=h.changed_fields,
        old_values=struct(h.old_values),
        new_values=struct(h.new_values),
    )


def audit_record(a: store.AuditRecord) -> audit_pb2.AuditRecord:
    msg = audit_pb2.AuditRecord(
        id=a.id,
        time=ts(a.time),
        principal=a.principal,
        rpc=a.rpc,
        entity_type=a.entity_type,
        entity_ref=a.entity_ref or "",
        change=struct(a.change),
    )
    if a.entity_id is not None:
        msg.entity_id = a.entity_id
    return msg


def delivery(d: store.Delivery) -> enforcement_pb2.WatchEnforcementsResponse:
    return enforcement_pb2.WatchEnforcementsResponse(
        delivery=enforcement_pb2.Delivery(
            enforcement=enforcement(d.enforcement), attempt=d.attempt, lease_expires_at=ts(d.lease_expires_at)
        )
    )


def fill_event_volume(repeated: Any, rows: list[store.EventVolume]) -> None:
    """Adds the buckets to a response's repeated field in place (thousands per answer: each
    message is filled where it lies, with no copy and no keyword parsing)."""
    add = repeated.add
    for seconds, trigger_ref, count in rows:
        b = add()
        b.bucket.seconds = seconds
        b.trigger_ref = trigger_ref
        b.event_count = count


def fill_enforcement_volume(repeated: Any, rows: list[store.EnforcementVolume]) -> None:
    """As ``fill_event_volume``."""
    add = repeated.add
    status = ENFORCEMENT_STATUS
    for seconds, rule_ref, name, count in rows:
        b = add()
        b.bucket.seconds = seconds
        b.rule_ref = rule_ref
        b.status = status[name]
        b.enforcement_count = count
