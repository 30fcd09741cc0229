"""Running the pipeline from the console, in a real browser (Debian's chromium, headless, driven
by Playwright) against the web service, a real api on PostgreSQL and the real executor: the
executors on Dispatch appearing live, a failed enforcement's attempts and its Retry, a bulk
retry with its count and confirmation, executions and the audit trail linked together, and the
layout from a 360 px phone with the keyboard.

Every page is saved twice, 1366 and 390 px wide, in ``test-artifacts/console/ops/``
(``NAME-1366.png``, ``NAME-390.png``).
"""

from __future__ import annotations

import asyncio
import functools

import asyncpg
import pytest
from playwright.async_api import Browser, expect

from services.api.server import ApiServer
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, enforcement_pb2_grpc
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel
from tests.integration import browser as browser_setup
from tests.integration.console_pages import emit, executor, exhaust, seed

signed_in = functools.partial(browser_setup.signed_in, shots_dir=browser_setup.SHOTS / "ops")


async def test_dispatch_shows_executors_connect_and_work_live(
    api: ApiServer, stubs: Stubs, web: str, browser: Browser
) -> None:
    await seed(stubs)
    for i in range(3):
        await emit(stubs, "demo.push", ref=f"refs/heads/b{i}")
    async with signed_in(browser, web, start="/dispatch") as console:
        page = console.page
        await console.live()
        await expect(page.locator("#no-executor")).to_contain_text("No executor is connected")
        await expect(page.locator("#pending")).to_have_text("3")
        await console.shots("dispatch-no-executor")
        await page.evaluate("window.__same_document = true")

        async with executor(f"127.0.0.1:{api.port}"):
            row = page.locator("tr[data-executor='browser-test']")
            await expect(row).to_have_count(1, timeout=30_000)
            # It took the work and resolved it: the tiles follow, and it stays listed as idle.
            await expect(page.locator("#pending")).to_have_text("0", timeout=30_000)
            await expect(row.locator("[data-idle]")).to_have_text("idle", timeout=30_000)
            await expect(row).not_to_contain_text("none yet")  # last delivery and last resolve
            await expect(page.locator("#no-executor")).to_have_count(0)
            await console.shots("dispatch-idle-executor")
        await expect(page.locator("#no-executor")).to_have_count(1, timeout=30_000)
        assert await page.evaluate("window.__same_document === true"), "the page was reloaded"


async def test_an_exhausted_enforcement_shows_its_attempts_and_is_retried_from_its_page(
    stubs: Stubs, web: str, browser: Browser, conn: asyncpg.Connection
) -> None:
    await seed(stubs)
    (enforcement,) = (await emit(stubs, "demo.push", ref="refs/heads/main")).enforcements
    await exhaust(conn, enforcement.id)
    async with signed_in(browser, web, start=f"/enforcements/{enforcement.id}") as console:
        page = console.page
        await expect(page.locator("#last-error")).to_have_text("backend down")
        attempts = page.locator("#attempts-table tbody tr")
        await expect(attempts).to_have_count(2)
        await expect(attempts.nth(0)).to_contain_text("lease expired")
        await expect(attempts.nth(0)).to_contain_text("worker-7")
        await expect(attempts.nth(1)).to_contain_text("exhausted")
        await console.shots("enforcement-exhausted")
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.click("#retry")
        await expect(page.locator(".banner.ok")).to_have_text("Offered again to executors.")
        await expect(page.locator("h1")).to_contain_text(f"Enforcement {enforcement.id}")
        await expect(attempts).to_have_count(3)
        await expect(attempts.nth(2)).to_contain_text("retried")
        await expect(page.locator("#retry")).to_have_count(0)
        await console.shots("enforcement-retried")


async def test_bulk_retry_of_selected_rows_with_a_count_and_a_confirmation_then_its_audit_record(
    stubs: Stubs, web: str, browser: Browser, conn: asyncpg.Connection
) -> None:
    await seed(stubs)
    ids = []
    for i in range(4):
        (e,) = (await emit(stubs, "demo.push", ref=f"refs/heads/f{i}")).enforcements
        await exhaust(conn, e.id, f"timeout talking to backend {i}")
        ids.append(e.id)
    async with signed_in(browser, web, start="/dispatch") as console:
        page = console.page
        await console.live()
        await expect(page.locator("#exhausted-table tbody tr")).to_have_count(4)
        for id_ in ids[:3]:
            await page.check(f"input[name=id][value='{id_}']")
        await console.shots("dispatch-selected")
        await page.click("#retry-selected")
        await expect(page.locator("#retry-count")).to_contain_text("3 of the 3 selected are exhausted")
        await console.shots("retry-confirm")
        await page.click("#confirm-retry")
        await expect(page.locator(".banner.ok")).to_have_text("Offered 3 exhausted enforcements to executors again.")
        await expect(page.locator("#exhausted-table tbody tr")).to_have_count(1)

        # The audit trail holds it as one action naming the three.
        await console.open("/audit?rpc=EnforcementService/RetryEnforcements")
        rows = page.locator("table[data-list=audit] tbody tr")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("3 enforcements")
        await rows.first.locator("summary").click()
        for id_ in ids[:3]:
            await expect(rows.first.locator("pre.json")).to_contain_text(str(id_))
        await console.shots("audit-bulk-retry")

        # All matching a filter: the review counts them first.
        await console.open("/dispatch")
        await page.fill("#retry-matching input[name=rule_ref]", "demo.on_push")
        await page.click("#retry-matching button")
        await expect(page.locator("#retry-count")).to_contain_text("1 exhausted enforcement matches")
        await page.click("#confirm-retry")
        await expect(page.locator(".banner.ok")).to_have_text("Offered 1 exhausted enforcement to executors again.")
    state = await stubs.enforcements.GetDispatchState(enforcement_pb2.GetDispatchStateRequest())
    assert state.exhausted_count == 0


async def test_links_from_an_event_to_its_execution_rule_trigger_and_audit(
    api: ApiServer, stubs: Stubs, web: str, browser: Browser
) -> None:
    await seed(stubs)
    created = await emit(stubs, "demo.alert", severity="critical", host="db-1")
    async with (
        executor(f"127.0.0.1:{api.port}"),
        signed_in(browser, web, start=f"/events/{created.event.id}") as console,
    ):
        page = console.page
        oncall = next(e for e in created.enforcements if e.rule_ref == "demo.page_oncall")
        await page.click(f"a[href='/enforcements/{oncall.id}']")
        execution = page.locator("[data-part=executions] a[href^='/executions/']")
        await expect(execution).to_have_count(1, timeout=30_000)
        await execution.click()
        await expect(page.locator("h1")).to_contain_text("core.echo")
        await expect(page.locator("pre.json").first).to_contain_text("db-1 is down")
        await console.shots("execution")
        await page.click("aside a[href='/rules/demo.page_oncall']")
        await expect(page.locator("h1")).to_contain_text("Rule demo.page_oncall")
        await page.click("aside a[href='/triggers/demo.alert']")
        await expect(page.locator("h1")).to_contain_text("Trigger demo.alert")
        await page.click("a:has-text('Its audit records')")
        rows = page.locator("table[data-list=audit] tbody tr")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("RuleService/CreateTrigger")
        await console.shots("audit-trigger")
        await console.open("/executions")
        await expect(page.locator("table[data-list=executions] tbody tr")).to_have_count(2)
        await console.shots("executions")


async def test_a_live_emptied_filtered_list_does_not_claim_nothing_matches(
    stubs: Stubs, web: str, browser: Browser
) -> None:
    await seed(stubs)
    (e,) = (await emit(stubs, "demo.push", ref="refs/heads/x")).enforcements
    async with signed_in(browser, web, TOKENS["viewer"], start="/enforcements?status=created") as console:
        page = console.page
        await console.live()
        await expect(page.locator("table[data-list=enforcements] tbody tr")).to_have_count(1)
        async with channel(stubs.target, TOKENS["executor"]) as ch:
            await enforcement_pb2_grpc.EnforcementServiceStub(ch).ResolveEnforcement(
                enforcement_pb2.ResolveEnforcementRequest(id=e.id, status=common_pb2.ENFORCEMENT_STATUS_PROCESSED)
            )
        await expect(page.locator("table[data-list=enforcements] tbody tr")).to_have_count(0)
        await expect(page.locator("p.empty")).to_contain_text("left its filter while you watched")


async def test_a_viewer_sees_no_retry_buttons(
    stubs: Stubs, web: str, browser: Browser, conn: asyncpg.Connection
) -> None:
    await seed(stubs)
    (e,) = (await emit(stubs, "demo.push", ref="refs/heads/v")).enforcements
    await exhaust(conn, e.id)
    async with signed_in(browser, web, TOKENS["viewer"], start="/dispatch") as console:
        page = console.page
        await expect(page.locator(f"tr[data-key='{e.id}']")).to_contain_text("backend down")
        await expect(
            page.locator("#retry-selected, #retry-matching, input[name=id], button[data-retry]")
        ).to_have_count(0)
        await expect(page.locator("nav a[href='/audit']")).to_have_count(0)
        await console.open(f"/enforcements/{e.id}")
        await expect(page.locator("#last-error")).to_have_text("backend down")
        await expect(page.locator("#retry")).to_have_count(0)
        await console.shots("viewer-enforcement-exhausted")


@pytest.mark.parametrize("width", [360, 390])
async def test_narrow_screens_fold_the_navigation_and_scroll_tables_in_their_card(
    stubs: Stubs, web: str, browser: Browser, width: int
) -> None:
    await seed(stubs)
    for i in range(3):
        last = await emit(stubs, "demo.alert", severity="info", host=f"a-very-long-host-name-{i}.example.com", n=i)
    async with signed_in(browser, web, start="/enforcements", width=width) as console:
        page = console.page
        nav = page.locator("#nav")
        menu = page.locator("#menu")
        await expect(menu).to_be_visible()
        await expect(nav).to_be_hidden()
        pages = ["/enforcements", "/events", "/dispatch", "/executions", "/audit", "/volume", "/triggers/demo.alert"]
        pages += ["/rules/demo.page_oncall", f"/events/{last.event.id}", f"/enforcements/{last.enforcements[0].id}"]
        for path in pages:
            await console.open(path)
            await expect(page.locator("h1")).to_be_visible()
            await console.no_page_overflow()
        # The keyboard: Tab reaches the skip link first, then the menu button; Enter opens the
        # navigation, Escape folds it again with the focus back on the button.
        await console.open("/events")
        await page.keyboard.press("Tab")
        await expect(page.locator("a.skip")).to_be_focused()
        await page.keyboard.press("Tab")
        await page.keyboard.press("Tab")
        await expect(menu).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(nav).to_be_visible()
        await expect(menu).to_have_attribute("aria-expanded", "true")
        if width == 390:
            await console.shot("menu-open-390")
        await page.keyboard.press("Escape")
        await expect(nav).to_be_hidden()
        await expect(menu).to_be_focused()
        # A wide table scrolls inside its box.
        box = page.locator("table[data-list=events]").locator("xpath=..")
        scrolls = await box.evaluate("b => b.scrollWidth > b.clientWidth")
        assert scrolls, "the events table should be wider than a phone and scroll in its box"
    async with signed_in(browser, web, start="/events", width=1366) as console:
        await expect(console.page.locator("#menu")).to_be_hidden()
        await expect(console.page.locator("#nav")).to_be_visible()
