"""The console in a real browser: Debian's chromium, headless, driven by Playwright, against the
web service and a real api on PostgreSQL (both in this process) and the real executor.

Every page is saved as a screenshot in ``test-artifacts/console/`` (look at them); the browser,
the signed-in page and the screenshots are ``tests.integration.browser``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools

import asyncpg
import grpc
from google.protobuf import field_mask_pb2
from playwright.async_api import Browser, expect

from services.api.server import ApiServer
from shared.config import ApiConfig
from shared.gen.automation.v1 import (
    enforcement_pb2,
    rule_pb2,
)
from tests.conftest import Stubs, stubs_for
from tests.helpers import TOKENS, channel, eventually, web_service
from tests.integration import browser as browser_setup
from tests.integration.console_pages import emit, executor, seed
from tools.postgres import free_port

RESOLVED_AT = "[data-part=overview] [data-field=resolved_at]"


# These pages were first looked at in a 1280 px window: their screenshots stay comparable.
signed_in = functools.partial(browser_setup.signed_in, width=1280)


async def test_enforcement_detail_shows_pending_then_the_resolution_time_without_a_reload(
    api: ApiServer, stubs: Stubs, web: str, browser: Browser
) -> None:
    await seed(stubs)
    created = await emit(stubs, "demo.alert", severity="critical", host="web-1")
    enforcement = next(e for e in created.enforcements if e.rule_ref == "demo.page_oncall")
    async with signed_in(browser, web) as console:
        await console.open(f"/enforcements/{enforcement.id}")
        await console.live()
        page = console.page
        await expect(page.locator(RESOLVED_AT)).to_have_text("Pending")
        await expect(page.locator("[data-part=metadata] [data-field=resolved_at]")).to_have_text("Pending")
        await expect(page.locator("[data-part=overview] .badge")).to_have_text("created")
        await console.shot("enforcement-pending")
        # A mark on this document: a reload would lose it.
        await page.evaluate("window.__same_document = true")

        async with executor(f"127.0.0.1:{api.port}"):
            await expect(page.locator(f"{RESOLVED_AT} time")).to_have_count(1, timeout=30_000)
        await expect(page.locator("[data-part=overview] .badge")).to_have_text("processed")
        await expect(page.locator("[data-part=metadata] [data-field=resolved_at] time")).to_have_count(1)
        await expect(page.locator("[data-part=executions] code")).to_have_text("core.echo")
        assert await page.evaluate("window.__same_document === true"), "the page was reloaded"
        # Local time in the text, UTC on hover.
        title = await page.locator(f"{RESOLVED_AT} time").get_attribute("title")
        assert title is not None and title.endswith("UTC")
        await console.shot("enforcement-resolved")


async def test_events_list_filters_pages_and_grows_live(stubs: Stubs, web: str, browser: Browser) -> None:
    await seed(stubs)
    ids = [(await emit(stubs, "demo.alert", n=i, severity="info")).event.id for i in range(55)]
    pushes = [(await emit(stubs, "demo.push", ref=f"refs/heads/b{i}")).event.id for i in range(3)]
    async with signed_in(browser, web, start="/events") as console:
        page = console.page
        rows = page.locator("table[data-list=events] tbody tr")
        await expect(rows).to_have_count(50)
        await expect(rows.first).to_have_attribute("data-key", str(pushes[-1]))
        await console.shot("events")

        # Filter: only the pushes, newest first.
        await page.fill("input[name=trigger_ref]", "demo.push")
        await page.click("form.filters button")
        await expect(rows).to_have_count(3)
        assert [await r.get_attribute("data-key") for r in await rows.all()] == [str(i) for i in reversed(pushes)]
        await expect(page.locator("a[rel=next]")).to_have_count(0)
        await console.shot("events-filtered")

        # Paging: the second page holds the oldest alerts, and links back to the newest.
        await page.click("a:has-text('Clear')")
        await page.click("a[rel=next]")
        await expect(rows).to_have_count(8)
        assert [await r.get_attribute("data-key") for r in await rows.all()] == [str(i) for i in reversed(ids[:8])]
        await expect(page.locator("a:has-text('Newest')")).to_be_visible()
        await console.shot("events-page-2")

        # Live: the first page gains a new event without a reload.
        await page.click("a:has-text('Newest')")
        await console.live()
        fresh = (await emit(stubs, "demo.alert", n=99, severity="info")).event.id
        await expect(rows.first).to_have_attribute("data-key", str(fresh))


async def test_retry_on_an_exhausted_enforcement(
    stubs: Stubs, web: str, browser: Browser, conn: asyncpg.Connection
) -> None:
    await seed(stubs)
    created = await emit(stubs, "demo.push", ref="refs/heads/main")
    (enforcement,) = created.enforcements
    await conn.execute(
        "UPDATE enforcement_dispatch SET exhausted_at = now(), attempts = 5, last_error = 'backend down' "
        "WHERE enforcement = $1",
        enforcement.id,
    )
    async with signed_in(browser, web, start="/dispatch") as console:
        page = console.page
        row = page.locator(f"tr[data-key='{enforcement.id}']")
        await expect(row).to_contain_text("backend down")
        await console.shot("dispatch-exhausted")
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await row.locator("button[data-retry]").click()
        await expect(page.locator(".banner.ok")).to_have_text("Offered again to executors.")
        await expect(page.locator(f"tr[data-key='{enforcement.id}']")).to_have_count(0)
        await console.shot("dispatch")
    state = await stubs.enforcements.GetDispatchState(enforcement_pb2.GetDispatchStateRequest())
    assert state.exhausted_count == 0 and state.pending == 1


async def test_disabling_a_rule_asks_first(stubs: Stubs, web: str, browser: Browser) -> None:
    await seed(stubs)
    async with signed_in(browser, web, start="/rules/demo.log_all") as console:
        page = console.page
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.dismiss()))
        await page.click("#toggle-rule")
        await expect(page.locator("#toggle-rule")).to_have_text("Disable")
        assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.log_all"))).enabled

        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.click("#toggle-rule")
        await expect(page.locator(".banner.ok")).to_have_text("Disabled.")
        await expect(page.locator("#toggle-rule")).to_have_text("Enable")
    assert not (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.log_all"))).enabled


async def test_a_viewer_sees_no_operator_buttons(stubs: Stubs, web: str, browser: Browser) -> None:
    await seed(stubs)
    event = (await emit(stubs, "demo.alert", severity="critical", host="h")).event
    async with signed_in(browser, web, TOKENS["viewer"], start=f"/events/{event.id}") as console:
        page = console.page
        await expect(page.locator("h1")).to_contain_text(f"Event {event.id}")
        await expect(page.locator("#reemit")).to_have_count(0)
        await console.open("/rules/demo.log_all")
        await expect(page.locator("#toggle-rule")).to_have_count(0)
        await expect(page.locator("#run-test")).to_be_visible()  # testing a rule is a read
        await console.open("/triggers/demo.push")
        await expect(page.locator("#webhook-url")).to_have_count(1)
        await expect(page.locator("#toggle-webhook, #rotate-key")).to_have_count(0)
        await console.shot("viewer-trigger")


async def test_every_page_renders_and_is_saved(api: ApiServer, stubs: Stubs, web: str, browser: Browser) -> None:
    """Every page with data on it, screenshotted; a re-emit and a rule test on the way."""
    await seed(stubs)
    async with executor(f"127.0.0.1:{api.port}"):
        for i in range(12):
            await emit(stubs, "demo.alert", severity="critical" if i % 3 == 0 else "info", host=f"web-{i}", n=i)
        last = await emit(stubs, "demo.push", ref="refs/heads/main", pusher={"name": "Zoë", "email": "z@example.com"})
        await stubs.rules.UpdateRule(
            rule_pb2.UpdateRuleRequest(
                rule=rule_pb2.Rule(ref="demo.on_push", enabled=False),
                update_mask=field_mask_pb2.FieldMask(paths=["enabled"]),
            )
        )
        async with signed_in(browser, web) as console:
            page = console.page
            await expect(page.locator("h1")).to_have_text("Enforcements")
            await console.shot("enforcements")
            await console.open(f"/events/{last.event.id}")
            await expect(page.locator("pre.json").first).to_contain_text('"name": "Zoë"')
            await console.shot("event")
            page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await page.click("#reemit")
            await expect(page.locator(".banner.ok")).to_have_text("Re-emitted: this is the new event.")
            await expect(page.locator(f"aside a[href='/events/{last.event.id}']")).to_have_count(1)
            await console.shot("event-reemitted")
            await console.open("/enforcements?rule_ref=demo.page_oncall")
            rows = page.locator("table[data-list=enforcements] tbody tr")
            await expect(rows).to_have_count(4)
            await rows.first.locator("a").first.click()
            await expect(page.locator("h1")).to_contain_text("demo.page_oncall")
            await console.shot("enforcement")
            for path, name, heading in (
                ("/rules", "rules", "Rules"),
                ("/triggers", "triggers", "Triggers"),
                ("/triggers/demo.push", "trigger", "Trigger demo.push"),
                ("/dispatch", "dispatch-empty", "Dispatch"),
                ("/volume", "volume", "Volume"),
                ("/volume?range=7d", "volume-7d", "Volume"),
            ):
                await console.open(path)
                await expect(page.locator("h1")).to_contain_text(heading)
                await console.shot(name)
            await expect(page.locator("#events-chart rect.s-events")).not_to_have_count(0)

            await console.open("/rules/demo.page_oncall")
            await page.fill("textarea[name=payload]", '{"severity": "critical", "host": "db-1"}')
            await page.click("#run-test")
            await expect(page.locator("#test-result")).to_contain_text("matched")
            await expect(page.locator("#test-result")).to_contain_text('"message": "db-1 is down"')
            await console.shot("rule-tested")

            await console.open("/enforcements/987654321")
            await expect(page.locator("h1")).to_have_text("Not found")
            await console.shot("not-found")
            # The browser reports the 404 it was just answered, on purpose.
            assert console.errors == ["Failed to load resource: the server responded with a status of 404 (Not Found)"]
            console.errors.clear()

            await page.click("button:has-text('Sign out')")
            await expect(page.locator("h1")).to_have_text("Sign in")
            await console.shot("signin")


async def test_live_pages_carry_on_across_an_api_restart(api_config: ApiConfig, browser: Browser) -> None:
    """The web service's channel reconnects by itself, and the browser's stream resumes from
    its cursor: a change made after the api came back shows up without a reload."""
    config = dataclasses.replace(api_config, addr=f"127.0.0.1:{free_port()}")
    first = ApiServer(config)
    await first.start()
    target = config.addr
    async with channel(target) as ch:
        ops = stubs_for(ch, target)
        await seed(ops)
        before = (await emit(ops, "demo.push", n=1)).enforcements[0].id
        second: ApiServer | None = None
        async with (
            channel(target, TOKENS["webhook"]) as web_ch,
            web_service(target, web_ch) as url,
            signed_in(browser, url, start="/enforcements") as console,
        ):
            try:
                rows = console.page.locator("table[data-list=enforcements] tbody tr")
                await console.live()
                await expect(rows.first).to_have_attribute("data-key", str(before))
                await first.stop()
                await expect(console.page.locator("#live-state")).to_have_text("reconnecting…")
                second = ApiServer(config)
                await second.start()
                after = await eventually_emit(ops)
                await expect(rows.first).to_have_attribute("data-key", str(after), timeout=30_000)
                await expect(console.page.locator("#live-state")).to_have_text("live")
                await expect(rows).to_have_count(2)  # no duplicate of the row it had
            finally:
                if second is not None:
                    await second.stop()


async def eventually_emit(stubs: Stubs) -> int:
    """Emits once the restarted api answers (the channel reconnects with backoff); a refused
    attempt stored nothing (UNAVAILABLE: the call never reached a handler)."""

    async def attempt() -> int | None:
        try:
            return int((await emit(stubs, "demo.push", n=2)).enforcements[0].id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return None

    return await eventually(attempt, what="the restarted api to store an event")
