"""Trigger schemas over real gRPC on a real PostgreSQL: compiled and bounded when stored, enforced
(or warned about) on every way in, audited when changed, and each event keeping the version it
was checked against. Nothing refused is half-written."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2, json_format

from services.api.schemas import MAX_SCHEMA_NODES
from shared import limits
from shared.gen.automation.v1 import audit_pb2, audit_pb2_grpc, condition_pb2, event_pb2, rule_pb2, rule_pb2_grpc
from tests.conftest import Stubs
from tests.helpers import (
    TOKENS,
    channel,
    count,
    eventually,
    field_violations,
    holds,
    new_event,
    rpc_error,
    rule,
    struct,
    web_service,
)

T = "demo.typed"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["repo"],
    "properties": {
        "repo": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z]+$"}},
        },
        "n": {"type": "integer", "maximum": 10},
    },
}
GOOD = {"repo": {"name": "api"}, "n": 3}
BAD = {"repo": {"name": 7}, "n": 3}
INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION


async def typed(stubs: Stubs, mode: int = rule_pb2.SCHEMA_MODE_UNSPECIFIED, **kw: Any) -> rule_pb2.Trigger:
    trigger: rule_pb2.Trigger = await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(
            trigger=rule_pb2.Trigger(ref=T, out_schema=struct(SCHEMA), schema_mode=mode, **kw)  # type: ignore[arg-type]
        )
    )
    return trigger


async def set_schema(stubs: Stubs, schema: dict[str, Any] | None, mode: int | None = None) -> rule_pb2.Trigger:
    t = rule_pb2.Trigger(ref=T)
    paths = ["out_schema"]
    if schema is not None:
        t.out_schema.CopyFrom(struct(schema))
    if mode is not None:
        t.schema_mode = mode  # type: ignore[assignment]
        paths.append("schema_mode")
    trigger: rule_pb2.Trigger = await stubs.rules.UpdateTrigger(
        rule_pb2.UpdateTriggerRequest(trigger=t, update_mask=field_mask_pb2.FieldMask(paths=paths))
    )
    return trigger


# ---- stored schemas --------------------------------------------------------------------------


async def test_a_new_schema_is_enforced_by_default_and_versioned(stubs: Stubs) -> None:
    trigger = await typed(stubs)
    assert trigger.schema_mode == rule_pb2.SCHEMA_MODE_ENFORCE
    assert trigger.schema_version == 1
    plain = await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="demo.plain")))
    assert plain.schema_mode == rule_pb2.SCHEMA_MODE_OFF
    changed = await set_schema(stubs, {**SCHEMA, "title": "v2"})
    assert changed.schema_version == 2
    same = await set_schema(stubs, {**SCHEMA, "title": "v2"})
    assert same.schema_version == 2, "the same schema again is no new version"


@pytest.mark.parametrize(
    ("schema", "field", "words"),
    [
        ({"properties": {"a": {"type": "nope"}}}, "trigger.out_schema.properties.a.type", "anyOf"),
        ({"$ref": "https://example.com/s.json"}, "trigger.out_schema['$ref']", "inside the schema"),
        ({"$id": "https://example.com/s", "$ref": "other.json"}, "trigger.out_schema['$ref']", "inside the schema"),
        ({"$ref": "#"}, "trigger.out_schema['$ref']", "cycle"),
        (
            {
                "$defs": {"a": {"properties": {"x": {"$ref": "#/$defs/b"}}}, "b": {"items": {"$ref": "#/$defs/a"}}},
                "$ref": "#/$defs/a",
            },
            "trigger.out_schema['$defs'].b.items['$ref']",
            "cycle",
        ),
        ({"$ref": "#/$defs/missing"}, "trigger.out_schema['$ref']", "points at nothing"),
        ({"properties": {"a": {"pattern": "(a)\\1"}}}, "trigger.out_schema.properties.a.pattern", "regex"),
        ({"pattern": "a{1000}{1000}"}, "trigger.out_schema.pattern", "regex"),
        ({"$schema": "http://example.com/mine"}, "trigger.out_schema.$schema", "draft"),
        ({"$dynamicRef": "#x"}, "trigger.out_schema['$dynamicRef']", "not supported"),
        ({"$defs": {"x": {"$id": "https://other/x"}}}, "trigger.out_schema['$defs'].x['$id']", "embedded"),
    ],
)
async def test_a_schema_that_does_not_compile_is_refused_naming_its_node(
    stubs: Stubs, conn: asyncpg.Connection, schema: dict[str, Any], field: str, words: str
) -> None:
    exc = await rpc_error(
        stubs.rules.CreateTrigger(
            rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T, out_schema=struct(schema)))
        ),
        INVALID,
    )
    assert words in field_violations(exc)[field]
    assert await count(conn, "trigger") == 0


async def test_a_schema_that_expands_past_the_limit_is_refused_in_bounded_time(stubs: Stubs) -> None:
    # Each level doubles the subschemas a $ref-inlining validator would visit: 2^30 unbounded.
    defs: dict[str, Any] = {f"a{i}": {"anyOf": [{"$ref": f"#/$defs/a{i + 1}"}] * 2} for i in range(30)}
    defs["a30"] = {"type": "string"}
    exc = await rpc_error(
        stubs.rules.CreateTrigger(
            rule_pb2.CreateTriggerRequest(
                trigger=rule_pb2.Trigger(ref=T, out_schema=struct({"$defs": defs, "$ref": "#/$defs/a0"}))
            )
        ),
        INVALID,
    )
    assert f"{MAX_SCHEMA_NODES:,} subschemas" in field_violations(exc)["trigger.out_schema"]


async def test_older_drafts_are_accepted(stubs: Stubs) -> None:
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "properties": {"n": {"type": "integer"}}}
    await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T, out_schema=struct(schema)))
    )
    await rpc_error(stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, {"n": "x"}))), INVALID)


async def test_schema_changes_are_audited_old_and_new(stubs: Stubs) -> None:
    await typed(stubs)
    await set_schema(stubs, {"type": "object"}, rule_pb2.SCHEMA_MODE_WARN)
    audit: audit_pb2_grpc.AuditServiceAsyncStub = audit_pb2_grpc.AuditServiceStub(stubs.channel)
    records = await audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(entity_type="trigger", entity_ref=T))
    update = next(r for r in records.records if r.rpc.endswith("UpdateTrigger"))
    change = json_format.MessageToDict(update.change)
    assert set(change) >= {"out_schema", "schema_mode", "schema_version"}, change


# ---- enforced on every way in ----------------------------------------------------------------


async def test_enforce_refuses_naming_the_payload_path_and_keyword(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await typed(stubs)
    ok = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, GOOD)))
    assert ok.event.schema_version == 1 and not ok.event.nonconforming
    exc = await rpc_error(stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, BAD))), INVALID)
    assert field_violations(exc) == {"event.payload.repo.name": 'type: 7 is not of type "string"'}
    exc = await rpc_error(
        stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, {"n": 11}))), INVALID
    )
    violations = field_violations(exc)
    assert violations["event.payload"].startswith("required:"), violations
    assert violations["event.payload.n"].startswith("maximum:"), violations
    assert await count(conn, "event") == 1


async def test_create_events_names_every_failing_event_and_stores_none(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await typed(stubs)
    events = [new_event(T, GOOD), new_event(T, BAD), new_event(T, GOOD), new_event(T, {"repo": {"name": "ABC"}})]
    exc = await rpc_error(stubs.events.CreateEvents(event_pb2.CreateEventsRequest(events=events)), INVALID)
    violations = field_violations(exc)
    assert set(violations) == {"events[1].payload.repo.name", "events[3].payload.repo.name"}
    assert violations["events[3].payload.repo.name"].startswith("pattern:")
    assert await count(conn, "event") == 0


async def test_errors_stay_bounded_for_a_payload_failing_everywhere(stubs: Stubs, conn: asyncpg.Connection) -> None:
    schema = {"additionalProperties": {"type": "integer"}}
    await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T, out_schema=struct(schema)))
    )
    payload = {f"k{i}\u00e9\u2603": "x\x01" * 300 for i in range(50)}
    events = [new_event(T, payload) for _ in range(20)]
    exc = await rpc_error(stubs.events.CreateEvents(event_pb2.CreateEventsRequest(events=events)), INVALID)
    details = exc.details() or ""
    assert len(details) <= limits.MAX_ERROR_MESSAGE and details.isascii()
    assert len(field_violations(exc)) <= limits.MAX_VIOLATIONS + 1
    assert await count(conn, "event") == 0


async def test_warn_stores_and_marks_the_event(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await typed(stubs, rule_pb2.SCHEMA_MODE_WARN)
    made = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, BAD)))
    assert made.event.nonconforming and made.event.schema_version == 1
    assert list(made.event.schema_errors) == ['event.payload.repo.name: type: 7 is not of type "string"']
    got = await stubs.events.GetEvent(event_pb2.GetEventRequest(id=made.event.id))
    assert got.nonconforming and list(got.schema_errors) == list(made.event.schema_errors)
    listed = await stubs.events.ListEvents(event_pb2.ListEventsRequest(trigger_ref=T))
    assert listed.events[0].nonconforming
    good = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, GOOD)))
    assert not good.event.nonconforming and good.event.schema_version == 1


async def test_off_checks_nothing(stubs: Stubs) -> None:
    await typed(stubs, rule_pb2.SCHEMA_MODE_OFF)
    made = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, BAD)))
    assert not made.event.HasField("schema_version") and not made.event.nonconforming


async def test_a_schema_change_is_used_from_its_commit_and_events_keep_their_version(stubs: Stubs) -> None:
    await typed(stubs)
    first = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, GOOD)))
    await set_schema(stubs, {"type": "object", "required": ["n"], "properties": {"n": {"type": "string"}}})
    await rpc_error(stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, GOOD))), INVALID)
    later = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, {"n": "x"})))
    assert (first.event.schema_version, later.event.schema_version) == (1, 2)
    again = await stubs.events.GetEvent(event_pb2.GetEventRequest(id=first.event.id))
    assert again.schema_version == 1
    # Removing the schema stops the checks at once.
    await set_schema(stubs, None)
    loose = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, BAD)))
    assert not loose.event.HasField("schema_version")


async def test_a_schema_change_with_events_in_flight_checks_each_against_the_version_it_stores(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    """Ingest keeps going, unary and batched, while the schema changes from one that needs
    ``a`` to one that needs ``b``: every stored event conforms to the version it records, and
    every refused one broke the version in effect (nothing stored for it)."""
    v1 = {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}}
    v2 = {"type": "object", "required": ["b"], "properties": {"b": {"type": "string"}}}
    await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T, out_schema=struct(v1)))
    )
    shapes = [{"a": "x"}, {"b": "y"}, {"a": "x", "b": "y"}]
    outcomes: list[tuple[dict[str, Any], int | None]] = []
    stop = asyncio.Event()

    async def sensor(k: int) -> None:
        n = 0
        while not stop.is_set():
            payload = {**shapes[(n + k) % 3], "k": k, "n": n}
            n += 1
            if n % 4 == 0:
                try:
                    got = await stubs.events.CreateEvents(
                        event_pb2.CreateEventsRequest(events=[new_event(T, payload), new_event(T, {**payload, "m": 1})])
                    )
                    outcomes.append((payload, len(got.receipts)))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == INVALID, exc
                    outcomes.append((payload, None))
                continue
            try:
                await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, payload)))
                outcomes.append((payload, 1))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == INVALID, exc
                outcomes.append((payload, None))

    sensors = [asyncio.create_task(sensor(k)) for k in range(4)]
    await eventually(holds(lambda: len(outcomes) >= 40), what="events before the change")
    await set_schema(stubs, v2)
    seen = len(outcomes)
    await eventually(holds(lambda: len(outcomes) >= seen + 40), what="events after the change")
    stop.set()
    await asyncio.gather(*sensors)
    rows = [
        (r["schema_version"], json.loads(r["payload"]))
        for r in await conn.fetch("SELECT payload, schema_version FROM event WHERE trigger_ref = $1", T)
    ]
    required = {1: "a", 2: "b"}
    assert {version for version, _ in rows} == {1, 2}
    for version, stored_payload in rows:
        assert required[version] in stored_payload, (version, stored_payload)
    stored = {(p["k"], p["n"]) for _, p in rows}
    for payload, receipts in outcomes:
        key = (payload["k"], payload["n"])
        assert (key in stored) == (receipts is not None), payload  # refused: nothing written
        if receipts is None:
            assert "a" not in payload or "b" not in payload  # only a one-sided shape is ever refused


async def test_reemit_is_checked_against_the_current_schema(stubs: Stubs) -> None:
    await typed(stubs, rule_pb2.SCHEMA_MODE_OFF)
    stored = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, BAD)))
    await set_schema(stubs, SCHEMA, rule_pb2.SCHEMA_MODE_ENFORCE)
    exc = await rpc_error(
        stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=stored.event.id)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "event.payload.repo.name: type:" in (exc.details() or "")


async def test_a_webhook_delivery_that_fails_the_schema_is_400_with_the_errors(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    trigger = await typed(stubs, webhook_enabled=True)
    target = stubs.target
    async with (
        channel(target, token=TOKENS["webhook"]) as ch,
        web_service(target, ch) as web,
        httpx.AsyncClient() as http,
    ):
        bad = await http.post(f"{web}/webhooks/{trigger.webhook_key}", json=BAD)
        assert bad.status_code == 400, bad.text
        assert 'event.payload.repo.name: type: 7 is not of type \\"string\\"' in bad.text or "repo.name" in bad.text
        good = await http.post(f"{web}/webhooks/{trigger.webhook_key}", json=GOOD)
        assert good.status_code == 202, good.text
    assert await count(conn, "event") == 1


# ---- TestRule: fields the schema rules out ---------------------------------------------------

CLOSED = {**SCHEMA, "additionalProperties": False}


def _test(rule_ref: str = "", payload: dict[str, Any] | None = None) -> rule_pb2.TestRuleRequest:
    r = rule(
        rule_ref,
        T,
        conditions=[
            ("repo.name", condition_pb2.CONDITION_OPERATOR_EQUALS, "api"),
            ("reop.name", condition_pb2.CONDITION_OPERATOR_EQUALS, "api"),
            ("n.value", condition_pb2.CONDITION_OPERATOR_EQUALS, 1),
        ],
    )
    return rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(inline=r), payload=struct(payload or GOOD))


async def test_test_rule_flags_the_fields_the_schema_rules_out(stubs: Stubs) -> None:
    trigger = await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T, out_schema=struct(CLOSED)))
    )
    tested = await stubs.rules.TestRule(_test())
    assert tested.schema_version == trigger.schema_version and tested.schema_mode == rule_pb2.SCHEMA_MODE_ENFORCE
    flagged = {r.field: r.cannot_exist_note for r in tested.results if r.cannot_exist}
    assert flagged == {
        "reop.name": "reop is not declared and the payload allows no other properties",
        "n.value": "n is of type integer, which has no 'value'",
    }
    # The same rule stored, tested against a stored event: the same flags.
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=_test("demo.flagged").rule.inline))
    stored = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, GOOD)))
    by_ref = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(ref="demo.flagged"), event_id=stored.event.id)
    )
    assert {r.field for r in by_ref.results if r.cannot_exist} == {"reop.name", "n.value"}
    # Opened up, the schema rules out only what its types still do; and the answer follows it.
    opened = await set_schema(stubs, SCHEMA, rule_pb2.SCHEMA_MODE_WARN)
    tested = await stubs.rules.TestRule(_test())
    assert {r.field for r in tested.results if r.cannot_exist} == {"n.value"}
    assert tested.schema_version == opened.schema_version and tested.schema_mode == rule_pb2.SCHEMA_MODE_WARN


async def test_test_rule_flags_nothing_without_a_schema(stubs: Stubs) -> None:
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T)))
    tested = await stubs.rules.TestRule(_test())
    assert not tested.HasField("schema_version")
    assert not any(r.cannot_exist or r.cannot_exist_note for r in tested.results)


# ---- CheckSchema: a dry run of a schema over stored events ----------------------------------


async def test_check_schema_counts_the_stored_events_a_new_schema_would_refuse(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    trigger = await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T)))
    payloads: list[dict[str, Any]] = [GOOD, BAD, GOOD, {"n": 3}, GOOD]
    made = [
        (await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, p)))).event.id for p in payloads
    ]
    audits, rows = await count(conn, "audit_log"), await count(conn, "event")
    checked = await stubs.rules.CheckSchema(rule_pb2.CheckSchemaRequest(trigger_ref=T, out_schema=struct(SCHEMA)))
    assert (checked.checked, checked.failing) == (5, 2)
    assert checked.draft == "draft 2020-12" and checked.schema_version == trigger.schema_version
    # Newest first, each naming the first problem's path and keyword, never the value.
    assert [(e.event_id, e.path, e.keyword) for e in checked.examples] == [
        (made[3], "event.payload", "required"),
        (made[1], "event.payload.repo.name", "type"),
    ]
    # The limit takes the newest events only.
    newest = await stubs.rules.CheckSchema(
        rule_pb2.CheckSchemaRequest(trigger_id=trigger.id, out_schema=struct(SCHEMA), limit=2)
    )
    assert (newest.checked, newest.failing) == (2, 1)
    # Nothing was written: no audit record, no event, the trigger unchanged.
    assert (await count(conn, "audit_log"), await count(conn, "event")) == (audits, rows)
    again = await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=T))
    assert again.schema_version == trigger.schema_version and not again.HasField("out_schema")


async def test_check_schema_uses_the_current_schema_when_none_is_proposed(stubs: Stubs) -> None:
    await typed(stubs, rule_pb2.SCHEMA_MODE_WARN)
    await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, BAD)))
    await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, GOOD)))
    checked = await stubs.rules.CheckSchema(rule_pb2.CheckSchemaRequest(trigger_ref=T))
    assert (checked.checked, checked.failing) == (2, 1)


async def test_check_schema_refuses_bad_requests_naming_the_field(stubs: Stubs) -> None:
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T)))
    over = await rpc_error(
        stubs.rules.CheckSchema(
            rule_pb2.CheckSchemaRequest(trigger_ref=T, out_schema=struct(SCHEMA), limit=limits.MAX_SCHEMA_CHECK + 1)
        ),
        INVALID,
    )
    assert "10,000" in field_violations(over)["limit"]
    cyclic = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    bad = await rpc_error(
        stubs.rules.CheckSchema(rule_pb2.CheckSchemaRequest(trigger_ref=T, out_schema=struct(cyclic))), INVALID
    )
    assert any(f.startswith("out_schema") for f in field_violations(bad))
    await rpc_error(stubs.rules.CheckSchema(rule_pb2.CheckSchemaRequest(trigger_ref=T)), FAILED)
    await rpc_error(stubs.rules.CheckSchema(rule_pb2.CheckSchemaRequest()), INVALID)
    await rpc_error(
        stubs.rules.CheckSchema(rule_pb2.CheckSchemaRequest(trigger_ref="demo.none", out_schema=struct(SCHEMA))),
        grpc.StatusCode.NOT_FOUND,
    )
    # A viewer may not: a proposed schema could ask yes/no questions of masked values.
    async with channel(stubs.target, TOKENS["viewer"]) as ch:
        await rpc_error(
            rule_pb2_grpc.RuleServiceStub(ch).CheckSchema(
                rule_pb2.CheckSchemaRequest(trigger_ref=T, out_schema=struct(SCHEMA))
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
