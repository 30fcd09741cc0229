"""CloudEvents in, over real gRPC (the Protobuf Format's messages) and real HTTP (the web service
in front of a real api on a real PostgreSQL): the HTTP binding's binary, structured and batch
modes (the binding's own examples, and the ``cloudevents`` SDK as a client), the web hook
handshake, redelivery storing one event, and every refusal storing nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent as SdkEvent
from google.protobuf import json_format

from services.api.server import ApiServer
from services.api.servicers.webhooks import signature_of
from shared.gen.automation.v1 import event_pb2, rule_pb2
from shared.gen.io.cloudevents.v1 import cloudevents_pb2
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel, count, field_violations, rpc_error, struct, web_service

TYPE = "com.example.someevent"
"""The HTTP binding's example type: a valid trigger ref, so Publish finds the trigger by it."""
SECRET = "s3cret-that-is-long-enough"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def ce(id_: str = "1234-1234-1234", data: Any = None, **attrs: str) -> cloudevents_pb2.CloudEvent:
    msg = cloudevents_pb2.CloudEvent(id=id_, source="/mycontext/subcontext", spec_version="1.0", type=TYPE)
    for name, value in attrs.items():
        msg.attributes[name].ce_string = value
    if data is not None:
        msg.text_data = json.dumps(data)
    return msg


async def trigger(stubs: Stubs, **kw: Any) -> rule_pb2.Trigger:
    made: rule_pb2.Trigger = await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=TYPE, webhook_enabled=True, **kw))
    )
    return made


@pytest.fixture
async def web(api: ApiServer) -> AsyncIterator[str]:
    target = f"127.0.0.1:{api.port}"
    async with channel(target, token=TOKENS["webhook"]) as ch, web_service(target, ch) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


# ---- gRPC ------------------------------------------------------------------------------------


async def test_publish_maps_a_cloudevent_onto_an_event(stubs: Stubs) -> None:
    await trigger(stubs)
    msg = ce(data={"repo": "api"}, subject="orders/7", time="2018-04-05T03:56:24Z", traceid="abc")
    msg.attributes["retries"].ce_integer = 3
    answer = await stubs.events.Publish(msg)
    assert answer.trigger_ref == TYPE and not answer.receipt.replayed
    event = await stubs.events.GetEvent(event_pb2.GetEventRequest(id=answer.receipt.event_id))
    assert event.source_ref == "/mycontext/subcontext"
    assert json_format.MessageToDict(event.payload) == {"repo": "api"}
    assert json_format.MessageToDict(event.config)["cloudevent"] == {
        "id": "1234-1234-1234",
        "source": "/mycontext/subcontext",
        "type": TYPE,
        "specversion": "1.0",
        "subject": "orders/7",
        "time": "2018-04-05T03:56:24Z",
        "extensions": {"traceid": "abc", "retries": 3.0},
    }


async def test_a_redelivery_stores_one_event(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await trigger(stubs)
    first = await stubs.events.Publish(ce(data={"a": 1}))
    again = await stubs.events.Publish(ce(data={"a": 1}))
    assert again.receipt.replayed and again.receipt.event_id == first.receipt.event_id
    batch = await stubs.events.PublishBatch(cloudevents_pb2.CloudEventBatch(events=[ce(data={"a": 1}), ce("2")]))
    assert [r.replayed for r in batch.receipts] == [True, False]
    assert await count(conn, "event") == 2


@pytest.mark.parametrize(
    ("msg", "field", "words"),
    [
        (cloudevents_pb2.CloudEvent(source="/s", spec_version="1.0", type=TYPE), "event.id", "required"),
        (ce(data=None).__class__(id="1", source="/s", spec_version="0.3", type=TYPE), "event.spec_version", "1.0"),
        (cloudevents_pb2.CloudEvent(id="1", source="/s", spec_version="1.0", type="Not A Ref"), "event.type", "pack"),
        (ce(data=[1, 2]), "event.text_data", "JSON object"),
        (ce(data={"a": 1}, datacontenttype="text/plain"), "event.attributes.datacontenttype", "only JSON"),
        (
            cloudevents_pb2.CloudEvent(id="1", source="/s", spec_version="1.0", type=TYPE, text_data="NaN"),
            "event.text_data",
            "not JSON",
        ),
        (ce(data={"a": "x\x00y"}), "event.data.a", "NUL"),
        (
            cloudevents_pb2.CloudEvent(id="1", source="webhook", spec_version="1.0", type=TYPE),
            "event.source",
            "reserved",
        ),
    ],
)
async def test_publish_refuses_naming_the_field(
    stubs: Stubs, conn: asyncpg.Connection, msg: cloudevents_pb2.CloudEvent, field: str, words: str
) -> None:
    await trigger(stubs)
    exc = await rpc_error(stubs.events.Publish(msg), INVALID)
    assert words in field_violations(exc)[field], field_violations(exc)
    assert await count(conn, "event") == 0


async def test_publish_to_an_unknown_type_is_not_found(stubs: Stubs) -> None:
    await rpc_error(stubs.events.Publish(ce()), grpc.StatusCode.NOT_FOUND)


async def test_publish_batch_is_all_or_nothing_and_enforces_the_schema(stubs: Stubs, conn: asyncpg.Connection) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    await trigger(stubs, out_schema=struct(schema))
    events = [ce("1", {"n": 1}), ce("2", {"n": "two"}), ce("3", {"n": 3})]
    exc = await rpc_error(stubs.events.PublishBatch(cloudevents_pb2.CloudEventBatch(events=events)), INVALID)
    assert field_violations(exc) == {"events[1].payload.n": 'type: "two" is not of type "integer"'}
    assert await count(conn, "event") == 0


async def test_a_sensor_may_publish_and_a_viewer_may_not(stubs: Stubs) -> None:
    await trigger(stubs)
    async with channel(stubs.target, token=TOKENS["sensor"]) as ch:
        await event_pb2_grpc_stub(ch).Publish(ce())
    async with channel(stubs.target, token=TOKENS["viewer"]) as ch:
        await rpc_error(event_pb2_grpc_stub(ch).Publish(ce("2")), grpc.StatusCode.PERMISSION_DENIED)


def event_pb2_grpc_stub(ch: grpc.aio.Channel) -> Any:
    from shared.gen.automation.v1 import event_pb2_grpc

    return event_pb2_grpc.EventServiceStub(ch)


# ---- HTTP ------------------------------------------------------------------------------------


async def test_binary_mode_as_the_binding_shows_it(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    hook = await trigger(stubs)
    headers = {
        "ce-specversion": "1.0",
        "ce-type": TYPE,
        "ce-time": "2018-04-05T03:56:24Z",
        "ce-id": "1234-1234-1234",
        "ce-source": "/mycontext/subcontext",
        "ce-subject": "caf%C3%A9",  # percent-encoded UTF-8
        "Content-Type": "application/json; charset=utf-8",
    }
    answer = await http.post(f"{web}/cloudevents/{hook.webhook_key}", content=b'{"a": 1}', headers=headers)
    assert answer.status_code == 202, answer.text
    (receipt,) = answer.json()["events"]
    event = await stubs.events.GetEvent(event_pb2.GetEventRequest(id=receipt["event_id"]))
    config = json_format.MessageToDict(event.config)
    assert config["cloudevent"]["subject"] == "caf\u00e9"
    assert config["cloudevent"]["datacontenttype"] == "application/json; charset=utf-8"
    assert config["source"] == "cloudevents" and config["hmac_verified"] is False
    assert json_format.MessageToDict(event.payload) == {"a": 1}
    again = await http.post(f"{web}/cloudevents/{hook.webhook_key}", content=b'{"a": 1}', headers=headers)
    assert again.status_code == 202 and again.json()["events"][0]["replayed"] is True
    assert await count(conn, "event") == 1


async def test_structured_and_binary_from_the_sdk(stubs: Stubs, web: str, http: httpx.AsyncClient) -> None:
    hook = await trigger(stubs)
    url = f"{web}/cloudevents/{hook.webhook_key}"
    for convert in (to_structured, to_binary):
        event = SdkEvent({"type": "com.example.other", "source": "/sdk", "myext": "v"}, {"via": convert.__name__})
        headers, body = convert(event)
        answer = await http.post(url, content=body, headers=headers)
        assert answer.status_code == 202, answer.text
        stored = await stubs.events.GetEvent(event_pb2.GetEventRequest(id=answer.json()["events"][0]["event_id"]))
        assert json_format.MessageToDict(stored.payload) == {"via": convert.__name__}
        assert json_format.MessageToDict(stored.config)["cloudevent"]["extensions"] == {"myext": "v"}
        assert stored.trigger_ref == TYPE  # the key chose the trigger, whatever the type


async def test_batch_mode_is_all_or_nothing(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    hook = await trigger(stubs)
    url = f"{web}/cloudevents/{hook.webhook_key}"
    batch = [{"specversion": "1.0", "type": TYPE, "id": str(i), "source": "/b", "data": {"i": i}} for i in range(3)]
    headers = {"content-type": "application/cloudevents-batch+json"}
    answer = await http.post(url, content=json.dumps(batch), headers=headers)
    assert answer.status_code == 202, answer.text
    assert len(answer.json()["events"]) == 3
    batch.append({"specversion": "1.0", "type": TYPE, "id": "x", "source": "/b", "data": "not an object"})
    refused = await http.post(url, content=json.dumps([*batch[:1], batch[-1]]), headers=headers)
    assert refused.status_code == 400 and "events[1]" in refused.text
    for bad in (b"{}", b"[]", b"[1]", b"not json", b'[{"id": "1"}]'):
        assert (await http.post(url, content=bad, headers=headers)).status_code == 400
    assert await count(conn, "event") == 3


async def test_the_web_hook_handshake(stubs: Stubs, web: str, http: httpx.AsyncClient) -> None:
    hook = await trigger(stubs)
    asked = {"WebHook-Request-Origin": "eventemitter.example.com"}
    answer = await http.options(f"{web}/cloudevents/{hook.webhook_key}", headers=asked)
    assert answer.status_code == 200
    assert answer.headers["webhook-allowed-origin"] == "eventemitter.example.com"
    assert "POST" in answer.headers["allow"]
    unknown = await http.options(f"{web}/cloudevents/wh_{'0' * 32}", headers=asked)
    assert unknown.status_code == 404


async def test_signed_triggers_need_a_signature(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    hook = await trigger(stubs, webhook_secret=SECRET)
    url = f"{web}/cloudevents/{hook.webhook_key}"
    event = {"specversion": "1.0", "type": TYPE, "id": "1", "source": "/s", "data": {"a": 1}}
    body = json.dumps(event).encode()
    headers = {"content-type": "application/cloudevents+json"}
    assert (await http.post(url, content=body, headers=headers)).status_code == 401
    wrong = {**headers, "X-Hub-Signature-256": signature_of("another-secret-long-enough", body)}
    assert (await http.post(url, content=body, headers=wrong)).status_code == 401
    assert await count(conn, "event") == 0
    right = {**headers, "X-Hub-Signature-256": signature_of(SECRET, body)}
    answer = await http.post(url, content=body, headers=right)
    assert answer.status_code == 202 and answer.json()["hmac_verified"] is True


async def test_refusals_store_nothing(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    schema = {"type": "object", "required": ["a"]}
    hook = await trigger(stubs, out_schema=struct(schema))
    url = f"{web}/cloudevents/{hook.webhook_key}"
    base = {"ce-specversion": "1.0", "ce-type": TYPE, "ce-id": "1", "ce-source": "/s"}
    cases = [
        ({k: v for k, v in base.items() if k != "ce-id"}, b'{"a": 1}', 400),  # a required attribute missing
        ({**base, "content-type": "text/plain"}, b"hello", 400),  # not JSON data
        ({**base, "content-type": "application/json"}, b'{"b": 1}', 400),  # fails the schema
        ({**base, "ce-specversion": "0.3"}, b'{"a": 1}', 400),
        ({**base, "ce-subject": "%FF"}, b'{"a": 1}', 400),  # not UTF-8 once decoded
        ({**base, "content-type": "application/json"}, b'{"a": "\\u0000"}', 400),  # NUL
        ({**base, "content-type": "application/json"}, b'{"a": NaN}', 400),
        ({**base, "content-type": "application/json"}, b"[" * 100 + b"]" * 100, 400),  # depth
    ]
    for headers, body, status in cases:
        answer = await http.post(url, content=body, headers=headers)
        assert answer.status_code == status, (headers, body, answer.text)
    schema_refusal = await http.post(url, content=b'{"b": 1}', headers={**base, "content-type": "application/json"})
    assert "required" in schema_refusal.json()["error"]
    assert (await http.post(f"{web}/cloudevents/wh_{'0' * 32}", content=b"{}", headers=base)).status_code == 404
    assert (await http.post(f"{web}/cloudevents/nope", content=b"{}", headers=base)).status_code == 404
    assert await count(conn, "event") == 0


async def test_a_sensor_token_publishes_without_a_key_and_other_roles_are_refused(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    await trigger(stubs)
    url = f"{web}/cloudevents"
    sensor = {"authorization": f"Bearer {TOKENS['sensor']}"}
    # Structured: the type names the trigger, as for a gRPC Publish.
    one = {"specversion": "1.0", "type": TYPE, "id": "t-1", "source": "/tok", "data": {"n": 1}}
    answer = await http.post(
        url, content=json.dumps(one), headers={**sensor, "content-type": "application/cloudevents+json"}
    )
    assert answer.status_code == 202, answer.text
    stored = await stubs.events.GetEvent(event_pb2.GetEventRequest(id=answer.json()["events"][0]["event_id"]))
    assert stored.trigger_ref == TYPE and json_format.MessageToDict(stored.payload) == {"n": 1}
    # A redelivery stores nothing more; a batch goes all or nothing through PublishBatch.
    again = await http.post(
        url, content=json.dumps(one), headers={**sensor, "content-type": "application/cloudevents+json"}
    )
    assert again.status_code == 202 and again.json()["events"][0]["replayed"] is True
    batch = [{**one, "id": f"t-b{i}", "data": {"i": i}} for i in range(3)]
    batched = await http.post(
        url, content=json.dumps(batch), headers={**sensor, "content-type": "application/cloudevents-batch+json"}
    )
    assert batched.status_code == 202 and len(batched.json()["events"]) == 3, batched.text
    # Binary mode: the ce- headers.
    binary = await http.post(
        url,
        content=json.dumps({"b": True}),
        headers={
            **sensor,
            "content-type": "application/json",
            "ce-specversion": "1.0",
            "ce-type": TYPE,
            "ce-id": "t-bin",
            "ce-source": "/tok",
        },
    )
    assert binary.status_code == 202, binary.text
    assert await count(conn, "event") == 5
    # No token, a viewer's, an unknown one, an unknown type: refused, nothing stored.
    refused = {
        "none": await http.post(
            url, content=json.dumps({**one, "id": "x1"}), headers={"content-type": "application/cloudevents+json"}
        ),
        "viewer": await http.post(
            url,
            content=json.dumps({**one, "id": "x2"}),
            headers={"authorization": f"Bearer {TOKENS['viewer']}", "content-type": "application/cloudevents+json"},
        ),
        "unknown": await http.post(
            url,
            content=json.dumps({**one, "id": "x3"}),
            headers={
                "authorization": "Bearer atk_not-a-token-0123456789abcdefghij",
                "content-type": "application/cloudevents+json",
            },
        ),
        "type": await http.post(
            url,
            content=json.dumps({**one, "id": "x4", "type": "no.such"}),
            headers={**sensor, "content-type": "application/cloudevents+json"},
        ),
    }
    assert {k: r.status_code for k, r in refused.items()} == {"none": 401, "viewer": 403, "unknown": 401, "type": 404}
    assert refused["none"].headers["www-authenticate"].startswith("Bearer")
    assert await count(conn, "event") == 5
