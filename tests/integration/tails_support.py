"""What the tests of the live tails (TailEvents, TailEnforcements) share: triggers and events
to tail, the calls opened, and their messages taken."""

from __future__ import annotations

import asyncio
from typing import Any

from services.api.server import ApiServer
from shared.gen.automation.v1 import enforcement_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import eventually, new_event

Stream = Any  # a grpc.aio server-streaming call


async def triggers(stubs: Stubs, *refs: str) -> None:
    for ref in refs:
        await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=ref)))


async def emit(stubs: Stubs, trigger_ref: str, **payload: Any) -> int:
    resp = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(trigger_ref, payload)))
    return int(resp.event.id)


async def opened(api: ApiServer, call: Stream, listening: int = 1) -> Stream:
    """Waits until the api's tail has taken its start (it then listens for notifications)."""
    assert api.store is not None
    store = api.store
    await eventually(
        lambda: _true(store.tails.notices.listening >= listening or call.done()),
        what="the tail to start",
    )
    return call


async def _true(value: bool) -> bool:
    return value


async def take(call: Stream, n: int) -> list[Any]:
    out: list[Any] = []
    while len(out) < n:
        out.append(await asyncio.wait_for(call.read(), 15))
    return out


def tail_events(stubs: Stubs, **kw: Any) -> Stream:
    return stubs.events.TailEvents(event_pb2.TailEventsRequest(**kw))


def tail_enforcements(stubs: Stubs, **kw: Any) -> Stream:
    return stubs.enforcements.TailEnforcements(enforcement_pb2.TailEnforcementsRequest(**kw))
