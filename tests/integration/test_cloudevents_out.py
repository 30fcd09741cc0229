"""CloudEvents out: the tails with format CLOUDEVENTS over real gRPC channels, and the web
service's ``GET /cloudevents/stream`` read by a real HTTP client; every event emitted is parsed
by the ``cloudevents`` SDK (its strict v1.0 core), which refuses what breaks the specification."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import grpc
import httpx
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkEvent
from google.protobuf import json_format

from services.api.auth import new_token
from services.api.server import ApiServer
from services.api.store import Store
from services.web import live
from services.web.cloudevents_out import structured
from shared.config import ApiConfig
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, enforcement_pb2_grpc, event_pb2, rule_pb2
from shared.gen.io.cloudevents.v1 import cloudevents_pb2
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel, eventually, field_violations, new_event, rpc_error, rule, web_service
from tests.integration.tails_support import emit, opened, tail_enforcements, tail_events, take, triggers

SOURCE = "/automation/test"
CREATED = enforcement_pb2.TailEnforcementsResponse.CHANGE_CREATED
RESOLVED = enforcement_pb2.TailEnforcementsResponse.CHANGE_RESOLVED
FORMAT = common_pb2.TAIL_FORMAT_CLOUDEVENTS
READ_S = 15.0


@pytest.fixture
def api_config(api_config: ApiConfig) -> ApiConfig:
    """The shared settings with a deployment's own CloudEvents source."""
    return dataclasses.replace(api_config, cloudevents_source=SOURCE)


def sdk(event: cloudevents_pb2.CloudEvent) -> SdkEvent:
    """The event as the SDK reads a structured-mode HTTP request: its validation is the check."""
    body = json.dumps(structured(event)).encode()
    parsed = from_structured(HTTPMessage({"content-type": JSONFormat.CONTENT_TYPE}, body), JSONFormat(), SdkEvent)
    assert isinstance(parsed, SdkEvent)
    return parsed


def attr(event: cloudevents_pb2.CloudEvent, name: str) -> Any:
    value = event.attributes[name]
    kind = value.WhichOneof("attr")
    assert kind is not None, name
    return getattr(value, kind)


async def resolve(stubs: Stubs, id_: int, status: int = common_pb2.ENFORCEMENT_STATUS_PROCESSED) -> None:
    async with channel(stubs.target, TOKENS["executor"]) as ch:
        await enforcement_pb2_grpc.EnforcementServiceStub(ch).ResolveEnforcement(
            enforcement_pb2.ResolveEnforcementRequest(id=id_, status=status, executor_id="test")  # type: ignore[arg-type]
        )


async def get(stubs: Stubs, id_: int) -> common_pb2.Enforcement:
    got: common_pb2.Enforcement = await stubs.enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=id_))
    return got


async def fired(stubs: Stubs, trigger_ref: str, **payload: Any) -> int:
    """Stores an event that fires exactly one enforcement; its id."""
    resp = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(trigger_ref, payload)))
    (enforcement,) = resp.enforcements
    return int(enforcement.id)


async def rules(stubs: Stubs) -> None:
    await triggers(stubs, "demo.a", "demo.b")
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.r", "demo.a")))
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.other", "demo.b")))


# ---- gRPC -----------------------------------------------------------------------------------


async def test_enforcements_as_cloudevents_created_then_resolved(api: ApiServer, stubs: Stubs) -> None:
    await rules(stubs)
    call = tail_enforcements(stubs, rule_ref="demo.r", format=FORMAT, announce_start=True)
    (start,) = await take(call, 1)
    assert not start.HasField("cloud_event") and start.cursor
    await emit(stubs, "demo.b", n=0)  # fires demo.other: filtered out
    id_ = await fired(stubs, "demo.a", n=1)
    stored = await get(stubs, id_)

    (created,) = await take(call, 1)
    assert created.change == CREATED and not created.HasField("enforcement")
    ce = created.cloud_event
    assert (ce.spec_version, ce.type, ce.source) == ("1.0", "dev.automation.enforcement.created", SOURCE)
    assert (ce.id, attr(ce, "subject")) == (f"enforcement/{id_}/created", f"enforcement/{id_}")
    assert attr(ce, "time") == stored.created
    assert attr(ce, "datacontenttype") == "application/json"
    assert (attr(ce, "triggerref"), attr(ce, "ruleref"), attr(ce, "status")) == ("demo.a", "demo.r", "created")
    assert attr(ce, "tailcursor") == created.cursor
    assert json.loads(ce.text_data) == json_format.MessageToDict(stored)

    await resolve(stubs, id_)
    done = await get(stubs, id_)
    (resolved,) = await take(call, 1)
    assert resolved.change == RESOLVED
    ce = resolved.cloud_event
    assert (ce.type, ce.id) == ("dev.automation.enforcement.resolved", f"enforcement/{id_}/resolved")
    assert attr(ce, "time") == done.resolved_at and attr(ce, "status") == "processed"
    data = json.loads(ce.text_data)
    assert data == json_format.MessageToDict(done) and data["status"] == "ENFORCEMENT_STATUS_PROCESSED"

    # The SDK's strict v1.0 model takes both, attributes typed as the specification says.
    first, second = sdk(created.cloud_event), sdk(resolved.cloud_event)
    assert first.get_type() == "dev.automation.enforcement.created" and first.get_source() == SOURCE
    assert first.get_time() == stored.created.ToDatetime(tzinfo=UTC)
    assert isinstance(second.get_time(), datetime) and second.get_extension("status") == "processed"
    assert second.get_data() == data and second.get_datacontenttype() == "application/json"
    call.cancel()


async def test_a_resumed_tail_resends_nothing_under_the_same_ids(api: ApiServer, stubs: Stubs) -> None:
    await rules(stubs)
    call = tail_enforcements(stubs, trigger_ref="demo.a", format=FORMAT, announce_start=True)
    (start,) = await take(call, 1)
    ids = [await fired(stubs, "demo.a", n=i) for i in range(3)]
    await resolve(stubs, ids[0], common_pb2.ENFORCEMENT_STATUS_DISABLED)
    first = await take(call, 4)
    sent = [m.cloud_event.id for m in first]
    # Creations and resolutions are two tracks: only created-before-resolved is promised.
    assert sorted(sent) == sorted([*(f"enforcement/{id_}/created" for id_ in ids), f"enforcement/{ids[0]}/resolved"])
    assert sent.index(f"enforcement/{ids[0]}/created") < sent.index(f"enforcement/{ids[0]}/resolved")
    call.cancel()

    # From the start: the same changes under the same ids (a consumer dedupes by source + id),
    # each once, with the same content.
    again = tail_enforcements(stubs, trigger_ref="demo.a", format=FORMAT, cursor=start.cursor)
    replayed = {m.cloud_event.id: m.cloud_event for m in await take(again, 4)}
    assert sorted(replayed) == sorted(sent)
    for old in first:
        new = replayed[old.cloud_event.id]
        assert new.text_data == old.cloud_event.text_data
        assert attr(new, "time") == attr(old.cloud_event, "time")
    again.cancel()

    # From the second message's cursor: only what came after it, then the next new change.
    resumed = tail_enforcements(stubs, trigger_ref="demo.a", format=FORMAT, cursor=first[1].cursor)
    later = await take(resumed, 2)
    assert sorted(m.cloud_event.id for m in later) == sorted(sent[2:])
    sentinel = await fired(stubs, "demo.a", sentinel=True)
    (next_,) = await take(resumed, 1)
    assert next_.cloud_event.id == f"enforcement/{sentinel}/created"
    resumed.cancel()


async def test_events_as_cloudevents(api: ApiServer, stubs: Stubs) -> None:
    await triggers(stubs, "demo.a", "demo.b")
    call = await opened(api, tail_events(stubs, trigger_ref="demo.a", format=FORMAT))
    await emit(stubs, "demo.b", n=0)
    id_ = await emit(stubs, "demo.a", n=1)
    (msg,) = await take(call, 1)
    assert not msg.HasField("event")
    ce = msg.cloud_event
    assert (ce.type, ce.id, ce.source) == ("dev.automation.event.created", f"event/{id_}/created", SOURCE)
    assert attr(ce, "subject") == f"event/{id_}" and attr(ce, "triggerref") == "demo.a"
    assert "ruleref" not in ce.attributes and "status" not in ce.attributes
    stored = await stubs.events.GetEvent(event_pb2.GetEventRequest(id=id_))
    assert json.loads(ce.text_data) == json_format.MessageToDict(stored)
    assert attr(ce, "time") == stored.created
    parsed = sdk(ce)
    assert parsed.get_data() == json_format.MessageToDict(stored) and parsed.get_extension("tailcursor") == msg.cursor
    call.cancel()

    # Without the option the tail is as it was: the event, no CloudEvent.
    plain = tail_events(stubs, trigger_ref="demo.a", announce_start=True)
    (start,) = await take(plain, 1)
    assert start.start and not start.HasField("cloud_event")
    id2 = await emit(stubs, "demo.a", n=2)
    (msg,) = await take(plain, 1)
    assert msg.event.id == id2 and not msg.HasField("cloud_event")
    plain.cancel()


async def test_an_unknown_format_names_the_field(api: ApiServer, stubs: Stubs) -> None:
    for call in (
        tail_events(stubs, format=7),
        tail_enforcements(stubs, format=7),
    ):
        exc = await rpc_error(call.read(), grpc.StatusCode.INVALID_ARGUMENT)
        assert "unknown format 7" in field_violations(exc)["format"]


# ---- HTTP: GET /cloudevents/stream -------------------------------------------------------------


@pytest.fixture
async def web(api: ApiServer) -> AsyncIterator[str]:
    target = f"127.0.0.1:{api.port}"
    async with channel(target, token=TOKENS["webhook"]) as ch, web_service(target, ch) as url:
        yield url


@dataclasses.dataclass
class Message:
    id: str
    event: str
    data: str


class Stream:
    """An SSE response read as an EventSource does (comments skipped, fields gathered)."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, (response.status_code, response.headers)
        assert response.headers["content-type"].startswith("text/event-stream")
        self._lines = response.aiter_lines()

    async def _next(self) -> Message:
        id_, event = "", ""
        data: list[str] = []
        async for line in self._lines:
            if not line:
                if id_ or event or data:
                    return Message(id_, event, "\n".join(data))
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                id_ = value
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)
        raise AssertionError("the stream ended")

    async def next(self) -> Message:
        return await asyncio.wait_for(self._next(), READ_S)

    async def cloudevent(self) -> tuple[str, SdkEvent]:
        """The next CloudEvent (bare position moves skipped), parsed by the SDK, and its SSE id."""
        while True:
            message = await self.next()
            if message.data:
                assert message.event == "", message
                body = message.data.encode()
                msg = HTTPMessage({"content-type": JSONFormat.CONTENT_TYPE}, body)
                event = from_structured(msg, JSONFormat(), SdkEvent)
                assert isinstance(event, SdkEvent)
                return message.id, event


def bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


PATH = "/cloudevents/stream?kind=enforcements&rule_ref=demo.r"


async def test_the_stream_sends_cloudevents_and_resumes_from_last_event_id(
    api: ApiServer, stubs: Stubs, web: str
) -> None:
    await rules(stubs)
    async with httpx.AsyncClient(base_url=web, timeout=30) as http:
        async with http.stream("GET", PATH, headers=bearer("viewer")) as response:
            sse = Stream(response)
            start = await sse.next()
            assert start.id and not start.data  # the start position: a reconnect resumes here
            await emit(stubs, "demo.b", n=0)
            id_ = await fired(stubs, "demo.a", n=1)
            created_id, created = await sse.cloudevent()
            assert created.get_id() == f"enforcement/{id_}/created"
            assert created.get_type() == "dev.automation.enforcement.created" and created.get_source() == SOURCE
            assert created.get_extension("tailcursor") == created_id
            data = created.get_data()
            assert isinstance(data, dict) and data["id"] == str(id_) and data["ruleRef"] == "demo.r"
            await resolve(stubs, id_)
            _, resolved = await sse.cloudevent()
            assert resolved.get_id() == f"enforcement/{id_}/resolved"

        # The client comes back with the last id it saw: the resolution again (same id: it
        # dedupes), then new changes only; the created one is not sent twice.
        headers = bearer("viewer") | {"Last-Event-ID": created_id}
        async with http.stream("GET", PATH, headers=headers) as response:
            sse = Stream(response)
            assert (await sse.next()).id == created_id
            _, again = await sse.cloudevent()
            assert again.get_id() == f"enforcement/{id_}/resolved" and again.get_time() == resolved.get_time()
            later = await fired(stubs, "demo.a", n=2)
            _, new = await sse.cloudevent()
            assert new.get_id() == f"enforcement/{later}/created"

        # From the start position: every change of the first streams, each once, under the same
        # ids (creations and resolutions are two tracks: only created-before-resolved is promised).
        headers = bearer("viewer") | {"Last-Event-ID": start.id}
        async with http.stream("GET", PATH, headers=headers) as response:
            sse = Stream(response)
            await sse.next()
            ids = [(await sse.cloudevent())[1].get_id() for _ in range(3)]
            made, done = f"enforcement/{id_}/created", f"enforcement/{id_}/resolved"
            assert sorted(ids) == sorted([made, done, f"enforcement/{later}/created"])
            assert ids.index(made) < ids.index(done)


async def test_the_stream_follows_events_too(api: ApiServer, stubs: Stubs, web: str) -> None:
    await triggers(stubs, "demo.a")
    async with (
        httpx.AsyncClient(base_url=web, timeout=30) as http,
        http.stream(
            "GET", "/cloudevents/stream?kind=events&trigger_ref=demo.a", headers=bearer("operator")
        ) as response,
    ):
        sse = Stream(response)
        await sse.next()
        id_ = await emit(stubs, "demo.a", greeting="hello")
        _, event = await sse.cloudevent()
        assert event.get_id() == f"event/{id_}/created" and event.get_type() == "dev.automation.event.created"
        data = event.get_data()
        assert isinstance(data, dict) and data["payload"] == {"greeting": "hello"}


async def test_the_stream_refuses_before_it_starts(api: ApiServer, stubs: Stubs, web: str) -> None:
    async with httpx.AsyncClient(base_url=web, timeout=30) as http:
        none = await http.get(PATH)
        assert none.status_code == 401 and none.headers["www-authenticate"].startswith("Bearer")
        wrong = await http.get(PATH, headers={"Authorization": "Bearer atk_not-a-token"})
        assert wrong.status_code == 401
    async with httpx.AsyncClient(base_url=web, timeout=30, cookies={"console_token": TOKENS["viewer"]}) as browser:
        cookie_only = await browser.get(PATH)
        assert cookie_only.status_code == 401  # a console cookie is not an api token header
    async with httpx.AsyncClient(base_url=web, timeout=30) as http:
        sensor = await http.get(PATH, headers=bearer("sensor"))  # sensors may not tail
        assert sensor.status_code == 403
        for path, field in (
            ("/cloudevents/stream?kind=things", "kind"),
            ("/cloudevents/stream?kind=enforcements&rule=demo.r", "rule"),
            ("/cloudevents/stream?kind=enforcements&status=done", "status"),
            ("/cloudevents/stream?kind=enforcements&event=-1", "event"),
            ("/cloudevents/stream?kind=events&rule_ref=Not%20a%20ref", "rule_ref"),
        ):
            refused = await http.get(path, headers=bearer("viewer"))
            assert refused.status_code == 400, path
            assert field in refused.json()["error"], refused.text
        forged = await http.get(PATH, headers=bearer("viewer") | {"Last-Event-ID": "AAAA.BBBB"})
        assert forged.status_code == 400 and "cursor" in forged.json()["error"]


@pytest.fixture
def one_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """One stream per token and two in all (the web service reads them when it starts)."""
    monkeypatch.setattr(live, "STREAMS_PER_SESSION", 1)
    monkeypatch.setattr(live, "STREAMS_TOTAL", 2)


async def test_streams_share_the_live_budgets(api: ApiServer, stubs: Stubs, one_each: None, web: str) -> None:
    async with httpx.AsyncClient(base_url=web, timeout=30) as http, AsyncExitStack() as stack:
        held = [Stream(await stack.enter_async_context(http.stream("GET", PATH, headers=bearer("viewer"))))]
        await held[0].next()  # kept: a dropped reader closes its response
        refused = await http.get(PATH, headers=bearer("viewer"))
        assert refused.status_code == 429 and refused.headers["retry-after"] == str(live.BUSY_RETRY_S)
        # The same token's console page counts in the same share.
        http.cookies.set("console_token", TOKENS["viewer"])
        page = await http.get("/live/events")
        assert page.status_code == 429
        http.cookies.clear()
        held.append(Stream(await stack.enter_async_context(http.stream("GET", PATH, headers=bearer("operator")))))
        await held[1].next()
        full = await http.get(PATH, headers=bearer("executor"))
        assert full.status_code == 429 and "live streams open, its limit is 2" in full.text, (
            full.status_code,
            full.text,
        )

    # Closed streams give their places back (once the service has seen the client go).
    async def reopened() -> bool:
        async with (
            httpx.AsyncClient(base_url=web, timeout=30) as http,
            http.stream("GET", PATH, headers=bearer("viewer")) as response,
        ):
            if response.status_code == 429:
                return False
            await Stream(response).next()
            return True

    await eventually(reopened, what="the closed streams' places to come back")


async def test_a_revoked_token_ends_its_stream_with_an_error(
    api: ApiServer, stubs: Stubs, store: Store, web: str
) -> None:
    token, digest = new_token()
    await store.tokens.create("soon-revoked", ["viewer"], digest, None)
    await api.authenticator.load()
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=web, timeout=30) as http,
        http.stream("GET", "/cloudevents/stream?kind=events", headers=headers) as response,
    ):
        sse = Stream(response)
        await sse.next()
        await store.tokens.revoke("soon-revoked")
        ended = await sse.next()
        assert ended.event == "error" and json.loads(ended.data)["code"] == "UNAUTHENTICATED"
    async with httpx.AsyncClient(base_url=web, timeout=30) as http:
        again = await http.get("/cloudevents/stream?kind=events", headers=headers)
        assert again.status_code == 401
