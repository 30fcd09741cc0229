"""A first end-to-end check through the in-process api."""

from __future__ import annotations

from services.api.store import Store
from shared.gen.automation.v1 import event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import new_event, rule


async def test_create_event_produces_enforcement(stubs: Stubs, store: Store) -> None:
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="core.webhook")))
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.a", "core.webhook")))
    resp = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook", {"x": 1})))
    assert len(resp.enforcements) == 1
    stored = await store.enforcements.get(resp.enforcements[0].id)
    assert stored.status == "created" and stored.event == resp.event.id
