"""What the console's HTTP tests share (``test_console``, ``test_console_edit``, ``test_console_ops``,
``test_console_streams``): the demo triggers and rule, a client signed in as a role, forms and
pages read as a browser does, and the live streams' Server-Sent Events."""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx

from services.web.session import COOKIE
from shared.gen.automation.v1 import condition_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import TOKENS, new_event, rule

HOOK = "demo.hook"
"""A webhook trigger with RULE on it."""
OTHER = "demo.other"
"""A trigger without rules."""
RULE = "demo.on_push"
"""Fires for action == "push"."""
EQUALS = condition_pb2.CONDITION_OPERATOR_EQUALS
READ_S = 15.0
"""Longest wait for one live message: a broken stream fails the test instead of hanging it."""


@asynccontextmanager
async def console(web: str, role: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A browser: signed in with ``role``'s token, or not signed in at all."""
    cookies = {COOKIE: TOKENS[role]} if role else None
    async with httpx.AsyncClient(base_url=web, cookies=cookies, timeout=30, follow_redirects=False) as client:
        yield client


async def seed(stubs: Stubs) -> rule_pb2.Trigger:
    """HOOK (webhook on) with RULE, and OTHER; returns HOOK."""
    trigger = await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=HOOK, webhook_enabled=True))
    )
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=OTHER)))
    await stubs.rules.CreateRule(
        rule_pb2.CreateRuleRequest(
            rule=rule(RULE, HOOK, conditions=[("action", EQUALS, "push")], params={"repo": "{{ event.payload.repo }}"})
        )
    )
    return trigger


async def emit(stubs: Stubs, trigger_ref: str = HOOK, **payload: Any) -> event_pb2.CreateEventResponse:
    return await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(trigger_ref, payload)))


async def pushed(stubs: Stubs) -> tuple[int, int]:
    """A new event on HOOK that fires RULE: (event id, enforcement id)."""
    resp = await emit(stubs, action="push", repo="payments")
    (enforcement,) = resp.enforcements
    return resp.event.id, enforcement.id


async def exhausted_enforcement(stubs: Stubs, conn: asyncpg.Connection) -> int:
    """A pending enforcement of RULE, marked out of attempts."""
    _, enforcement = await pushed(stubs)
    await conn.execute(
        "UPDATE enforcement_dispatch SET exhausted_at = now(), attempts = 3, last_error = 'backend down' "
        "WHERE enforcement = $1",
        enforcement,
    )
    return enforcement


async def get(client: httpx.AsyncClient, path: str, status: int = 200) -> str:
    answer = await client.get(path)
    assert answer.status_code == status, (path, answer.status_code, answer.text[:2000])
    return answer.text


def hidden(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found, f"no hidden field {name}"
    return html.unescape(found.group(1))


async def submit(client: httpx.AsyncClient, path: str, fields: dict[str, str]) -> httpx.Response:
    """Posts a form as a browser does (URL-encoded, even when it has no fields)."""
    return await client.post(
        path, content=urlencode(fields).encode(), headers={"content-type": "application/x-www-form-urlencoded"}
    )


@dataclass
class Message:
    event: str
    id: str
    data: Any


class Sse:
    """Messages of a text/event-stream response, parsed as a browser's EventSource does."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.status_code
        assert response.headers["content-type"].startswith("text/event-stream")
        self._lines = response.aiter_lines()
        self.last_id = ""

    async def _message(self) -> Message:
        event, id_ = "", ""
        data: list[str] = []
        async for line in self._lines:
            if not line:
                if event or id_ or data:
                    if id_:
                        self.last_id = id_
                    return Message(event, id_, json.loads("\n".join(data)) if data else None)
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "id":
                id_ = value
            elif name == "data":
                data.append(value)
        raise AssertionError("the stream ended")

    async def next(self, event: str) -> Message:
        """The next message named ``event`` (others, such as bare cursor moves, are passed)."""

        async def find() -> Message:
            while True:
                message = await self._message()
                if message.event == event:
                    return message

        return await asyncio.wait_for(find(), READ_S)
