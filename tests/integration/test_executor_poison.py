"""One bad enforcement costs the executor that enforcement, never the stream or the others.

The poison cases (and one on how the executor asks for rules) run the real ``Executor`` over a
real channel against a stand-in api: a ``grpc.aio`` server that sends a watch stream of raw
bytes (so it can send what protobuf refuses to decode) and records every decision and release
it is sent. The last test runs it against the real api on a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import message as protobuf_message

from services.executor import Executor
from services.executor._executor import MAX_RELEASE_ERROR, Decision
from shared.config import ClientSecurity, ExecutorConfig
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import TOKENS, eventually, new_event, rule

PROCESSED = common_pb2.ENFORCEMENT_STATUS_PROCESSED
DEPTH = 40  # JSON levels: about 120 protobuf levels, past the decoder's limit of 100
POISON_RULE = 666  # the stand-in's GetRule answers this rule with bytes that do not decode
Response = enforcement_pb2.WatchEnforcementsResponse


def delivery(id_: int, rule_id: int = 3, depth: int = 1) -> bytes:
    """An encoded delivery whose payload nests ``depth`` JSON objects (built in place: copying
    a value too deep to decode would fail)."""
    msg = Response()
    msg.delivery.attempt = 1
    enforcement = msg.delivery.enforcement
    if id_:
        enforcement.id = id_
    enforcement.rule = rule_id
    enforcement.rule_ref = f"demo.r{rule_id}"
    enforcement.trigger_ref = "core.webhook"
    enforcement.status = common_pb2.ENFORCEMENT_STATUS_CREATED
    level = enforcement.payload
    for _ in range(depth):
        level = level.fields["a"].struct_value
    level.fields["leaf"].string_value = "x"
    return msg.SerializeToString()


def poison(id_: int) -> bytes:
    data = delivery(id_, depth=DEPTH)
    with pytest.raises(protobuf_message.DecodeError):
        Response.FromString(data)  # the premise: this really is undecodable
    return data


def heartbeat() -> bytes:
    return Response(heartbeat=enforcement_pb2.Heartbeat(in_flight=0)).SerializeToString()


def deep_rule(rule_id: int) -> bytes:
    answer = rule_pb2.Rule(id=rule_id, ref=f"demo.r{rule_id}", action_ref="core.echo", enabled=True)
    level = answer.action_params
    for _ in range(DEPTH):
        level = level.fields["a"].struct_value
    return answer.SerializeToString()


@dataclass
class StandIn:
    """A stand-in api: one fixed watch stream, and a record of what the executor sends back."""

    stream: list[bytes]
    target: str = ""
    watches: int = 0
    resolved: dict[int, enforcement_pb2.ResolveEnforcementRequest] = field(default_factory=dict)
    released: dict[int, enforcement_pb2.ReleaseEnforcementRequest] = field(default_factory=dict)
    rule_calls: Counter[int] = field(default_factory=Counter)
    held_rule: int = 0
    """GetRule of this rule is answered only once GetRule of another rule was asked (0: none held)."""
    other_asked: asyncio.Event = field(default_factory=asyncio.Event)
    twice: int = 0
    """Batches refused for naming an enforcement twice (as the api refuses them)."""

    async def watch(self, _request: enforcement_pb2.WatchEnforcementsRequest, _context: object) -> AsyncIterator[bytes]:
        self.watches += 1
        for raw in self.stream:
            yield raw
        # Like the api, the stream stays open until the executor goes.
        await asyncio.get_running_loop().create_future()

    async def resolve(
        self, request: enforcement_pb2.ResolveEnforcementsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> enforcement_pb2.ResolveEnforcementsResponse:
        if len({d.id for d in request.decisions}) < len(request.decisions):
            self.twice += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an enforcement appears twice")
        outcomes = []
        for decision in request.decisions:
            self.resolved[decision.id] = decision
            outcomes.append(enforcement_pb2.ResolutionOutcome(id=decision.id, status=decision.status))
        return enforcement_pb2.ResolveEnforcementsResponse(outcomes=outcomes)

    async def release(
        self, request: enforcement_pb2.ReleaseEnforcementRequest, _context: object
    ) -> enforcement_pb2.ReleaseEnforcementResponse:
        self.released[request.id] = request
        return enforcement_pb2.ReleaseEnforcementResponse(released=True)

    async def get_rule(self, request: rule_pb2.GetRuleRequest, _context: object) -> bytes:
        self.rule_calls[request.id] += 1
        if self.held_rule and request.id == self.held_rule:
            await self.other_asked.wait()
        elif self.held_rule:
            self.other_asked.set()
        if request.id == POISON_RULE:
            return deep_rule(request.id)
        answer = rule_pb2.Rule(id=request.id, ref=f"demo.r{request.id}", action_ref="core.echo", enabled=True)
        return answer.SerializeToString()


@contextlib.asynccontextmanager
async def stand_in(stream: list[bytes]) -> AsyncIterator[StandIn]:
    api = StandIn(stream)
    server = grpc.aio.server()
    # The responses are written as bytes (no serializer), so the stream can carry anything.
    enforcements = grpc.method_handlers_generic_handler(
        "automation.v1.EnforcementService",
        {
            "WatchEnforcements": grpc.unary_stream_rpc_method_handler(
                api.watch, request_deserializer=enforcement_pb2.WatchEnforcementsRequest.FromString
            ),
            "ResolveEnforcements": grpc.unary_unary_rpc_method_handler(
                api.resolve,
                request_deserializer=enforcement_pb2.ResolveEnforcementsRequest.FromString,
                response_serializer=enforcement_pb2.ResolveEnforcementsResponse.SerializeToString,
            ),
            "ReleaseEnforcement": grpc.unary_unary_rpc_method_handler(
                api.release,
                request_deserializer=enforcement_pb2.ReleaseEnforcementRequest.FromString,
                response_serializer=enforcement_pb2.ReleaseEnforcementResponse.SerializeToString,
            ),
        },
    )
    rules = grpc.method_handlers_generic_handler(
        "automation.v1.RuleService",
        {
            "GetRule": grpc.unary_unary_rpc_method_handler(
                api.get_rule, request_deserializer=rule_pb2.GetRuleRequest.FromString
            )
        },
    )
    server.add_generic_rpc_handlers((enforcements, rules))
    api.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield api
    finally:
        await server.stop(0)


@dataclass
class Running:
    executor: Executor
    task: asyncio.Task[None]

    async def until(self, check: Callable[[], bool], what: str) -> None:
        """Waits for ``check``; fails at once, with the reason, if the executor stops meanwhile."""

        async def probe() -> bool:
            if self.task.done():
                raise AssertionError(f"the executor stopped before {what}: {self.task.exception()!r}")
            return check()

        await eventually(probe, what=what)


@contextlib.asynccontextmanager
async def executor(target: str) -> AsyncIterator[Running]:
    config = ExecutorConfig(
        target=target,
        executor_id="exec-poison",
        rpc_timeout_s=5.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        security=ClientSecurity(token=TOKENS["executor"]),
    )
    running = Running(ex := Executor(config), asyncio.create_task(ex.run()))
    try:
        yield running
    finally:
        ex.stop()
        await asyncio.wait_for(running.task, 15)


async def test_an_undecodable_delivery_is_released_alone_and_the_stream_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="services.executor")
    stream = [heartbeat(), delivery(1), poison(2), delivery(0, depth=DEPTH), delivery(3)]
    async with stand_in(stream) as api, executor(api.target) as running:
        await running.until(lambda: {1, 3} <= api.resolved.keys() and 2 in api.released, "1 and 3 resolved, 2 released")
        assert not running.task.done()
    assert sorted(api.resolved) == [1, 3]
    assert all(d.status == PROCESSED for d in api.resolved.values())
    # Only the poison is charged an attempt: nothing else is released, the stream is not reopened.
    assert list(api.released) == [2]
    released = api.released[2]
    assert released.executor_id == "exec-poison"
    assert released.error.startswith("undecodable delivery: DecodeError")
    assert len(released.error) <= MAX_RELEASE_ERROR
    assert api.watches == 1
    assert running.executor.resolved == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("enforcement 2 (rule 'demo.r3', attempt 1): undecodable delivery") for m in warnings)
    # The one without an id is logged and dropped: its lease runs out on its own.
    assert any(m.startswith("dropped an undecodable watch message") for m in warnings)


async def test_an_answer_that_cannot_be_used_releases_that_enforcement_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="services.executor")
    stream = [delivery(1), delivery(2, rule_id=POISON_RULE), delivery(3)]
    async with stand_in(stream) as api, executor(api.target) as running:
        await running.until(lambda: {1, 3} <= api.resolved.keys() and 2 in api.released, "1 and 3 resolved, 2 released")
        assert not running.task.done()
    assert sorted(api.resolved) == [1, 3]
    assert list(api.released) == [2]
    assert api.released[2].error == "ValueError: GetRule: undecodable answer"
    assert api.watches == 1
    # Logged once, with the traceback.
    (record,) = [r for r in caplog.records if r.getMessage().startswith("enforcement 2: ValueError")]
    assert record.exc_info is not None


async def test_an_exception_while_deciding_one_releases_it_with_a_bounded_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = [delivery(i) for i in range(1, 6)]
    async with stand_in(stream) as api:
        ex = Executor(ExecutorConfig(target=api.target, executor_id="exec-poison", rpc_timeout_s=5.0))
        decide = ex.decide

        async def flaky(enforcement: common_pb2.Enforcement) -> Decision:
            if enforcement.id == 4:
                raise RuntimeError("surprise " * 200)
            return await decide(enforcement)

        monkeypatch.setattr(ex, "decide", flaky)
        running = Running(ex, asyncio.create_task(ex.run()))
        try:
            await running.until(lambda: len(api.resolved) == 4 and 4 in api.released, "4 resolved, 1 released")
            assert not running.task.done()
        finally:
            ex.stop()
            await asyncio.wait_for(running.task, 15)
    assert sorted(api.resolved) == [1, 2, 3, 5]
    assert list(api.released) == [4]
    error = api.released[4].error
    assert error.startswith("RuntimeError: surprise surprise")
    assert len(error) == MAX_RELEASE_ERROR
    assert api.watches == 1


async def test_decisions_waiting_for_one_rule_share_one_get_rule_call() -> None:
    # Twenty enforcements of rule 3, then one of rule 4. The executor reads them in order and
    # starts their decisions in order, so by the time rule 4 is asked for, every decision of
    # rule 3 has asked for its rule too: GetRule(3) is answered only then. Each used to send
    # its own call (twenty, over a slow link each holding one of the api's pool connections).
    stream = [*(delivery(i, rule_id=3) for i in range(1, 21)), delivery(21, rule_id=4)]
    async with stand_in(stream) as api:
        api.held_rule = 3
        async with executor(api.target) as running:
            await running.until(lambda: len(api.resolved) == 21, "all 21 resolved")
    assert all(d.status == PROCESSED for d in api.resolved.values())
    assert api.rule_calls == {3: 1, 4: 1}


async def test_an_enforcement_decided_twice_at_once_is_sent_once_per_batch() -> None:
    # Enforcement 1 delivered four times (its lease lapsed and it came back while the first
    # delivery was still being decided): all four decisions wait for the one GetRule(3), then
    # reach the resolve batcher together. The api refuses a batch naming an enforcement twice,
    # all of it; the executor sends each once.
    stream = [*(delivery(1, rule_id=3) for _ in range(4)), delivery(2, rule_id=4)]
    async with stand_in(stream) as api:
        api.held_rule = 3
        async with executor(api.target) as running:
            await running.until(lambda: len(api.resolved) == 2, "1 and 2 resolved")
            await running.until(lambda: running.executor.resolved == 5, "five decisions answered")
    assert api.twice == 0
    assert sorted(api.resolved) == [1, 2]


async def test_the_real_api_resolves_through_the_raw_watch_stream(stubs: Stubs) -> None:
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="core.webhook")))
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.a", "core.webhook")))

    async def create() -> int:
        resp = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook", {"i": 1})))
        (enforcement,) = resp.enforcements
        return enforcement.id

    backlog = await create()  # waiting before the executor connects: claimed
    async with executor(stubs.target) as running:
        await running.until(lambda: running.executor.resolved >= 1, "the backlog to be resolved")
        live = await create()  # the stream is open: handed off

        async def both_processed() -> bool:
            for id_ in (backlog, live):
                got = await stubs.enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=id_))
                if got.status != PROCESSED:
                    return False
            return not running.task.done()

        await eventually(both_processed, what="both enforcements PROCESSED")
    state = await stubs.enforcements.GetDispatchState(enforcement_pb2.GetDispatchStateRequest())
    assert (state.pending, state.exhausted_count) == (0, 0)
    assert running.executor.resolved == 2
