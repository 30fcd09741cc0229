"""Hostile and careless input: limits checked before anything is written, honest errors, and
one bad call never failing its neighbours. Each test is a behaviour that once hurt someone
else (see the issue "Hostile input cannot hurt anyone else")."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from shared import limits
from shared.gen.automation.v1 import condition_pb2, enforcement_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import channel as authed_channel
from tests.helpers import count, field_violations, new_event, rpc_error, rule, struct

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EQUALS = condition_pb2.CONDITION_OPERATOR_EQUALS


def nested(depth: int, leaf: Any = 1) -> dict[str, Any]:
    """An object nested ``depth`` levels deep: {"a": {"a": ... leaf}}."""
    value: Any = leaf
    for _ in range(depth):
        value = {"a": value}
    assert isinstance(value, dict)
    return value


async def trigger_and_rule(stubs: Stubs, params: dict[str, Any] | None = None, trigger: str = "core.t") -> None:
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=trigger)))
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.r", trigger, params=params)))


async def create(stubs: Stubs, event: event_pb2.NewEvent) -> event_pb2.CreateEventResponse:
    return await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=event), timeout=30)


async def stored(conn: asyncpg.Connection) -> tuple[int, int]:
    return await count(conn, "event"), await count(conn, "enforcement")


# --- depth ----------------------------------------------------------------------------------


async def test_a_payload_nested_past_the_limit_is_refused_naming_the_path(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await trigger_and_rule(stubs, {"copy": "{{ event.payload }}"})
    exc = await rpc_error(create(stubs, new_event("core.t", nested(32))), INVALID)
    path = "event.payload" + ".a" * limits.MAX_JSON_DEPTH
    assert "nests deeper than 16 levels" in field_violations(exc)[path]
    assert await stored(conn) == (0, 0)


async def test_a_rendered_config_too_deep_to_decode_is_refused_before_the_write(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    # Both within the input limit, but the template puts the payload 12 levels down.
    await trigger_and_rule(stubs, nested(12, "{{ event.payload }}"))
    exc = await rpc_error(create(stubs, new_event("core.t", nested(limits.MAX_JSON_DEPTH))), INVALID)
    assert "would render a config nested" in field_violations(exc)["event.payload"]
    assert await stored(conn) == (0, 0)
    # A shallower payload renders fine, is stored, and can be read back and listed.
    ok = await create(stubs, new_event("core.t", nested(8)))
    assert len(ok.enforcements) == 1
    page = await stubs.enforcements.ListEnforcements(enforcement_pb2.ListEnforcementsRequest())
    assert [e.id for e in page.enforcements] == [ok.enforcements[0].id]


# --- size and amplification -------------------------------------------------------------------


async def test_templates_that_multiply_a_payload_are_refused_with_nothing_stored(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    # 32 whole-value templates of a 100 kB string: each enforcement would carry 3.2 MB.
    await trigger_and_rule(stubs, {f"k{i}": "{{ event.payload.big }}" for i in range(limits.MAX_TEMPLATES)})
    exc = await rpc_error(create(stubs, new_event("core.t", {"big": "x" * 100_000})), INVALID)
    assert "would make an enforcement of" in field_violations(exc)["event.payload"]
    # Templates inside text copy the value: refused by the rendering budget, just as early.
    await stubs.rules.UpdateRule(
        rule_pb2.UpdateRuleRequest(
            rule=rule_pb2.Rule(ref="demo.r", action_params=struct({"s": "{{ event.payload.big }}-" * 32})),
            update_mask=field_mask_pb2.FieldMask(paths=["action_params"]),
        )
    )
    exc = await rpc_error(create(stubs, new_event("core.t", {"big": "y" * 200_000})), INVALID)
    assert "event.payload" in field_violations(exc)
    assert await stored(conn) == (0, 0)


async def test_many_templates_in_one_rule_are_refused(stubs: Stubs) -> None:
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="core.t")))
    params = {f"k{i}": "{{ event.payload.big }}" for i in range(100)}
    exc = await rpc_error(
        stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.r", "core.t", params=params))), INVALID
    )
    assert "at most 32 templates" in field_violations(exc)["rule.action_params"]


async def test_a_payload_over_its_size_limit_is_refused(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await trigger_and_rule(stubs)
    exc = await rpc_error(create(stubs, new_event("core.t", {"big": "x" * (limits.MAX_PAYLOAD_BYTES + 1)})), INVALID)
    assert "at most 262,144 are accepted" in field_violations(exc)["event.payload"]
    assert await stored(conn) == (0, 0)


async def test_list_pages_stop_before_their_byte_budget_and_the_token_goes_on(stubs: Stubs) -> None:
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="core.t")))
    big = "z" * 200_000
    for start in (0, 15):  # ~5 MB in all, sent in two calls under the message limit
        events = [new_event("core.t", {"big": big, "n": i}) for i in range(start, start + 15)]
        await stubs.events.CreateEvents(event_pb2.CreateEventsRequest(events=events), timeout=30)
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await stubs.events.ListEvents(event_pb2.ListEventsRequest(page_size=100, page_token=token))
        assert page.ByteSize() <= limits.MAX_PAGE_BYTES
        seen.extend(e.id for e in page.events)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages >= 3
    assert len(seen) == len(set(seen)) == 30


# --- text fields ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "field", "why"),
    [
        (new_event("core.t", source_ref="s" * 5000), "event.source_ref", "at most 255 characters"),
        (new_event("core.t", source_ref="a\x00b"), "event.source_ref", "NUL"),
        (new_event("core.t", request_id="r\x00"), "event.request_id", "NUL"),
        (new_event("core.t\n"), "event.trigger_ref", "must look like pack.name"),
        (new_event("core." + "t" * 300), "event.trigger_ref", "at most 255 characters"),
        (new_event("core.t", {"a": {"b": "x\x00y"}}), "event.payload.a.b", "NUL"),
        (new_event("core.t", {"k\x00": 1}), "event.payload['k\\x00']", "NUL"),
        (new_event("core.t", {"n": float("nan")}), "event.payload.n", "finite number"),
        (new_event("core.t", {"l": [1, float("inf")]}), "event.payload.l[1]", "finite number"),
    ],
)
async def test_values_the_database_cannot_hold_are_refused_naming_the_field(
    stubs: Stubs, conn: asyncpg.Connection, event: event_pb2.NewEvent, field: str, why: str
) -> None:
    await trigger_and_rule(stubs)
    exc = await rpc_error(create(stubs, event), INVALID)
    violations = field_violations(exc)
    assert why in violations[field], violations
    assert len(exc.details() or "") <= limits.MAX_ERROR_MESSAGE
    assert "\x00" not in (exc.details() or "")
    assert await stored(conn) == (0, 0)


async def test_an_error_quoting_a_huge_input_stays_short_and_is_not_resource_exhausted(stubs: Stubs) -> None:
    exc = await rpc_error(
        stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="Not\x00A\u00e9Ref" * 20)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert len(exc.details() or "") <= limits.MAX_ERROR_MESSAGE
    assert (exc.details() or "").isascii()
    assert "(180 characters)" in field_violations(exc)["ref"]
    exc = await rpc_error(stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="x" * 5000)), INVALID)
    assert "got 5000" in field_violations(exc)["ref"]


async def test_many_bad_fields_make_one_bounded_error(stubs: Stubs) -> None:
    events = [new_event("Bad Ref " * 50, source_ref="x" * 300) for _ in range(500)]
    exc = await rpc_error(stubs.events.CreateEvents(event_pb2.CreateEventsRequest(events=events)), INVALID)
    violations = field_violations(exc)
    assert len(violations) == limits.MAX_VIOLATIONS + 1  # and a last one saying how many more
    assert "more violations" in violations[""]


async def test_undecodable_bytes_are_invalid_argument_naming_the_message(stubs: Stubs, api: Any) -> None:
    async with authed_channel(f"127.0.0.1:{api.port}") as channel:
        raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/automation.v1.EventService/CreateEvent"
        )
        # A string field holding invalid UTF-8, then plain garbage.
        for body in (b"\x0a\x05\x0a\x03\xff\xfe\xfd", b"\xff\xff\xff\xff"):
            exc = await rpc_error(raw(body), INVALID)
            assert "could not be decoded" in field_violations(exc)["automation.v1.CreateEventRequest"]
        deep = struct_pb2.Value()
        inner = deep
        for _ in range(60):
            inner = inner.struct_value.fields["a"]
        request = event_pb2.CreateEventRequest(event=event_pb2.NewEvent(trigger_ref="core.t"))
        request.event.payload.fields["a"].CopyFrom(deep)
        exc = await rpc_error(raw(request.SerializeToString()), INVALID)
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/automation.v1.EnforcementService/WatchEnforcements"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stream(b"\xff\xff"):
                pass
        assert info.value.code() == INVALID


# --- rules: matching cost bounded by construction ---------------------------------------------


async def test_rules_over_the_matching_limits_are_refused(stubs: Stubs) -> None:
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="core.t")))
    too_many = rule("demo.r", "core.t", conditions=[(f"f{i}", EQUALS, i) for i in range(limits.MAX_CONDITIONS + 1)])
    exc = await rpc_error(stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=too_many)), INVALID)
    assert "at most 64 conditions" in field_violations(exc)["rule.conditions"]
    long_path = rule("demo.r", "core.t", conditions=[("a" * 300, EQUALS, 1), (".".join("a" * 20), EQUALS, 1)])
    exc = await rpc_error(stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=long_path)), INVALID)
    assert "at most 256 characters" in field_violations(exc)["rule.conditions[0].field"]
    assert "at most 16 segments" in field_violations(exc)["rule.conditions[1].field"]
    big_value = rule("demo.r", "core.t", conditions=[("a", EQUALS, "v" * 5000)])
    exc = await rpc_error(stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=big_value)), INVALID)
    assert "rule.conditions[0].value" in field_violations(exc)


async def test_a_trigger_takes_at_most_its_limit_of_rules(stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.api.store.rules.MAX_RULES_PER_TRIGGER", 3)
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="core.t")))
    await asyncio.gather(
        *(stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule(f"demo.r{i}", "core.t"))) for i in range(3))
    )
    exc = await rpc_error(
        stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.r9", "core.t"))),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "the most one trigger may have" in (exc.details() or "")


# --- one bad call never fails its neighbours ------------------------------------------------------


async def test_a_database_failure_of_one_coalesced_event_fails_only_its_own_call(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    """Concurrent CreateEvent calls share statements; a failure the database raises for one
    event (here a trigger raising program_limit_exceeded, or an internal error) must leave
    every other call answered OK with its event stored once, and the poison call answered
    with its own error and nothing stored."""
    await trigger_and_rule(stubs)
    await conn.execute(
        """
        CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.payload ? 'limit' THEN RAISE EXCEPTION 'too big' USING ERRCODE = '54000'; END IF;
            IF NEW.payload ? 'odd' THEN RAISE EXCEPTION 'odd' USING ERRCODE = 'XX000'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER poison BEFORE INSERT ON event FOR EACH ROW EXECUTE FUNCTION poison();
        """
    )
    payloads: list[dict[str, Any]] = [{"n": i} for i in range(24)]
    payloads[5] = {"limit": 1}
    payloads[17] = {"odd": 1}
    results = await asyncio.gather(*(create(stubs, new_event("core.t", p)) for p in payloads), return_exceptions=True)
    ok = [r for r in results if isinstance(r, event_pb2.CreateEventResponse)]
    assert len(ok) == 22
    limit_error, odd_error = results[5], results[17]
    assert isinstance(limit_error, grpc.aio.AioRpcError)
    assert limit_error.code() == INVALID
    assert "too large to store" in (limit_error.details() or "")
    assert "too big" not in (limit_error.details() or "")  # PostgreSQL's own text stays in the log
    assert isinstance(odd_error, grpc.aio.AioRpcError)
    assert odd_error.code() == grpc.StatusCode.INTERNAL
    assert await stored(conn) == (22, 22)
    assert {r.event.id for r in ok} == {row["id"] for row in await conn.fetch("SELECT id FROM event")}
