"""The console from the keyboard alone, in a real browser (Debian's chromium, headless, driven by
Playwright) against the web service and a real api on PostgreSQL: the skip link, Tab reaching
every control in document order with a ring one can see (light and dark), the navigation picked
and the folded menu opened and closed by key (and folded when Tab leaves it), a rule edited,
tested, reviewed and saved, the confirmation pages and dialogs answered, the volume charts'
numbers opened, and live updates that leave the focus where it was.

Only key presses move and act here (``page.keyboard``); the mouse is never used. Screenshots, at
1366 and 390 px wide, go to ``test-artifacts/console/keyboard/`` (``NAME-WIDTH.png``).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, Dialog, Page, expect

from services.api.server import ApiServer
from shared.gen.automation.v1 import rule_pb2
from tests.conftest import Stubs
from tests.integration import browser as browser_setup
from tests.integration.browser import SHOTS as ALL_SHOTS
from tests.integration.browser import WIDTHS
from tests.integration.console_pages import emit, executor, exhaust, seed

SHOTS = ALL_SHOTS / "keyboard"
# The signed-in page as ``test_console_ops_browser`` has it; this module's screenshots are ``shot``'s.
signed_in = functools.partial(browser_setup.signed_in, shots_dir=ALL_SHOTS / "ops")

# Marks, in document order, every element the keyboard must reach: visible, enabled, not taken
# out of the order, one radio per group (Tab enters a group at its checked radio). Scrolling
# boxes without a control inside are tab stops of their own in Chromium, so they count too.
MARK = """() => {
  const controls = "a[href], button, input:not([type=hidden]), select, textarea, summary, [tabindex]";
  const groups = new Set();
  let n = 0;
  const scroller = (el) => {
    const s = getComputedStyle(el);
    const scrolls = (o) => o === "auto" || o === "scroll";
    return ((scrolls(s.overflowX) && el.scrollWidth > el.clientWidth) ||
            (scrolls(s.overflowY) && el.scrollHeight > el.clientHeight)) && !el.querySelector(controls);
  };
  for (const el of document.body.querySelectorAll("*")) {
    delete el.dataset.kbd;
    const control = el.matches(controls);
    if (!control && !scroller(el)) continue;
    if (el.disabled || (control && el.tabIndex < 0)) continue;
    if (!el.checkVisibility({ visibilityProperty: true })) continue;
    if (el.type === "radio") {
      const group = [...document.querySelectorAll(`input[type=radio][name="${CSS.escape(el.name)}"]`)];
      const entry = group.find((r) => r.checked && !r.disabled) || group.find((r) => !r.disabled);
      if (el !== entry || groups.has(el.name)) continue;
      groups.add(el.name);
    }
    el.dataset.kbd = String(n++);
  }
  return n;
}"""

# What has the focus, and how its ring looks against what lies just outside it (the outline is
# drawn 2 px out, over whatever is there: the page, a card, the dark header).
FOCUSED = """() => {
  const el = document.activeElement;
  if (!el || el === document.body) return null;
  const s = getComputedStyle(el);
  const r = el.getBoundingClientRect();
  const backdrop = (x, y) => {
    for (const under of document.elementsFromPoint(x, y)) {
      if (el.contains(under)) continue;
      const bg = getComputedStyle(under).backgroundColor;
      if (bg !== "transparent" && !bg.endsWith(", 0)")) return bg;
    }
    return "rgb(255, 255, 255)";
  };
  const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
  const behind = [[cx, r.top - 3], [cx, r.bottom + 3], [r.left - 3, cy], [r.right + 3, cy]]
    .map(([x, y]) => backdrop(Math.min(Math.max(x, 0), innerWidth - 1), Math.min(Math.max(y, 0), innerHeight - 1)));
  return {
    kbd: el.dataset.kbd ?? null, id: el.id, tag: el.localName, picker: !el.matches(":focus"),
    text: (el.getAttribute("aria-label") || el.textContent || el.name || "").trim().slice(0, 40),
    outline: s.outlineStyle, width: parseFloat(s.outlineWidth), color: s.outlineColor, behind,
    visible: r.width > 0 && r.height > 0 && r.bottom > 0 && r.top < innerHeight && r.right > 0 && r.left < innerWidth,
  };
}"""


async def shot(page: Page, name: str) -> None:
    """The page as it is (focus included), at its current width."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    assert size is not None
    await page.screenshot(path=str(SHOTS / f"{name}-{size['width']}.png"), full_page=True)


def luminance(css: str) -> float:
    parts = css[css.index("(") + 1 : css.index(")")].split(",")
    channels = [int(float(p)) / 255 for p in parts[:3]]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def ring_is_visible(focused: dict[str, Any]) -> None:
    """WCAG's 3:1 for a focus indicator against what surrounds it, on at least three of its
    four sides (one may run along a neighbour, such as the chosen range beside a range link)."""
    what = f"{focused['tag']}#{focused['id']} {focused['text']!r}"
    assert focused["visible"], f"{what} has the focus off screen"
    assert focused["outline"] != "none" and focused["width"] >= 2, f"{what} has no focus ring: {focused}"
    ratios = [contrast(focused["color"], behind) for behind in focused["behind"]]
    assert sum(r >= 3 for r in ratios) >= 3, (
        f"{what}: ring {focused['color']} on {focused['behind']} (top, bottom, left, right) is "
        + ", ".join(f"{r:.2f}:1" for r in ratios)
    )


async def focused(page: Page) -> dict[str, Any] | None:
    info: dict[str, Any] | None = await page.evaluate(FOCUSED)
    return info


async def tab_through(page: Page) -> list[dict[str, Any]]:
    """Tab from the top of a freshly loaded page to its end: every control marked by MARK must
    come once, in document order (no positive tabindex reorders it), each with a visible ring."""
    if await page.evaluate("'live' in document.body.dataset"):
        # Marks made before the stream's snapshot would be replaced with the rows they mark.
        await expect(page.locator("body[data-live-ready]")).to_have_count(1)
    marked: int = await page.evaluate(MARK)
    assert await page.evaluate("[...document.querySelectorAll('[tabindex]')].filter(e => e.tabIndex > 0).length") == 0
    reached: list[dict[str, Any]] = []
    for _ in range(marked * 3 + 10):  # date fields take several stops
        await page.keyboard.press("Tab")
        now = await focused(page)
        if now is None or (reached and now["kbd"] == reached[0]["kbd"]):
            break  # past the last control (the browser's own UI) or wrapped around
        # A date field takes a Tab per part (month, day, ..., its calendar button): one control.
        # Its calendar button is inside the browser's own shadow tree, where the field itself no
        # longer matches :focus; Chromium draws that button's ring, which a page cannot read.
        if not now["picker"]:
            ring_is_visible(now)
        if not reached or reached[-1]["kbd"] != now["kbd"]:
            reached.append(now)
    order = [r["kbd"] for r in reached]
    if order != [str(i) for i in range(marked)]:
        missed: list[str] = await page.evaluate(
            "[...document.querySelectorAll('[data-kbd]')].map(e => e.dataset.kbd + ' ' + e.outerHTML.slice(0, 80))"
        )
        raise AssertionError(f"reached {[(r['kbd'], r['tag'], r['text']) for r in reached]}, expected {missed}")
    return reached


async def tab_to(page: Page, selector: str, limit: int = 80) -> None:
    """Tab forward until the element ``selector`` names has the focus; failing if Tab never
    gets there."""
    target = page.locator(selector)
    await expect(target).to_have_count(1)
    for _ in range(limit):
        await page.keyboard.press("Tab")
        if await target.evaluate("el => el === document.activeElement"):
            return
    raise AssertionError(f"Tab never reached {selector}")


async def select_all_and_type(page: Page, text: str) -> None:
    await page.keyboard.press("Control+A")
    await page.keyboard.type(text)


def answering(page: Page, *, accept: bool) -> asyncio.Future[str]:
    """The message of the next native dialog, once it has been accepted or dismissed."""
    answered: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def answer(dialog: Dialog) -> None:
        assert dialog.type == "confirm", dialog.type
        await (dialog.accept() if accept else dialog.dismiss())
        answered.set_result(dialog.message)

    # A task of its own: the key press that opened the dialog may wait until it is answered.
    page.once("dialog", lambda dialog: asyncio.ensure_future(answer(dialog)))
    return answered


@pytest.mark.parametrize("width", WIDTHS)
async def test_the_skip_link_leads_to_the_content_and_tab_reaches_every_control_with_a_ring(
    stubs: Stubs, conn: asyncpg.Connection, web: str, browser: Browser, width: int
) -> None:
    await seed(stubs)
    fired = await emit(stubs, "demo.alert", severity="critical", host="db-1")
    pushed = await emit(stubs, "demo.push", ref="refs/heads/main")
    # Dispatch with a row to tick and retry.
    await exhaust(conn, pushed.enforcements[0].id)
    enforcement = fired.enforcements[0].id
    async with signed_in(browser, web, start="/events", width=width) as console:
        page = console.page
        await console.open("/events")
        # First stop: the skip link, on screen while it has the focus; Enter moves the focus
        # into the main region, so the next Tab lands on the page's first control, not the menu.
        await page.keyboard.press("Tab")
        skip = page.locator("a.skip")
        await expect(skip).to_be_focused()
        await expect(skip).to_be_in_viewport()
        ring_is_visible(await focused(page) or {})
        await shot(page, "skip-link")
        await page.keyboard.press("Enter")
        await expect(page.locator("main#main")).to_be_focused()
        await page.keyboard.press("Tab")
        await expect(page.locator("main form.filters input").first).to_be_focused()

        # Each table row that leads somewhere holds a real link (Tab reaches it; no click
        # handlers on rows).
        rows = page.locator("table[data-list=events] tbody tr")
        await expect(rows).to_have_count(2)
        for row in await rows.all():
            await expect(row.locator("a[href^='/events/']")).to_have_count(1)

        pages = ["/events", f"/enforcements/{enforcement}", "/rules", "/rules/demo.page_oncall/edit", "/executions"]
        pages += ["/audit", "/volume", "/dispatch", "/triggers/demo.push"]
        for path in pages:
            await console.open(path)
            await expect(page.locator("h1")).to_be_visible()
            reached = await tab_through(page)
            assert reached[0]["text"] == "Skip to content"
            if width == 390:
                # The folded navigation is out of the order until the menu opens.
                assert not any(r["text"] in ("Events", "Rules", "Dispatch") for r in reached if r["tag"] == "a")
        await shot(page, "trigger-tabbed-to-end")

        # Dark mode: the same walk, the ring in dark mode's colour against dark cards.
        await page.emulate_media(color_scheme="dark")
        await console.open("/rules/demo.page_oncall/edit")
        await tab_through(page)
        await console.open("/rules/demo.page_oncall/edit")
        await tab_to(page, "input[name=label]")
        await shot(page, "dark-focus")


@pytest.mark.parametrize("width", WIDTHS)
async def test_a_page_is_picked_from_the_navigation_by_keyboard(
    stubs: Stubs, web: str, browser: Browser, width: int
) -> None:
    await seed(stubs)
    async with signed_in(browser, web, start="/events", width=width) as console:
        page = console.page
        await console.open("/events")
        nav, menu = page.locator("#nav"), page.locator("#menu")
        if width == 390:
            # Folded: the menu button opens it by Space or Enter, Escape folds it from anywhere
            # inside it with the focus back on the button; aria-expanded follows.
            await expect(nav).to_be_hidden()
            await tab_to(page, "#menu")
            await expect(menu).to_have_attribute("aria-expanded", "false")
            await page.keyboard.press("Space")
            await expect(nav).to_be_visible()
            await expect(menu).to_have_attribute("aria-expanded", "true")
            await page.keyboard.press("Space")
            await expect(nav).to_be_hidden()
            await expect(menu).to_have_attribute("aria-expanded", "false")
            await page.keyboard.press("Enter")
            await expect(nav).to_be_visible()
            await page.keyboard.press("Tab")
            await expect(nav.locator("a").first).to_be_focused()
            await page.keyboard.press("Escape")
            await expect(nav).to_be_hidden()
            await expect(menu).to_be_focused()
            await expect(menu).to_have_attribute("aria-expanded", "false")
            await page.keyboard.press("Enter")
            await tab_to(page, "#nav a[href='/dispatch']", limit=10)
            ring_is_visible(await focused(page) or {})
            await shot(page, "menu-open")
        else:
            await expect(menu).to_be_hidden()
            await tab_to(page, "#nav a[href='/dispatch']", limit=10)
            focus = await focused(page)
            assert focus is not None
            ring_is_visible(focus)
            await shot(page, "nav-focused")
            # The outline is the stylesheet's ring, not the browser's default.
            assert focus["outline"] == "solid", focus
        await page.keyboard.press("Enter")
        await expect(page).to_have_url(f"{web}/dispatch")
        await expect(page.locator("h1")).to_contain_text("Dispatch")
        await expect(page.locator("#nav a[aria-current=page]")).to_have_text("Dispatch")
        if width == 390:
            await expect(nav).to_be_hidden()


async def test_the_folded_menu_closes_when_the_focus_tabs_out_of_it(stubs: Stubs, web: str, browser: Browser) -> None:
    await seed(stubs)
    async with signed_in(browser, web, start="/events", width=390) as console:
        page = console.page
        await console.open("/events")
        nav, menu = page.locator("#nav"), page.locator("#menu")
        links = nav.locator("a")
        await tab_to(page, "#menu")
        await page.keyboard.press("Enter")
        await expect(nav).to_be_visible()
        # Open while the focus goes through its links ...
        for i in range(await links.count()):
            await page.keyboard.press("Tab")
            await expect(links.nth(i)).to_be_focused()
            await expect(menu).to_have_attribute("aria-expanded", "true")
            await expect(nav).to_be_visible()
        # ... folded once it is past the last one (Sign out, next in the header), not left open
        # over the page with the focus elsewhere.
        await page.keyboard.press("Tab")
        await expect(page.locator(".who form[action='/signout'] button")).to_be_focused()
        await expect(menu).to_have_attribute("aria-expanded", "false")
        await expect(nav).to_be_hidden()
        await shot(page, "menu-tabbed-out")
        # Shift+Tab comes back to the button (the folded links are out of the order), closed,
        # and it opens the menu again.
        await page.keyboard.press("Shift+Tab")
        await expect(menu).to_be_focused()
        await expect(menu).to_have_attribute("aria-expanded", "false")
        await expect(nav).to_be_hidden()
        await page.keyboard.press("Enter")
        await expect(nav).to_be_visible()
        await page.keyboard.press("Tab")
        await expect(links.first).to_be_focused()
        # Back from its first link to the button it stays open; one step further back, it folds.
        await page.keyboard.press("Shift+Tab")
        await expect(menu).to_be_focused()
        await expect(nav).to_be_visible()
        await page.keyboard.press("Shift+Tab")
        await expect(page.locator("a.brand")).to_be_focused()
        await expect(menu).to_have_attribute("aria-expanded", "false")
        await expect(nav).to_be_hidden()


@pytest.mark.parametrize("width", WIDTHS)
async def test_a_rule_is_edited_tested_reviewed_and_saved_by_keyboard(
    stubs: Stubs, web: str, browser: Browser, width: int
) -> None:
    await seed(stubs)
    stored = await emit(stubs, "demo.alert", severity="major", host="db-2")
    async with signed_in(browser, web, start="/rules/demo.page_oncall", width=width) as console:
        page = console.page
        await console.open("/rules/demo.page_oncall")
        await tab_to(page, "#edit-rule")
        await page.keyboard.press("Enter")
        await expect(page.locator("h1")).to_contain_text("Edit rule")

        await tab_to(page, "input[name=label]")
        await page.keyboard.type("Page on-call")
        await tab_to(page, "select[aria-label='operator 1']")
        # Typing an option's first letters picks it in a closed select.
        await page.keyboard.type("inside")
        await expect(page.locator("select[aria-label='operator 1']")).to_have_value("inside")
        await page.keyboard.press("Tab")
        await expect(page.locator("input[aria-label='value 1']")).to_be_focused()
        await select_all_and_type(page, '["critical", "major"]')
        # More rows: the page comes back with the focus on the first empty row, what was typed kept.
        rows = await page.locator("#condition-rows tbody tr").count()
        await tab_to(page, "#more-rows")
        await page.keyboard.press("Enter")
        await expect(page.locator(f"input[aria-label='field {rows + 1}']")).to_have_count(1)
        await expect(page.locator("input[aria-label='field 2']")).to_be_focused()
        await expect(page.locator("input[aria-label='value 1']")).to_have_value('["critical", "major"]')

        # The tester, on a stored event: Enter in its field runs Test (not the form's first
        # button, More rows), and the focus comes back on the result.
        await tab_to(page, "input[name=event_id]")
        await page.keyboard.type(str(stored.event.id))
        await page.keyboard.press("Enter")
        result = page.locator("#test-result")
        await expect(result).to_contain_text("matched")
        await expect(result).to_be_focused()
        await expect(page.locator("input[name=label]")).to_have_value("Page on-call")
        # Then on a typed payload: Tab from the payload to Test, Enter.
        await tab_to(page, "input[name=event_id]")
        await page.keyboard.press("Control+A")
        await page.keyboard.press("Backspace")
        await page.keyboard.press("Tab")
        await expect(page.locator("textarea[name=payload]")).to_be_focused()
        await page.keyboard.type('{"severity": "minor", "host": "db-3"}')
        await page.keyboard.press("Tab")
        await expect(page.locator("#run-test")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(result.locator(".badge")).to_have_text("no match")
        await expect(result).to_be_focused()
        await shot(page, "rule-tested")

        # A refused form comes back with the focus on the field it names.
        await tab_to(page, "textarea[name=action_params]")
        await select_all_and_type(page, '{"message": "paged"')
        await page.keyboard.press("Tab")
        await expect(page.locator("#review")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.locator("#err-action_params")).to_be_visible()
        await expect(page.locator("textarea[name=action_params]")).to_be_focused()
        assert console.errors[-1:] == [
            "Failed to load resource: the server responded with a status of 400 (Bad Request)"
        ]
        console.errors.pop()
        await shot(page, "rule-refused")
        await page.keyboard.press("End")
        await page.keyboard.type("}")

        # Enter in a field of the rule asks for the review; Tab to Save, Enter.
        await tab_to(page, "input[name=action_ref]")
        await page.keyboard.press("Enter")
        await expect(page.locator("#diff .diff-add")).to_contain_text(
            ["label: Page on-call", '"operator": "inside"', '"message": "paged"']
        )
        await shot(page, "rule-review")
        await tab_to(page, "#save")
        await page.keyboard.press("Enter")
        await expect(page.locator(".banner.ok")).to_have_text("Saved.")
    saved = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.page_oncall"))
    assert saved.label == "Page on-call"
    assert saved.action_params["message"] == "paged"


@pytest.mark.parametrize("width", WIDTHS)
async def test_confirmation_pages_are_answered_by_keyboard(
    stubs: Stubs, conn: asyncpg.Connection, web: str, browser: Browser, width: int
) -> None:
    await seed(stubs)
    fired = await emit(stubs, "demo.push", ref="refs/heads/main")
    await exhaust(conn, fired.enforcements[0].id)
    async with signed_in(browser, web, start="/rules/demo.log_all", width=width) as console:
        page = console.page
        # Delete, behind its own page.
        await console.open("/rules/demo.log_all")
        await tab_to(page, "#delete-rule")
        await page.keyboard.press("Enter")
        await expect(page.locator("h1")).to_contain_text("Delete rule demo.log_all?")
        await tab_to(page, "#confirm-delete")
        await shot(page, "delete-confirm")
        await page.keyboard.press("Enter")
        await expect(page.locator(".banner.ok")).to_have_text("Rule deleted.")

        # Bulk retry of all matching (no filter typed), counted first.
        await console.open("/dispatch")
        await tab_to(page, "#retry-matching button")
        await page.keyboard.press("Enter")
        await expect(page.locator("#retry-count")).to_contain_text("1 exhausted enforcement matches")
        await tab_to(page, "#confirm-retry")
        await shot(page, "retry-confirm")
        await page.keyboard.press("Enter")
        await expect(page.locator(".banner.ok")).to_have_text("Offered 1 exhausted enforcement to executors again.")

        # Enabling an unsigned webhook: the warning page, then its button.
        await console.open("/triggers/demo.alert")
        await tab_to(page, "#toggle-webhook")
        await page.keyboard.press("Enter")
        await expect(page.locator("#unsigned-warning")).to_be_visible()
        await tab_to(page, "#enable-unsigned")
        await shot(page, "webhook-unsigned")
        await page.keyboard.press("Enter")
        await expect(page.locator("#toggle-webhook")).to_have_text("Disable webhook")

        # A new trigger with an unsigned webhook: the warning comes back with the focus on its
        # checkbox; Space ticks it, Enter saves.
        await console.open("/triggers")
        await tab_to(page, "#new-trigger")
        await page.keyboard.press("Enter")
        await tab_to(page, "input[name=ref]")
        await page.keyboard.type("ops.deploy")
        await tab_to(page, "input[name=webhook_enabled]")
        await page.keyboard.press("Space")
        await expect(page.locator("input[name=webhook_enabled]")).to_be_checked()
        await page.keyboard.press("Enter")
        await expect(page.locator("#unsigned-warning")).to_be_visible()
        assert console.errors[-1:] == [
            "Failed to load resource: the server responded with a status of 400 (Bad Request)"
        ]
        console.errors.pop()
        await expect(page.locator("#unsigned-ok")).to_be_focused()
        await shot(page, "trigger-unsigned-warning")
        await page.keyboard.press("Space")
        await page.keyboard.press("Enter")
        await expect(page.locator(".banner.ok")).to_have_text("Created.")
    assert (await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref="demo.alert"))).webhook_enabled
    created = await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref="ops.deploy"))
    assert created.webhook_enabled and not created.webhook_signed
    rules = await stubs.rules.ListRules(rule_pb2.ListRulesRequest())
    assert "demo.log_all" not in {r.ref for r in rules.rules}


@pytest.mark.parametrize("width", WIDTHS)
async def test_a_confirmation_dialog_is_answered_by_keyboard(
    stubs: Stubs, web: str, browser: Browser, width: int
) -> None:
    await seed(stubs)
    question = "Disable rule demo.log_all? Enforcements not yet resolved will be resolved as disabled."
    async with signed_in(browser, web, start="/rules/demo.log_all", width=width) as console:
        page = console.page
        await console.open("/rules/demo.log_all")
        toggle = page.locator("#toggle-rule")
        # Enter on the button asks first; Escape's answer (dismissed) sends nothing: the page
        # stays, the focus on the button, the rule enabled.
        await tab_to(page, "#toggle-rule")
        dismissed = answering(page, accept=False)
        await page.keyboard.press("Enter")
        assert await asyncio.wait_for(dismissed, 10) == question
        await expect(toggle).to_be_focused()
        await expect(toggle).to_have_text("Disable")
        await expect(page.locator(".banner.ok")).to_have_count(0)
        assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.log_all"))).enabled

        # Asked again from the same place, accepted: the rule is disabled.
        accepted = answering(page, accept=True)
        await page.keyboard.press("Enter")
        assert await asyncio.wait_for(accepted, 10) == question
        await expect(page.locator(".banner.ok")).to_have_text("Disabled.")
        await expect(toggle).to_have_text("Enable")
    assert not (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.log_all"))).enabled


@pytest.mark.parametrize("width", WIDTHS)
async def test_the_volume_charts_numbers_open_by_keyboard(stubs: Stubs, web: str, browser: Browser, width: int) -> None:
    await seed(stubs)
    for host in ("db-1", "db-2"):
        await emit(stubs, "demo.alert", severity="critical", host=host)  # demo.page_oncall and demo.log_all
    await emit(stubs, "demo.push", ref="refs/heads/main")  # demo.on_push
    async with signed_in(browser, web, start="/volume", width=width) as console:
        page = console.page
        await console.open("/volume")
        # Folded under each chart until its summary is opened (Tab to it, Enter).
        for chart, counts in (
            ("events", {"events": 3}),
            ("enforcements", {"created": 5, "processed": 0, "disabled": 0, "total": 5}),
        ):
            numbers = page.locator(f"#{chart}-chart-numbers")
            table = numbers.locator("table")
            await expect(table).to_be_hidden()
            await tab_to(page, f"#{chart}-chart-numbers summary")
            await page.keyboard.press("Enter")
            await expect(table).to_be_visible()
            # One row per bar (an hour in this range), each series' count in its column.
            await expect(table.locator("tbody tr")).to_have_count(24)
            # The events fall in the current hour, the last row (or the two last, if the hour
            # turned meanwhile); every other row reads 0.
            for series, n in counts.items():
                cells = [int(c) for c in await table.locator(f"td[data-series={series}]").all_inner_texts()]
                assert len(cells) == 24 and sum(cells[-2:]) == n and not any(cells[:-2]), (series, cells)
            assert (await table.locator("tbody tr th").last.inner_text()).endswith(":00 UTC")
        # The table scrolls inside its card, not the page.
        await console.no_page_overflow("the volume page with its numbers open")
        await shot(page, "volume-numbers")


async def test_live_updates_leave_the_focus_where_it_was(
    api: ApiServer, stubs: Stubs, conn: asyncpg.Connection, web: str, browser: Browser
) -> None:
    await seed(stubs)
    fired = await emit(stubs, "demo.alert", severity="critical", host="db-1")
    first = fired.enforcements[0].id
    async with signed_in(browser, web, start="/enforcements") as console:
        page = console.page
        # A list row replaced by the stream (its status changes) while its link has the focus.
        await console.open("/enforcements")
        await console.live()
        link = page.locator(f"tr[data-key='{first}'] a[href='/enforcements/{first}']")
        await tab_to(page, f"tr[data-key='{first}'] a[href='/enforcements/{first}']")
        async with executor(f"127.0.0.1:{api.port}"):
            await expect(page.locator(f"tr[data-key='{first}'] .badge")).to_have_text("processed", timeout=30_000)
        await expect(link).to_be_focused()

        # A Dispatch part redrawn (a second exhausted row arrives) while a Retry button in it
        # has the focus.
        one = await emit(stubs, "demo.push", ref="refs/heads/a")
        two = await emit(stubs, "demo.push", ref="refs/heads/b")
        await exhaust(conn, one.enforcements[0].id)
        await console.open("/dispatch")
        await console.live()
        retry = page.locator(f"button[data-retry='{one.enforcements[0].id}']")
        await tab_to(page, f"button[data-retry='{one.enforcements[0].id}']")
        await exhaust(conn, two.enforcements[0].id)
        await expect(page.locator(f"button[data-retry='{two.enforcements[0].id}']")).to_have_count(1)
        await expect(retry).to_be_focused()
        await shot(page, "dispatch-focus-kept")
