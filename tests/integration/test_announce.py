"""The api announces its own writes (its sessions skip the NOTIFY triggers)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from services.api.dispatcher import pack
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import eventually, new_event, rule


async def _listen(conn: asyncpg.Connection, *channels: str) -> dict[str, list[Any]]:
    received: dict[str, list[Any]] = {c: [] for c in channels}
    for channel in channels:
        await conn.add_listener(channel, lambda _c, _p, ch, payload: received[ch].append(json.loads(payload)))
    return received


async def test_api_announces_created_and_resolved_enforcements_with_resolved_at(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    received = await _listen(conn, "event_created", "enforcement_created", "enforcement_resolved")
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="core.webhook")))
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.a", "core.webhook")))
    created = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook", {"k": 1})))
    enf_id = created.enforcements[0].id

    async def announced_created() -> bool:
        return bool(received["enforcement_created"]) and bool(received["event_created"])

    await eventually(announced_created, what="creation announcements")
    (notes,) = received["enforcement_created"]
    assert [(n["id"], n["status"], n["resolved_at"]) for n in notes] == [(enf_id, "created", None)]
    assert [n["id"] for n in received["event_created"][0]] == [created.event.id]

    await stubs.enforcements.ResolveEnforcement(
        enforcement_pb2.ResolveEnforcementRequest(id=enf_id, status=common_pb2.ENFORCEMENT_STATUS_DISABLED)
    )

    async def announced_resolved() -> bool:
        return bool(received["enforcement_resolved"])

    await eventually(announced_resolved, what="the resolution announcement")
    (note,) = received["enforcement_resolved"][0]
    assert note["id"] == enf_id and note["status"] == "disabled" and note["resolved_at"]
    assert "updated" not in note


async def test_sessions_with_notify_off_skip_the_notify_triggers(db_url: str, conn: asyncpg.Connection) -> None:
    received = await _listen(conn, "event_created")
    quiet = await asyncpg.connect(db_url, server_settings={"automation.notify": "off"})
    try:
        await quiet.execute("INSERT INTO trigger (ref) VALUES ('core.quiet')")
        await quiet.execute("INSERT INTO event (trigger_ref) VALUES ('core.quiet')")
        # A second writer with the default setting: its notification proves the listener works,
        # and NOTIFY delivery follows commit order, so the quiet insert's would have come first.
        await conn.execute("INSERT INTO event (trigger_ref) VALUES ('core.loud')")
    finally:
        await quiet.close()

    async def got_loud() -> bool:
        return bool(received["event_created"])

    await eventually(got_loud, what="the default session's notification")
    assert [n["trigger_ref"] for n in received["event_created"]] == ["core.loud"]


def test_pack_splits_notes_under_the_notify_payload_limit() -> None:
    notes = [{"id": i, "rule_ref": "x" * 100} for i in range(500)]
    payloads = pack(notes)
    assert len(payloads) > 1
    assert all(len(p) < 8000 for p in payloads)
    assert [n["id"] for p in payloads for n in json.loads(p)] == list(range(500))


def test_pack_keeps_every_note_in_order_when_their_sizes_vary() -> None:
    # Runs are sized from the last one's bytes per note: a long note after short ones makes a
    # run too long, which is halved until it fits; a note alone is sent even if long.
    notes = [{"id": i, "rule_ref": "x" * (i * 37 % 700), "t": "é"} for i in range(3000)] + [
        {"id": 3000, "x": "y" * 9000}
    ]
    payloads = pack(notes)
    assert all(len(p.encode()) <= 7000 for p in payloads[:-1])
    assert json.loads(payloads[-1]) == [notes[-1]]
    assert [n for p in payloads for n in json.loads(p)] == notes
