"""Conversions between protobuf messages and the data-access layer's rows: the one place."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from services.api import conditions, store
from shared.gen.automation.v1 import (
    analytics_pb2,
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


def set_value(out: struct_pb2.Value, value: Any) -> None:
    """Fills a protobuf Value from JSON data in place.

    Struct.update does the same through many abstract type checks per field; list pages
    convert thousands of fields, so this tests the concrete JSON types directly.
    """
    kind = type(value)
    if kind is str:
        out.string_value = value
    elif kind is bool:
        out.bool_value = value
    elif kind is int or kind is float:
        out.number_value = value
    elif kind is dict:
        fill_struct(out.struct_value, value)
    elif kind is list:
        values = out.list_value.values
        out.list_value.SetInParent()
        for item in value:
            set_value(values.add(), item)
    elif value is None:
        out.null_value = struct_pb2.NULL_VALUE
    else:
        raise TypeError(f"not JSON data: {kind.__name__}")


def fill_struct(out: struct_pb2.Struct, value: dict[str, Any]) -> None:
    out.SetInParent()
    fields = out.fields
    for key, item in value.items():
        set_value(fields[key], item)


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        fill_struct(out, value)
    return out


def list_value(value: list[Any]) -> struct_pb2.ListValue:
    out = struct_pb2.ListValue()
    for item in value:
        set_value(out.values.add(), item)
    return out


def event(e: store.Event) -> common_pb2.Event:
    msg = common_pb2.Event(id=e.id, trigger_ref=e.trigger_ref, source_ref=e.source_ref or "", rule_ref=e.rule_ref or "")
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
    return msg


def enforcement(e: store.Enforcement) -> common_pb2.Enforcement:
    msg = common_pb2.Enforcement(
        id=e.id,
        rule_ref=e.rule_ref,
        trigger_ref=e.trigger_ref,
        status=ENFORCEMENT_STATUS[e.status],
        condition=CONDITION[e.condition],
    )
    fill_struct(msg.payload, e.payload)
    for node in e.conditions:
        condition_node(msg.conditions.add(), node)
    set_ts(msg.created, e.created)
    if e.config is not None:
        fill_struct(msg.config, e.config)
    if e.rule is not None:
        msg.rule = e.rule
    if e.event is not None:
        msg.event = e.event
    if e.resolved_at is not None:
        set_ts(msg.resolved_at, e.resolved_at)
    return msg


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


def event_volume(v: store.EventVolume) -> analytics_pb2.EventVolumeBucket:
    return analytics_pb2.EventVolumeBucket(bucket=ts(v.bucket), trigger_ref=v.trigger_ref, event_count=v.event_count)


def enforcement_volume(v: store.EnforcementVolume) -> analytics_pb2.EnforcementVolumeBucket:
    return analytics_pb2.EnforcementVolumeBucket(
        bucket=ts(v.bucket),
        rule_ref=v.rule_ref,
        status=ENFORCEMENT_STATUS[v.status],
        enforcement_count=v.enforcement_count,
    )
