"""The console and trigger schemas, in a real browser (Debian's chromium through Playwright)
against the web service and a real api on PostgreSQL: events stored in warn mode without
conforming are marked on the list (live rows too) and on their page, and the rule tester
flags the condition fields the trigger's schema rules out."""

from __future__ import annotations

import functools
from typing import Any

from playwright.async_api import Browser, expect

from shared.gen.automation.v1 import common_pb2, condition_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import TOKENS, new_event, rule, struct
from tests.integration import browser as browser_setup

T = "demo.typed"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"repo": {"type": "object", "properties": {"name": {"type": "string"}}}, "n": {"type": "integer"}},
}
EQUALS = condition_pb2.CONDITION_OPERATOR_EQUALS

# As ``test_console_browser``'s pages: a 1280 px window, screenshots in ``test-artifacts/console/``.
signed_in = functools.partial(browser_setup.signed_in, width=1280)


async def emit(stubs: Stubs, payload: dict[str, Any]) -> common_pb2.Event:
    made = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(T, payload)))
    return made.event


async def warned(stubs: Stubs) -> None:
    await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(
            trigger=rule_pb2.Trigger(ref=T, out_schema=struct(SCHEMA), schema_mode=rule_pb2.SCHEMA_MODE_WARN)
        )
    )


async def test_nonconforming_events_are_marked_on_the_list_live_and_on_their_page(
    stubs: Stubs,
    web: str,
    browser: Browser,
) -> None:
    await warned(stubs)
    good = await emit(stubs, {"repo": {"name": "api"}})
    bad = await emit(stubs, {"repo": {"name": 7}})
    assert bad.nonconforming and not good.nonconforming
    async with signed_in(browser, web, TOKENS["viewer"], start="/events") as console:
        page = console.page
        await console.live()
        await expect(page.locator(f"tr[data-key='{bad.id}'] .badge-nonconforming")).to_have_count(1)
        await expect(page.locator(f"tr[data-key='{good.id}'] .badge-nonconforming")).to_have_count(0)
        # A row the live stream adds is marked the same way.
        fresh = await emit(stubs, {"extra": True})
        await expect(page.locator(f"tr[data-key='{fresh.id}'] .badge-nonconforming")).to_have_count(1)
        await console.shot("events-nonconforming")

        await console.open(f"/events/{bad.id}")
        banner = page.locator("#nonconforming")
        await expect(banner).to_contain_text("does not conform to its trigger's schema (version 1)")
        await expect(banner.locator("li")).to_have_text(['event.payload.repo.name: type: 7 is not of type "string"'])
        await console.shot("event-nonconforming")
        await console.open(f"/events/{good.id}")
        await expect(page.locator("#nonconforming")).to_have_count(0)
        await expect(page.locator("dl.meta")).to_contain_text("checked against version 1, conforms")


async def test_the_rule_tester_flags_fields_the_schema_rules_out(
    stubs: Stubs,
    web: str,
    browser: Browser,
) -> None:
    await warned(stubs)
    conditions = [("repo.name", EQUALS, "api"), ("reop.name", EQUALS, "api"), ("n.value", EQUALS, 1)]
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.typo", T, conditions=conditions)))
    async with signed_in(browser, web, TOKENS["viewer"], start="/rules/demo.typo") as console:
        page = console.page
        await page.fill("textarea[name=payload]", '{"repo": {"name": "api"}}')
        await page.click("#run-test")
        banner = page.locator("#cannot-exist")
        await expect(banner).to_contain_text("2 conditions test a field the trigger's schema says cannot exist")
        await expect(banner.locator("code")).to_have_text(["reop.name", "n.value"])
        flagged = page.locator("#test-result tr:has(.cannot-exist)")
        await expect(flagged).to_have_count(2)
        await expect(flagged.first).to_contain_text("reop is not declared and the payload allows no other properties")
        await expect(page.locator("#test-schema")).to_contain_text("version 1 (not enforced")
        await console.shot("rule-test-cannot-exist")
