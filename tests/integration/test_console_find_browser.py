"""Finding things in the console, in a real browser (Debian's chromium, headless, driven by
Playwright) against the web service and a real api on PostgreSQL: the payload search box on
Events, the counts of the Events and Enforcements lists ("N match", "more than 1,000"), and the
links from an event to its enforcements and audit records.

Every page is saved twice, 1366 and 390 px wide, in ``test-artifacts/console/find/``
(``NAME-1366.png``, ``NAME-390.png``).
"""

from __future__ import annotations

import functools
import json
from urllib.parse import urlencode

import pytest
from playwright.async_api import Browser, expect

from services.api.server import ApiServer
from shared import limits
from shared.gen.automation.v1 import event_pb2
from tests.conftest import Stubs
from tests.helpers import TOKENS, new_event
from tests.integration import browser as browser_setup
from tests.integration.console_pages import emit, seed

signed_in = functools.partial(browser_setup.signed_in, shots_dir=browser_setup.SHOTS / "find")


async def test_the_payload_search_box_finds_events_and_counts_them(
    api: ApiServer, stubs: Stubs, web: str, browser: Browser
) -> None:
    await seed(stubs)
    x1 = await emit(stubs, "demo.push", repo={"name": "x", "private": False}, ref="refs/heads/main")
    await emit(stubs, "demo.push", repo={"name": "y"}, ref="refs/heads/main")
    x2 = await emit(stubs, "demo.push", repo={"name": "x", "private": True}, ref="refs/heads/dev")
    async with signed_in(browser, web, start="/events") as console:
        page = console.page
        rows = page.locator("table[data-list=events] tbody tr")
        await expect(rows).to_have_count(3)
        await expect(page.locator("p.count")).to_contain_text("3 events match")
        await page.fill("input[name=payload]", '{"repo": {"name": "x"}}')
        await page.click("form.filters button.primary")
        await expect(rows).to_have_count(2)
        await expect(rows.nth(0).locator("td.num a")).to_have_text(str(x2.event.id))
        await expect(rows.nth(1).locator("td.num a")).to_have_text(str(x1.event.id))
        await expect(page.locator("p.count")).to_contain_text("2 events match")
        # The search stays in the box and the address, and the list is not followed live (the
        # live tail has no payload filter: a live row would not match).
        await expect(page.locator("input[name=payload]")).to_have_value('{"repo": {"name": "x"}}')
        assert await page.locator("body[data-live]").count() == 0
        await expect(page.locator("main")).to_contain_text("A payload search is not updated live")
        await console.shots("events-search")

        # Combined with the other filters, and with one match the sentence says so.
        await page.fill("input[name=payload]", '{"repo": {"private": true}, "ref": "refs/heads/dev"}')
        await page.fill("input[name=trigger_ref]", "demo.push")
        await page.click("form.filters button.primary")
        await expect(rows).to_have_count(1)
        await expect(page.locator("p.count")).to_have_text("1 event matches (when this page was loaded).")
        await page.fill("input[name=payload]", '{"repo": {"name": "nope"}}')
        await page.click("form.filters button.primary")
        await expect(rows).to_have_count(0)
        await expect(page.locator("p.empty")).to_contain_text("No events match these filters")
        await expect(page.locator("p.count")).to_contain_text("0 events match")


@pytest.mark.parametrize(
    ("typed", "why"),
    [
        ("{repo: x}", "payload: not JSON"),
        ('["x"]', "payload: a JSON object"),
        ('{"a": ' * 9 + "1" + "}" * 9, f"nests at most {limits.MAX_SEARCH_DEPTH} levels"),
        (json.dumps({f"k{i}": i for i in range(limits.MAX_SEARCH_VALUES + 1)}), "payload_contains: has 33 values"),
    ],
    ids=["not-json", "not-an-object", "too-deep", "too-many-values"],
)
async def test_a_bad_search_is_refused_with_the_reason_and_no_rows(
    api: ApiServer, stubs: Stubs, web: str, browser: Browser, typed: str, why: str
) -> None:
    await seed(stubs)
    await emit(stubs, "demo.push", repo={"name": "x"})
    async with signed_in(browser, web, start="/events?" + urlencode({"payload": typed})) as console:
        page = console.page
        await expect(page.locator(".banner.error")).to_contain_text(why)
        await expect(page.locator("table[data-list=events] tbody tr")).to_have_count(0)
        await expect(page.locator("input[name=payload]")).to_have_value(typed)
        if why.startswith("payload: not JSON"):
            await console.shots("events-search-refused")
        # The page is answered 400 (the browser logs that status); nothing else may be logged.
        assert console.errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
        console.errors.clear()


async def test_markup_in_a_search_stays_text(api: ApiServer, stubs: Stubs, web: str, browser: Browser) -> None:
    await seed(stubs)
    await emit(stubs, "demo.push", repo={"name": "<b>x</b>"})
    typed = '{"repo": {"name": "<b>x</b>"}, "q": "\\"><script>alert(1)</script>"}'
    async with signed_in(browser, web, start="/events?" + urlencode({"payload": typed})) as console:
        page = console.page
        await expect(page.locator("input[name=payload]")).to_have_value(typed)
        await expect(page.locator("table[data-list=events] tbody tr")).to_have_count(0)
        assert await page.locator("main b, main script").count() == 0
        await console.open("/events?" + urlencode({"payload": '{"repo": {"name": "<b>x</b>"}}'}))
        await expect(page.locator("table[data-list=events] tbody tr")).to_have_count(1)
        assert await page.locator("main b").count() == 0


async def test_counts_say_more_than_the_cap_and_pages_keep_the_search(
    api: ApiServer, stubs: Stubs, web: str, browser: Browser
) -> None:
    await seed(stubs)
    for n in range(2):
        await stubs.events.CreateEvents(
            event_pb2.CreateEventsRequest(
                events=[new_event("demo.alert", {"severity": "critical", "batch": n}) for _ in range(limits.MAX_BATCH)]
            )
        )
    async with signed_in(browser, web, start="/events", token=TOKENS["viewer"]) as console:
        page = console.page
        await expect(page.locator("p.count")).to_have_text("More than 1,000 events match (when this page was loaded).")
        await console.open("/events?" + urlencode({"payload": '{"batch": 1}'}))
        await expect(page.locator("p.count")).to_contain_text("1,000 events match")
        await expect(page.locator("table[data-list=events] tbody tr")).to_have_count(50)
        await page.click("a[rel=next]")
        await expect(page.locator("table[data-list=events] tbody tr")).to_have_count(50)
        await expect(page.locator("input[name=payload]")).to_have_value('{"batch": 1}')
        # A later page shows no count: the count is of the whole list, made with its first page.
        assert await page.locator("p.count").count() == 0
        await console.open("/enforcements?rule_ref=demo.page_oncall")
        await expect(page.locator("p.count")).to_have_text(
            "More than 1,000 enforcements match (when this page was loaded)."
        )
        await console.shots("enforcements-count")


async def test_an_event_links_to_its_enforcements_and_audit_records(
    api: ApiServer, stubs: Stubs, web: str, browser: Browser
) -> None:
    await seed(stubs)
    created = await emit(stubs, "demo.alert", severity="critical", host="db-1")
    async with signed_in(browser, web, start=f"/events/{created.event.id}") as console:
        page = console.page
        await page.click("a:has-text('Its enforcements')")
        rows = page.locator("table[data-list=enforcements] tbody tr")
        await expect(rows).to_have_count(len(created.enforcements))
        await expect(page.locator("p.count")).to_contain_text(f"{len(created.enforcements)} enforcement")
        await page.go_back()
        await page.click("a:has-text('Its audit records')")
        await expect(page.locator("h1")).to_contain_text("Audit")
        await expect(page.locator("input[name=entity_id]")).to_have_value(str(created.event.id))
