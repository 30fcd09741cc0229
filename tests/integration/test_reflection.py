"""Server reflection, the way grpcurl uses it: list, describe, then call with JSON and no .proto.

Nothing here imports the generated automation.v1 modules: every message class is built from
descriptors fetched over the reflection service into a fresh descriptor pool.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2

from tests.conftest import Stubs

REFLECTION_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
AUTOMATION_SERVICES = [
    "automation.v1.EventService",
    "automation.v1.EnforcementService",
    "automation.v1.RuleService",
    "automation.v1.ExecutionService",
    "automation.v1.HistoryService",
    "automation.v1.AnalyticsService",
]


class Reflection:
    """A grpcurl-like client: one reflection stream, a pool of what it learned, JSON calls."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.pool = descriptor_pool.DescriptorPool()
        self._files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self._added: set[str] = set()
        self._stream = channel.stream_stream(
            REFLECTION_METHOD,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )()

    async def ask(self, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        await self._stream.write(request)
        response = await self._stream.read()
        assert isinstance(response, reflection_pb2.ServerReflectionResponse)
        assert not response.HasField("error_response"), response.error_response.error_message
        return response

    async def close(self) -> None:
        await self._stream.done_writing()
        self._stream.cancel()

    async def list_services(self) -> list[str]:
        response = await self.ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        return [s.name for s in response.list_services_response.service]

    def _learn(self, response: reflection_pb2.ServerReflectionResponse) -> None:
        for raw in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            self._files.setdefault(proto.name, proto)

    async def load_symbol(self, symbol: str) -> None:
        """Fetches the file defining ``symbol`` and every file it depends on into the pool."""
        self._learn(await self.ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)))
        while missing := {d for f in self._files.values() for d in f.dependency} - set(self._files):
            for name in sorted(missing):
                self._learn(await self.ask(reflection_pb2.ServerReflectionRequest(file_by_filename=name)))
        self._add_to_pool()

    def _add_to_pool(self) -> None:
        """Adds the fetched files not yet in the pool, each after the files it imports."""
        while todo := [f for name, f in self._files.items() if name not in self._added]:
            ready = [f for f in todo if all(d in self._added for d in f.dependency)]
            assert ready, f"unresolvable imports among {sorted(f.name for f in todo)}"
            for f in ready:
                self.pool.Add(f)
                self._added.add(f.name)

    def message_class(self, full_name: str) -> type[Message]:
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    async def call_json(self, service: str, method: str, body: str) -> dict[str, Any]:
        """Calls a unary method with a JSON request (like ``grpcurl -d``); returns the JSON answer."""
        return json.loads(await self.call_json_text(service, method, body))  # type: ignore[no-any-return]

    async def call_json_text(self, service: str, method: str, body: str) -> str:
        m = self.pool.FindServiceByName(service).methods_by_name[method]
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        request = json_format.Parse(body, request_cls())
        call: grpc.aio.UnaryUnaryMultiCallable[Message, Message] = self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=lambda msg: msg.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        response = await call(request)
        assert isinstance(response, response_cls)
        return json_format.MessageToJson(response)


@pytest.fixture
async def reflection(stubs: Stubs) -> AsyncIterator[Reflection]:
    client = Reflection(stubs.channel)
    yield client
    await client.close()


async def test_reflection_lists_every_service(reflection: Reflection) -> None:
    names = await reflection.list_services()
    for service in [*AUTOMATION_SERVICES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]:
        assert service in names


async def test_reflection_describes_services_and_messages(reflection: Reflection) -> None:
    for service in AUTOMATION_SERVICES:
        await reflection.load_symbol(service)
    enforcements = reflection.pool.FindServiceByName("automation.v1.EnforcementService")
    assert {"CreateEnforcement", "ResolveEnforcement", "WatchEnforcements", "GetDispatchState"} <= set(
        enforcements.methods_by_name
    )
    assert enforcements.methods_by_name["WatchEnforcements"].server_streaming
    events = reflection.pool.FindServiceByName("automation.v1.EventService")
    assert set(events.methods_by_name) == {
        "CreateEvent",
        "CreateEvents",
        "GetEvent",
        "ListEvents",
        "ReemitEvent",
        "TailEvents",
        "Publish",
        "PublishBatch",
    }
    assert events.methods_by_name["TailEvents"].server_streaming
    # The CloudEvents Protobuf Format's own message, from its own package, as grpcurl sees it.
    assert events.methods_by_name["Publish"].input_type.full_name == "io.cloudevents.v1.CloudEvent"
    enforcement = reflection.pool.FindMessageTypeByName("automation.v1.Enforcement")
    resolved_at = enforcement.fields_by_name["resolved_at"]
    assert resolved_at.message_type is not None
    assert resolved_at.message_type.full_name == "google.protobuf.Timestamp"
    assert resolved_at.has_presence  # `optional`: unset while pending, and JSON leaves it out
    assert enforcement.fields_by_name["event"].has_presence


async def test_every_rpc_of_the_pipeline_can_be_called_with_json_through_reflection(
    reflection: Reflection,
) -> None:
    for service in AUTOMATION_SERVICES:
        await reflection.load_symbol(service)
    rules, events, enforcements = (
        "automation.v1.RuleService",
        "automation.v1.EventService",
        "automation.v1.EnforcementService",
    )

    trigger = await reflection.call_json(rules, "CreateTrigger", '{"trigger": {"ref": "core.webhook"}}')
    assert trigger["ref"] == "core.webhook" and trigger["packRef"] == "core"
    rule = await reflection.call_json(
        rules,
        "CreateRule",
        """{"rule": {"ref": "demo.greet", "triggerRef": "core.webhook", "actionRef": "core.echo",
                     "actionParams": {"who": "{{ event.payload.user }}"},
                     "conditions": [{"field": "user", "operator": "CONDITION_OPERATOR_EQUALS",
                                     "value": "ann"}]}}""",
    )
    assert rule["enabled"] is True and rule["condition"] == "ENFORCEMENT_CONDITION_ALL"

    created = await reflection.call_json(
        events, "CreateEvent", '{"event": {"triggerRef": "core.webhook", "payload": {"user": "ann"}}}'
    )
    (enf,) = created["enforcements"]
    assert enf["ruleRef"] == "demo.greet" and enf["config"] == {"who": "ann"}
    assert enf["event"] == created["event"]["id"]

    pending = await reflection.call_json_text(enforcements, "GetEnforcement", json.dumps({"id": enf["id"]}))
    assert '"status": "ENFORCEMENT_STATUS_CREATED"' in pending
    assert "resolvedAt" not in pending

    resolved = await reflection.call_json(
        enforcements, "ResolveEnforcement", json.dumps({"id": enf["id"], "status": "ENFORCEMENT_STATUS_PROCESSED"})
    )
    assert resolved["execution"]["actionRef"] == "core.echo"
    assert resolved["execution"]["config"] == {"who": "ann"}

    after = await reflection.call_json(enforcements, "GetEnforcement", json.dumps({"id": enf["id"]}))
    assert after["status"] == "ENFORCEMENT_STATUS_PROCESSED"
    assert "resolvedAt" in after

    listed = await reflection.call_json(events, "ListEvents", '{"triggerRef": "core.webhook", "pageSize": 5}')
    assert [e["id"] for e in listed["events"]] == [created["event"]["id"]]


async def test_json_call_with_bad_input_gets_invalid_argument_through_reflection(reflection: Reflection) -> None:
    await reflection.load_symbol("automation.v1.RuleService")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await reflection.call_json("automation.v1.RuleService", "CreateTrigger", '{"trigger": {"ref": "Bad Ref"}}')
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "trigger.ref" in (info.value.details() or "")
