"""Secret fields over real gRPC on a real PostgreSQL: values at paths a trigger's schema marks
``"x-secret": true`` are stored as sent (rules match on them), masked on every read path for a
principal without ``reveal``, shown in clear with it (and audited), clear for executors, and
masked by the schema version each event was checked against."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2, json_format

from services.api.auth import token_hash
from services.api.server import ApiServer
from services.web.session import COOKIE
from shared.gen.automation.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    condition_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    rule_pb2,
    rule_pb2_grpc,
)
from tests.conftest import Stubs
from tests.helpers import (
    TOKENS,
    channel,
    eventually,
    field_violations,
    new_event,
    rpc_error,
    rule,
    struct,
    web_service,
)

T = "demo.secret"
R = "demo.secret-rule"
EQUALS = condition_pb2.CONDITION_OPERATOR_EQUALS
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "token": {"type": "string", "x-secret": True},
        "creds": {"$ref": "#/$defs/creds"},
        "keys": {"type": "array", "items": {"properties": {"key": {"x-secret": True}}}},
        "user": {"type": "string"},
    },
    "$defs": {"creds": {"type": "object", "properties": {"password": {"type": "string", "x-secret": True}}}},
}
PAYLOAD: dict[str, Any] = {
    "token": "hunter2",
    "creds": {"password": "s3cr3t", "login": "ann"},
    "keys": [{"key": "k-one", "id": 1}, {"key": {"deep": "k-two"}, "id": 2}, "loose"],
    "user": "ann",
}
MASKED: dict[str, Any] = {
    "token": "***",
    "creds": {"password": "***", "login": "ann"},
    "keys": [{"key": "***", "id": 1}, {"key": "***", "id": 2}, "loose"],
    "user": "ann",
}
PARAMS = {
    "auth": "Bearer {{ event.payload.token }}",
    "creds": "{{ event.payload.creds }}",
    "who": "{{ event.payload.user }}",
}
RENDERED_CLEAR = {"auth": "Bearer hunter2", "creds": {"password": "s3cr3t", "login": "ann"}, "who": "ann"}
RENDERED_MASKED = {"auth": "***", "creds": {"password": "***", "login": "ann"}, "who": "ann"}
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def plain(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(message)
    return out


async def secret_trigger(
    stubs: Stubs, schema: dict[str, Any] = SCHEMA, mode: int = rule_pb2.SCHEMA_MODE_ENFORCE
) -> None:
    await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(
            trigger=rule_pb2.Trigger(ref=T, out_schema=struct(schema), schema_mode=mode)  # type: ignore[arg-type]
        )
    )
    # The rule matches on a secret value: matching sees what was sent.
    await stubs.rules.CreateRule(
        rule_pb2.CreateRuleRequest(rule=rule(R, T, conditions=[("token", EQUALS, "hunter2")], params=PARAMS))
    )


async def emit(stubs: Stubs, payload: dict[str, Any] = PAYLOAD) -> event_pb2.CreateEventResponse:
    async with channel(stubs.target, TOKENS["sensor"]) as ch:
        answer: event_pb2.CreateEventResponse = await event_pb2_grpc.EventServiceStub(ch).CreateEvent(
            event_pb2.CreateEventRequest(event=new_event(T, payload))
        )
        return answer


@contextlib.asynccontextmanager
async def as_role(stubs: Stubs, token: str) -> AsyncIterator[tuple[Any, Any]]:
    async with channel(stubs.target, token) as ch:
        yield event_pb2_grpc.EventServiceStub(ch), enforcement_pb2_grpc.EnforcementServiceStub(ch)


@pytest.fixture
async def revealer(stubs: Stubs, conn: asyncpg.Connection) -> str:
    """A token of a viewer who may reveal, once the api has loaded it."""
    token = "atk_test-revealer-0123456789abcdefghij"
    await conn.execute(
        "INSERT INTO api_token (name, roles, token_hash) VALUES ('revealer', ARRAY['viewer', 'reveal'], $1)",
        token_hash(token),
    )

    async def loaded() -> bool | None:
        async with as_role(stubs, token) as (events, _):
            try:
                await events.ListEvents(event_pb2.ListEventsRequest(page_size=1))
            except grpc.aio.AioRpcError:
                return None
            return True

    await eventually(loaded, what="the revealer's token loaded")
    return token


async def first(stream: Any, want: Any) -> Any:
    async for message in stream:
        if want(message):
            stream.cancel()
            return message
    raise AssertionError("the stream ended")


async def test_a_secret_mark_is_checked_when_the_schema_is_stored(stubs: Stubs) -> None:
    for schema, node in (
        ({"type": "object", "properties": {"a": {"x-secret": "yes"}}}, "trigger.out_schema.properties.a.x-secret"),
        ({"type": "object", "x-secret": True}, "trigger.out_schema.x-secret"),
    ):
        err = await rpc_error(
            stubs.rules.CreateTrigger(
                rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T, out_schema=struct(schema)))
            ),
            INVALID,
        )
        assert node in field_violations(err), field_violations(err)
    # Nothing half-written: the ref is still free.
    await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T, out_schema=struct(SCHEMA)))
    )


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_every_read_masks_secrets_for_a_principal_without_reveal(
    stubs: Stubs, conn: asyncpg.Connection, role: str
) -> None:
    await secret_trigger(stubs)
    async with as_role(stubs, TOKENS[role]) as (events, enforcements):
        created = await emit(stubs)
        # The rule matched on the secret value.
        assert [e.rule_ref for e in created.enforcements] == [R]
        event_id, enf_id = created.event.id, created.enforcements[0].id

        got = await events.GetEvent(event_pb2.GetEventRequest(id=event_id))
        assert plain(got.payload) == MASKED
        listed = await events.ListEvents(event_pb2.ListEventsRequest(trigger_ref=T))
        assert [plain(e.payload) for e in listed.events] == [MASKED]
        enf = await enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=enf_id))
        assert plain(enf.payload) == MASKED
        assert plain(enf.config) == RENDERED_MASKED
        listed_enf = await enforcements.ListEnforcements(enforcement_pb2.ListEnforcementsRequest(trigger_ref=T))
        assert [plain(e.config) for e in listed_enf.enforcements] == [RENDERED_MASKED]

    # Stored as sent.
    assert await conn.fetchval("SELECT payload->>'token' FROM event WHERE id = $1", event_id) == "hunter2"


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_tails_mask_secrets(stubs: Stubs, role: str) -> None:
    await secret_trigger(stubs)
    async with as_role(stubs, TOKENS[role]) as (events, enforcements):
        ev_tail = events.TailEvents(event_pb2.TailEventsRequest(trigger_ref=T, announce_start=True))
        enf_tail = enforcements.TailEnforcements(
            enforcement_pb2.TailEnforcementsRequest(trigger_ref=T, announce_start=True)
        )
        ev_iter, enf_iter = ev_tail.__aiter__(), enf_tail.__aiter__()
        assert (await ev_iter.__anext__()).start
        assert (await enf_iter.__anext__()).change == enforcement_pb2.TailEnforcementsResponse.CHANGE_STARTED
        await emit(stubs)
        ev = await asyncio.wait_for(ev_iter.__anext__(), 30)
        enf = await asyncio.wait_for(enf_iter.__anext__(), 30)
        ev_tail.cancel()
        enf_tail.cancel()
    assert plain(ev.event.payload) == MASKED
    assert plain(enf.enforcement.payload) == MASKED
    assert plain(enf.enforcement.config) == RENDERED_MASKED


async def test_reveal_needs_the_reveal_role(stubs: Stubs) -> None:
    await secret_trigger(stubs)
    created = await emit(stubs)
    for role in ("viewer", "operator"):
        async with as_role(stubs, TOKENS[role]) as (events, enforcements):
            for call in (
                events.GetEvent(event_pb2.GetEventRequest(id=created.event.id, reveal=True)),
                events.ListEvents(event_pb2.ListEventsRequest(reveal=True)),
                enforcements.GetEnforcement(
                    enforcement_pb2.GetEnforcementRequest(id=created.enforcements[0].id, reveal=True)
                ),
                enforcements.ListEnforcements(enforcement_pb2.ListEnforcementsRequest(reveal=True)),
            ):
                err = await rpc_error(call, DENIED)
                assert "reveal" in (err.details() or "")
            tail = events.TailEvents(event_pb2.TailEventsRequest(reveal=True))
            err = await rpc_error(first(tail, lambda m: True), DENIED)
            assert "reveal" in (err.details() or "")


async def test_reveal_shows_clear_values_and_is_audited(stubs: Stubs, revealer: str) -> None:
    await secret_trigger(stubs)
    created = await emit(stubs)
    other = await emit(stubs, {"user": "bob"})  # no secret in it: nothing revealed
    event_id, enf_id = created.event.id, created.enforcements[0].id
    async with as_role(stubs, revealer) as (events, enforcements):
        # Without asking, a revealer reads masked values too (and nothing is audited).
        assert plain((await events.GetEvent(event_pb2.GetEventRequest(id=event_id))).payload) == MASKED
        got = await events.GetEvent(event_pb2.GetEventRequest(id=event_id, reveal=True))
        assert plain(got.payload) == PAYLOAD
        listed = await events.ListEvents(event_pb2.ListEventsRequest(trigger_ref=T, reveal=True))
        assert {e.id for e in listed.events} == {event_id, other.event.id}
        enf = await enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=enf_id, reveal=True))
        assert plain(enf.config) == RENDERED_CLEAR
        assert plain(enf.payload) == PAYLOAD
    audit = audit_pb2_grpc.AuditServiceStub(stubs.channel)
    records = (await audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(principal="revealer"))).records
    reveals = sorted((r.entity_type, r.rpc.rsplit("/", 1)[1], plain(r.change)["revealed"]) for r in records)
    assert reveals == [
        ("enforcement", "GetEnforcement", [enf_id]),
        ("event", "GetEvent", [event_id]),
        ("event", "ListEvents", [event_id]),
    ]


async def test_the_executor_receives_clear_values(stubs: Stubs) -> None:
    await secret_trigger(stubs)
    async with channel(stubs.target, TOKENS["executor"]) as ch:
        watch = enforcement_pb2_grpc.EnforcementServiceStub(ch).WatchEnforcements(
            enforcement_pb2.WatchEnforcementsRequest(executor_id="secret-executor", max_in_flight=4)
        )
        created = await emit(stubs)
        message = await asyncio.wait_for(first(watch, lambda m: m.WhichOneof("kind") == "delivery"), 30)
    delivered = message.delivery.enforcement
    assert delivered.id == created.enforcements[0].id
    assert plain(delivered.payload) == PAYLOAD
    assert plain(delivered.config) == RENDERED_CLEAR


async def test_the_operators_reemit_answer_is_masked(stubs: Stubs) -> None:
    await secret_trigger(stubs)
    created = await emit(stubs)
    again = await stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=created.event.id))
    assert plain(again.event.payload) == MASKED
    assert [plain(e.config) for e in again.enforcements] == [RENDERED_MASKED]


@pytest.mark.parametrize("mode", [rule_pb2.SCHEMA_MODE_WARN, rule_pb2.SCHEMA_MODE_OFF])
async def test_each_event_is_masked_by_its_own_schema_version(stubs: Stubs, mode: int) -> None:
    """Version 1 marks `a`; version 2 unmarks it and marks `b`. Checked events keep their
    version; unchecked ones (mode off) are masked by the version in effect when stored."""
    v1 = {"type": "object", "properties": {"a": {"x-secret": True}, "b": {}}}
    v2 = {"type": "object", "properties": {"a": {}, "b": {"x-secret": True}}}
    await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=T, out_schema=struct(v1), schema_mode=mode))  # type: ignore[arg-type]
    )
    first_event = (await emit(stubs, {"a": "one", "b": "two"})).event
    await stubs.rules.UpdateTrigger(
        rule_pb2.UpdateTriggerRequest(
            trigger=rule_pb2.Trigger(ref=T, out_schema=struct(v2)),
            update_mask=field_mask_pb2.FieldMask(paths=["out_schema"]),
        )
    )
    second_event = (await emit(stubs, {"a": "one", "b": "two"})).event
    if mode == rule_pb2.SCHEMA_MODE_WARN:
        assert (first_event.schema_version, second_event.schema_version) == (1, 2)
    async with as_role(stubs, TOKENS["viewer"]) as (events, _):
        listed = {e.id: plain(e.payload) for e in (await events.ListEvents(event_pb2.ListEventsRequest())).events}
    assert listed[first_event.id] == {"a": "***", "b": "two"}
    assert listed[second_event.id] == {"a": "one", "b": "***"}


async def test_payloads_of_another_shape_than_the_schema_mask_what_is_there(stubs: Stubs) -> None:
    """Mode off: payloads the schema does not describe are stored, and masking takes what lies
    at the secret paths (nothing, when a path leads through a scalar or a list)."""
    await secret_trigger(stubs, mode=rule_pb2.SCHEMA_MODE_OFF)
    shapes: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"creds": "flat", "keys": {"key": "not-a-list"}}, {"creds": "flat", "keys": {"key": "not-a-list"}}),
        ({"token": {"nested": ["a", 1]}, "keys": [[1], 2]}, {"token": "***", "keys": [[1], 2]}),
        ({"token": 12345, "user": "x"}, {"token": "***", "user": "x"}),
    ]
    ids = [(await emit(stubs, payload)).event.id for payload, _ in shapes]
    async with as_role(stubs, TOKENS["viewer"]) as (events, _):
        for id_, (_, masked) in zip(ids, shapes, strict=True):
            assert plain((await events.GetEvent(event_pb2.GetEventRequest(id=id_))).payload) == masked


async def test_the_console_shows_secrets_masked(stubs: Stubs, api: ApiServer) -> None:
    """The console reads through the api with the person's token and never asks to reveal:
    events, enforcements (their conditions too), executions with their history, and rules."""
    await secret_trigger(stubs)
    created = await emit(stubs)
    await resolved(stubs, [created.enforcements[0].id])
    executions = execution_pb2_grpc.ExecutionServiceStub(stubs.channel)
    (x,) = (
        await executions.ListExecutions(execution_pb2.ListExecutionsRequest(enforcement=created.enforcements[0].id))
    ).executions
    target = f"127.0.0.1:{api.port}"
    async with channel(target, token=TOKENS["webhook"]) as ch, web_service(target, ch) as url:
        for role in ("viewer", "operator"):
            async with httpx.AsyncClient(base_url=url, cookies={COOKIE: TOKENS[role]}, timeout=30) as browser:
                for path in (
                    f"/events/{created.event.id}",
                    f"/enforcements/{created.enforcements[0].id}",
                    f"/executions/{x.id}",
                    "/executions",
                    f"/rules/{R}",
                ):
                    answer = await browser.get(path)
                    assert answer.status_code == 200, (path, answer.status_code)
                    text = html.unescape(answer.text)
                    if path != "/executions":  # the list shows no config
                        assert "***" in text, path
                    for clear in ("hunter2", "s3cr3t", "k-one", "k-two"):
                        assert clear not in text, (path, clear)
                    if path.startswith(("/events/", "/enforcements/", "/executions/")):
                        assert "ann" in text, path  # what is not secret is shown


async def test_a_list_page_cut_at_its_byte_budget_audits_only_what_it_sent(stubs: Stubs, revealer: str) -> None:
    await secret_trigger(stubs)
    big = "z" * 200_000  # 15 of them pass the 2 MiB page budget
    events = [new_event(T, {**PAYLOAD, "big": big, "n": i}) for i in range(15)]
    async with channel(stubs.target, TOKENS["sensor"]) as ch:
        await event_pb2_grpc.EventServiceStub(ch).CreateEvents(event_pb2.CreateEventsRequest(events=events), timeout=30)
    async with as_role(stubs, revealer) as (events_stub, _):
        page = await events_stub.ListEvents(event_pb2.ListEventsRequest(trigger_ref=T, page_size=15, reveal=True))
    sent = [e.id for e in page.events]
    assert page.next_page_token and 0 < len(sent) < 15
    assert all(plain(e.payload)["token"] == "hunter2" for e in page.events)
    audit = audit_pb2_grpc.AuditServiceStub(stubs.channel)
    records = (await audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(principal="revealer"))).records
    assert [plain(r.change)["revealed"] for r in records] == [sent]


async def test_a_tail_masks_a_page_with_one_lookup_not_one_per_message(stubs: Stubs, api: ApiServer) -> None:
    await secret_trigger(stubs)
    assert api.store is not None
    versions = api.store.schema_versions
    n = 200
    async with as_role(stubs, TOKENS["viewer"]) as (events, _):
        tail = events.TailEvents(event_pb2.TailEventsRequest(trigger_ref=T, announce_start=True))
        messages = tail.__aiter__()
        assert (await messages.__anext__()).start
        batch = [new_event(T, {**PAYLOAD, "n": i}) for i in range(n)]
        async with channel(stubs.target, TOKENS["sensor"]) as ch:
            await event_pb2_grpc.EventServiceStub(ch).CreateEvents(event_pb2.CreateEventsRequest(events=batch))
        before = versions.reads
        got = [await asyncio.wait_for(messages.__anext__(), 30) for _ in range(n)]
        tail.cancel()
    assert all(plain(m.event.payload)["token"] == "***" for m in got)
    assert [plain(m.event.payload)["n"] for m in got] == list(range(n))
    # A page of the tail (32 rows) is masked with one lookup: one a message would be 200.
    assert versions.reads - before <= n // 16


async def resolved(stubs: Stubs, enforcement_ids: list[int]) -> None:
    """Resolves them PROCESSED as an executor: each gets its execution, config as rendered."""
    async with channel(stubs.target, TOKENS["executor"]) as ch:
        stub = enforcement_pb2_grpc.EnforcementServiceStub(ch)
        for id_ in enforcement_ids:
            await stub.ResolveEnforcement(
                enforcement_pb2.ResolveEnforcementRequest(id=id_, status=common_pb2.ENFORCEMENT_STATUS_PROCESSED)
            )


async def reveals_of(stubs: Stubs, principal: str) -> list[tuple[str, str, list[int]]]:
    audit = audit_pb2_grpc.AuditServiceStub(stubs.channel)
    records = (await audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(principal=principal))).records
    return sorted((r.entity_type, r.rpc.rsplit("/", 1)[1], plain(r.change)["revealed"]) for r in records)


async def test_executions_and_their_history_are_masked_and_revealed_with_an_audit(stubs: Stubs, revealer: str) -> None:
    await secret_trigger(stubs)
    created = await emit(stubs)
    enf_id = created.enforcements[0].id
    await resolved(stubs, [enf_id])
    executions = execution_pb2_grpc.ExecutionServiceStub(stubs.channel)
    (x,) = (await executions.ListExecutions(execution_pb2.ListExecutionsRequest(enforcement=enf_id))).executions
    # The operator's own reads are masked (stubs carry an operator token).
    assert plain(x.config) == RENDERED_MASKED
    history_of = history_pb2.ListHistoryRequest(entity_type="execution", entity_id=x.id)
    for role in ("viewer", "operator"):
        async with channel(stubs.target, TOKENS[role]) as ch:
            xs = execution_pb2_grpc.ExecutionServiceStub(ch)
            got = await xs.GetExecution(execution_pb2.GetExecutionRequest(id=x.id))
            assert plain(got.config) == RENDERED_MASKED
            (inserted,) = (await history_pb2_grpc.HistoryServiceStub(ch).ListHistory(history_of)).records
            assert plain(inserted.new_values)["config"] == RENDERED_MASKED
            for call in (
                xs.GetExecution(execution_pb2.GetExecutionRequest(id=x.id, reveal=True)),
                xs.ListExecutions(execution_pb2.ListExecutionsRequest(reveal=True)),
                history_pb2_grpc.HistoryServiceStub(ch).ListHistory(
                    history_pb2.ListHistoryRequest(entity_type="execution", reveal=True)
                ),
            ):
                assert "reveal" in ((await rpc_error(call, DENIED)).details() or "")
    async with channel(stubs.target, revealer) as ch:
        xs = execution_pb2_grpc.ExecutionServiceStub(ch)
        got = await xs.GetExecution(execution_pb2.GetExecutionRequest(id=x.id, reveal=True))
        assert plain(got.config) == RENDERED_CLEAR
        (listed,) = (
            await xs.ListExecutions(execution_pb2.ListExecutionsRequest(enforcement=enf_id, reveal=True))
        ).executions
        assert plain(listed.config) == RENDERED_CLEAR
        history_of.reveal = True
        (inserted,) = (await history_pb2_grpc.HistoryServiceStub(ch).ListHistory(history_of)).records
        assert plain(inserted.new_values)["config"] == RENDERED_CLEAR
    assert await reveals_of(stubs, "revealer") == [
        ("execution", "GetExecution", [x.id]),
        ("execution", "ListExecutions", [x.id]),
        ("execution", "ListHistory", [x.id]),
    ]


async def test_a_page_of_executions_is_masked_with_a_few_statements_not_one_per_row(
    stubs: Stubs, api: ApiServer
) -> None:
    await secret_trigger(stubs)
    n = 30
    async with channel(stubs.target, TOKENS["sensor"]) as ch:
        answer = await event_pb2_grpc.EventServiceStub(ch).CreateEvents(
            event_pb2.CreateEventsRequest(events=[new_event(T, {**PAYLOAD, "n": i}) for i in range(n)])
        )
    await resolved(stubs, [e for r in answer.receipts for e in r.enforcement_ids])
    assert api.store is not None
    versions = api.store.schema_versions
    before = versions.reads
    async with channel(stubs.target, TOKENS["viewer"]) as ch:
        page = await execution_pb2_grpc.ExecutionServiceStub(ch).ListExecutions(
            execution_pb2.ListExecutionsRequest(page_size=n)
        )
        records = await history_pb2_grpc.HistoryServiceStub(ch).ListHistory(
            history_pb2.ListHistoryRequest(entity_type="execution", page_size=n)
        )
    assert len(page.executions) == len(records.records) == n
    assert all(plain(x.config) == RENDERED_MASKED for x in page.executions)
    assert all(plain(r.new_values)["config"] == RENDERED_MASKED for r in records.records)
    # Per page: the version list and the versions' schemas at most, not a lookup per row.
    assert versions.reads - before <= 4


async def test_a_rules_conditions_on_secret_fields_are_masked_wherever_they_are_shown(
    stubs: Stubs, revealer: str
) -> None:
    await secret_trigger(stubs)
    other = rule("demo.secret-other", T, conditions=[("creds.password", EQUALS, "s3cr3t"), ("user", EQUALS, "ann")])
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=other))
    created = await emit(stubs)
    values = {
        "token": "***",
        "creds.password": "***",
        "user": "ann",  # not secret: shown
    }

    def shown(r: Any) -> dict[str, Any]:
        return {c.field: json_format.MessageToDict(c.value) for c in r.conditions}

    async with channel(stubs.target, TOKENS["viewer"]) as ch:
        rules = rule_pb2_grpc.RuleServiceStub(ch)
        got = await rules.GetRule(rule_pb2.GetRuleRequest(ref=R))
        assert shown(got) == {"token": "***"}
        listed = {r.ref: shown(r) for r in (await rules.ListRules(rule_pb2.ListRulesRequest(trigger_ref=T))).rules}
        assert listed == {R: {"token": "***"}, "demo.secret-other": {k: values[k] for k in ("creds.password", "user")}}
        enforcements = enforcement_pb2_grpc.EnforcementServiceStub(ch)
        for e in created.enforcements:
            got_e = await enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=e.id))
            assert set(shown(got_e).values()) <= {"***", "ann"}, shown(got_e)
        assert "reveal" in (
            (await rpc_error(rules.GetRule(rule_pb2.GetRuleRequest(ref=R, reveal=True)), DENIED)).details() or ""
        )
    # The writer's answers are masked too.
    again = await stubs.rules.UpdateRule(
        rule_pb2.UpdateRuleRequest(
            rule=rule_pb2.Rule(ref=R, enabled=True), update_mask=field_mask_pb2.FieldMask(paths=["enabled"])
        )
    )
    assert shown(again) == {"token": "***"}
    async with channel(stubs.target, revealer) as ch:
        rules = rule_pb2_grpc.RuleServiceStub(ch)
        got = await rules.GetRule(rule_pb2.GetRuleRequest(ref=R, reveal=True))
        assert shown(got) == {"token": "hunter2"}
        page = await rules.ListRules(rule_pb2.ListRulesRequest(trigger_ref=T, reveal=True))
        enf = await enforcement_pb2_grpc.EnforcementServiceStub(ch).GetEnforcement(
            enforcement_pb2.GetEnforcementRequest(id=created.enforcements[0].id, reveal=True)
        )
    assert {r.ref: shown(r) for r in page.rules}["demo.secret-other"]["creds.password"] == "s3cr3t"
    assert "hunter2" in shown(enf).values() or "s3cr3t" in shown(enf).values()
    rule_ids = sorted(r.id for r in page.rules)
    assert await reveals_of(stubs, "revealer") == [
        ("enforcement", "GetEnforcement", [created.enforcements[0].id]),
        ("rule", "GetRule", [got.id]),
        ("rule", "ListRules", [r.id for r in page.rules]),
    ]
    assert len(rule_ids) == 2


async def test_a_masked_rule_written_back_whole_is_refused_not_stored_as_the_mask(stubs: Stubs) -> None:
    await secret_trigger(stubs)
    read = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref=R))
    assert {c.field: c.value.string_value for c in read.conditions} == {"token": "***"}
    write_back = rule_pb2.UpdateRuleRequest(
        rule=rule_pb2.Rule(ref=R, conditions=read.conditions),
        update_mask=field_mask_pb2.FieldMask(paths=["conditions"]),
    )
    err = await rpc_error(stubs.rules.UpdateRule(write_back), INVALID)
    assert "rule.conditions" in (err.details() or "") and "token" in (err.details() or "")
    # Nothing was written: the rule still matches on the clear value.
    created = await emit(stubs)
    assert created.enforcements
    # A rule created with the mask as its value is refused alike; "***" on a field that is not
    # secret is an ordinary value.
    copy = rule("demo.secret-copy", T, conditions=[("token", EQUALS, "***")])
    await rpc_error(stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=copy)), INVALID)
    plain = rule("demo.stars", T, conditions=[("user", EQUALS, "***")])
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=plain))
    # A typed value replaces the secret one.
    typed = rule_pb2.UpdateRuleRequest(
        rule=rule("x", T, conditions=[("token", EQUALS, "new-token")]),
        update_mask=field_mask_pb2.FieldMask(paths=["conditions"]),
    )
    typed.rule.ref = R
    await stubs.rules.UpdateRule(typed)


async def test_test_rule_shows_a_stored_event_and_a_stored_rule_masked_and_what_the_caller_typed_as_sent(
    stubs: Stubs,
) -> None:
    await secret_trigger(stubs)
    created = await emit(stubs)
    stored = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(rule=rule_pb2.RuleSource(ref=R), event_id=created.event.id)
    )
    assert stored.matched  # matched on the clear value
    text = json.dumps(plain(stored))
    assert "hunter2" not in text and "s3cr3t" not in text, text
    (token,) = [r for r in stored.results if r.field == "token"]
    assert token.expected.string_value == "***" and token.found.string_value == "***"
    assert plain(stored.config)["auth"] == "***"
    # A payload and a rule the caller types are theirs: shown as sent.
    typed = await stubs.rules.TestRule(
        rule_pb2.TestRuleRequest(
            rule=rule_pb2.RuleSource(inline=rule("", T, conditions=[("token", EQUALS, "mine")])),
            payload=struct({"token": "mine"}),
        )
    )
    (mine,) = [r for r in typed.results if r.field == "token"]
    assert mine.expected.string_value == "mine" and mine.found.string_value == "mine"


async def test_the_audit_trail_shows_a_rules_secret_condition_values_masked(stubs: Stubs) -> None:
    """A rule's audit records (its create, an update's old and new conditions) hold the values
    as written; the trail shows them masked as GetRule does, even once the rule and its
    trigger are deleted."""
    await secret_trigger(stubs)
    changed = rule(R, T, conditions=[("token", EQUALS, "n3w-s3cret"), ("user", EQUALS, "ann")])
    await stubs.rules.UpdateRule(
        rule_pb2.UpdateRuleRequest(rule=changed, update_mask=field_mask_pb2.FieldMask(paths=["conditions"]))
    )
    audit = audit_pb2_grpc.AuditServiceStub(stubs.channel)

    async def changes() -> dict[str, Any]:
        page = await audit.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(entity_type="rule", entity_ref=R))
        return {r.rpc.rsplit("/", 1)[-1]: json_format.MessageToDict(r.change) for r in page.records}

    def values(conditions: list[dict[str, Any]]) -> dict[str, Any]:
        return {c["field"]: c["value"] for c in conditions}

    shown = await changes()
    assert values(shown["CreateRule"]["conditions"]) == {"token": "***"}
    assert values(shown["UpdateRule"]["conditions"]["old"]) == {"token": "***"}
    assert values(shown["UpdateRule"]["conditions"]["new"]) == {"token": "***", "user": "ann"}
    await stubs.rules.DeleteRule(rule_pb2.DeleteRuleRequest(ref=R))
    await stubs.rules.DeleteTrigger(rule_pb2.DeleteTriggerRequest(ref=T))
    gone = await changes()
    assert values(gone["UpdateRule"]["conditions"]["new"]) == {"token": "***", "user": "ann"}
    assert "hunter2" not in json.dumps(gone) and "n3w-s3cret" not in json.dumps(gone)
