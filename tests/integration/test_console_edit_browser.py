"""Editing from the console in a real browser (Debian's chromium, headless, driven by Playwright)
against the web service and a real api on PostgreSQL: a rule made in the form, tested, saved
and seen firing; an edit reviewed as a diff; deletes confirmed; a trigger whose webhook would be
unsigned; each change's audit row; a viewer's page and forged post; dark mode.

Every page is saved twice, 1366 and 390 px wide, in ``test-artifacts/console/edit/``
(``NAME-1366.png``, ``NAME-390.png``).
"""

from __future__ import annotations

import functools

import grpc
import pytest
from playwright.async_api import Browser, Page, expect

from shared.gen.automation.v1 import rule_pb2
from tests.conftest import Stubs
from tests.helpers import TOKENS
from tests.integration import browser as browser_setup
from tests.integration.browser import Console
from tests.integration.console_pages import emit, seed

signed_in = functools.partial(browser_setup.signed_in, shots_dir=browser_setup.SHOTS / "edit")


def refused_as_expected(console: Console) -> None:
    """A refused form is answered 400 with the form again, which the browser logs as a failed
    load: that one line is expected here (any other error still fails the test)."""
    assert console.errors[-1:] == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    console.errors.pop()


async def audit_row(page: Page, url: str, rpc: str, ref: str) -> None:
    """The audit page shows the change, made by the operator's own token."""
    await page.goto(f"{url}/audit?rpc=RuleService/{rpc}&entity_ref={ref}")
    rows = page.locator("table[data-list=audit] tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("test-operator")
    await expect(rows.first).to_contain_text(f"RuleService/{rpc}")


async def test_a_rule_is_made_in_the_form_tested_saved_and_seen_firing(
    stubs: Stubs, web: str, browser: Browser
) -> None:
    await seed(stubs)
    async with signed_in(browser, web, start="/rules") as console:
        page = console.page
        await page.click("#new-rule")
        await expect(page.locator("h1")).to_have_text("New rule")
        await page.fill("input[name=ref]", "demo.release")
        await page.fill("input[name=trigger_ref]", "demo.push")
        await page.fill("input[name=label]", "Release branches")
        await page.fill("input[aria-label='field 1']", "ref")
        await page.select_option("select[aria-label='operator 1']", "startswith")
        await page.fill("input[aria-label='value 1']", "refs/heads/release/")
        await page.fill("input[name=action_ref]", "core.echo")
        await page.fill("textarea[name=action_params]", '{"message": "release {{ event.payload.ref }}"}')
        # The tester, on a typed payload: the rule as typed, not yet stored.
        await page.fill("textarea[name=payload]", '{"ref": "refs/heads/release/2.1"}')
        await page.click("#run-test")
        await expect(page.locator("#test-result")).to_contain_text("matched")
        await expect(page.locator("#test-result pre.json")).to_contain_text("release refs/heads/release/2.1")
        await expect(page.locator("input[aria-label='value 1']")).to_have_value("refs/heads/release/")
        await console.shots("rule-new-tested")
        # A mistake the api finds is shown next to its row, and nothing is stored.
        await page.fill("input[aria-label='field 2']", "size")
        await page.select_option("select[aria-label='operator 2']", "regex")
        await page.fill("input[aria-label='value 2']", "(unclosed")
        await page.click("#create")
        await expect(page.locator("#form-error")).to_be_visible()
        row = page.locator("#condition-rows tbody tr").nth(1)
        await expect(row.locator(".field-error")).to_contain_text("value")
        refused_as_expected(console)
        await console.shots("rule-new-refused")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.release"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        await page.fill("input[aria-label='field 2']", "")
        await page.fill("input[aria-label='value 2']", "")
        await page.click("#create")
        await expect(page.locator(".banner.ok")).to_have_text("Created.")
        await expect(page.locator("h1")).to_contain_text("Rule demo.release")
        await console.shots("rule-created")

        # It fires: an event of its trigger, and its enforcement arrives on the live list.
        await console.open("/enforcements?rule_ref=demo.release")
        await console.live()
        fired = await emit(stubs, "demo.push", ref="refs/heads/release/2.1")
        mine = next(e for e in fired.enforcements if e.rule_ref == "demo.release")
        await expect(page.locator(f"tr[data-key='{mine.id}']")).to_contain_text("demo.release")
        await console.shots("rule-fired")
        await audit_row(page, web, "CreateRule", "demo.release")
        await console.shots("audit-create-rule")


async def test_an_edit_is_reviewed_as_a_diff_then_saved(stubs: Stubs, web: str, browser: Browser) -> None:
    await seed(stubs)
    async with signed_in(browser, web, start="/rules/demo.page_oncall") as console:
        page = console.page
        await page.click("#edit-rule")
        await expect(page.locator("input[aria-label='value 1']")).to_have_value("critical")
        # The JSON editor holds the same conditions; only the chosen editor shows.
        await page.check("input[name=mode][value=json]")
        await expect(page.locator("textarea[name=conditions]")).to_be_visible()
        await expect(page.locator("#condition-rows")).to_be_hidden()
        await expect(page.locator("textarea[name=conditions]")).to_have_value(
            '[\n  {\n    "field": "severity",\n    "operator": "equals",\n    "value": "critical"\n  }\n]'
        )
        await page.check("input[name=mode][value=rows]")
        await page.fill("input[aria-label='value 1']", '["critical", "major"]')
        await page.select_option("select[aria-label='operator 1']", "inside")
        await page.fill("input[name=label]", "Page on-call")
        await page.click("#review")
        diff = page.locator("#diff")
        await expect(diff.locator(".diff-del")).to_contain_text(["label: ", '"operator": "equals"'])
        await expect(diff.locator(".diff-add")).to_contain_text(["label: Page on-call", '"operator": "inside"'])
        await console.shots("rule-review-diff")
        assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.page_oncall"))).label == ""
        await page.click("#save")
        await expect(page.locator(".banner.ok")).to_have_text("Saved.")
        await expect(page.locator("ul.tree")).to_contain_text("inside")
        stored = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.page_oncall"))
        assert stored.label == "Page on-call"
        fired = await emit(stubs, "demo.alert", severity="major", host="db-2")
        assert "demo.page_oncall" in {e.rule_ref for e in fired.enforcements}
        await audit_row(page, web, "UpdateRule", "demo.page_oncall")
        row = page.locator("table[data-list=audit] tbody tr").first
        await row.locator("summary").click()
        await expect(row.locator("pre.json")).to_contain_text("Page on-call")
        await console.shots("audit-update-rule")


async def test_deletes_are_confirmed_on_their_own_page(stubs: Stubs, web: str, browser: Browser) -> None:
    await seed(stubs)
    async with signed_in(browser, web, start="/rules/demo.log_all") as console:
        page = console.page
        await page.click("#delete-rule")
        await expect(page.locator("h1")).to_contain_text("Delete rule demo.log_all?")
        await console.shots("rule-delete-confirm")
        await page.click("#confirm-delete")
        await expect(page.locator(".banner.ok")).to_have_text("Rule deleted.")
        await expect(page.locator("tr[data-key='demo.log_all']")).to_have_count(0)
        await audit_row(page, web, "DeleteRule", "demo.log_all")

        await console.open("/triggers/demo.push")
        await page.click("#delete-trigger")
        await expect(page.locator("#delete-rules")).to_contain_text("demo.on_push")
        await console.shots("trigger-delete-confirm")
        await page.click("#confirm-delete")
        await expect(page.locator(".banner.ok")).to_have_text("Trigger deleted.")
        await expect(page.locator("tr[data-key='demo.push']")).to_have_count(0)
        await audit_row(page, web, "DeleteTrigger", "demo.push")


async def test_a_trigger_with_a_webhook_is_made_signed_after_the_unsigned_warning(
    stubs: Stubs, web: str, browser: Browser
) -> None:
    async with signed_in(browser, web, start="/triggers") as console:
        page = console.page
        await page.click("#new-trigger")
        await page.fill("input[name=ref]", "ops.deploy")
        await page.fill("input[name=label]", "Deploys")
        await page.check("input[name=webhook_enabled]")
        await page.fill("textarea[name=out_schema]", '{"type": "object", "required": ["service"]}')
        await page.click("#save")
        await expect(page.locator("#unsigned-warning")).to_contain_text("anyone who learns its URL")
        refused_as_expected(console)
        await console.shots("trigger-unsigned-warning")
        await page.fill("input[name=webhook_secret]", "a-long-enough-secret")
        await page.click("#save")
        await expect(page.locator(".banner.ok")).to_have_text("Created.")
        await expect(page.locator("h2").filter(has_text="Webhook")).to_contain_text("signature required")
        await expect(page.locator("#unsigned-webhook")).to_have_count(0)
        await console.shots("trigger-created")
        # A schema the api cannot compile: its reason next to the field.
        await page.click("#edit-trigger")
        await page.fill("textarea[name=out_schema]", '{"type": "nope"}')
        await page.click("#save")
        await expect(page.locator("#err-out_schema")).to_be_visible()
        refused_as_expected(console)
        await console.shots("trigger-schema-refused")
        await audit_row(page, web, "CreateTrigger", "ops.deploy")
    trigger = await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref="ops.deploy"))
    assert trigger.webhook_signed and trigger.schema_mode == rule_pb2.SCHEMA_MODE_ENFORCE


async def test_a_viewer_sees_no_change_button_and_a_forged_post_is_refused(
    stubs: Stubs, web: str, browser: Browser
) -> None:
    await seed(stubs)
    async with signed_in(browser, web, TOKENS["viewer"], start="/rules/demo.page_oncall") as console:
        page = console.page
        await expect(page.locator("h1")).to_contain_text("Rule demo.page_oncall")
        await expect(page.locator("#edit-rule, #delete-rule, #toggle-rule")).to_have_count(0)
        await console.shots("viewer-rule")
        await console.open("/triggers/demo.push")
        await expect(page.locator("#edit-trigger, #delete-trigger, #new-rule, #toggle-webhook")).to_have_count(0)
        await console.open("/rules")
        await expect(page.locator("#new-rule")).to_have_count(0)
        # A post made with the viewer's own session and a valid CSRF value: refused.
        csrf = await page.locator("form[action='/signout'] input[name=csrf]").input_value()
        answer = await page.request.post(f"{web}/rules/demo.page_oncall/delete", form={"csrf": csrf}, max_redirects=0)
        assert answer.status == 403
        assert "operator role" in await answer.text()
    assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.page_oncall"))).ref == "demo.page_oncall"


async def test_dark_mode_follows_the_system_setting(stubs: Stubs, web: str, browser: Browser) -> None:
    await seed(stubs)
    async with signed_in(browser, web, start="/rules/demo.page_oncall/edit") as console:
        page = console.page
        light = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        await page.emulate_media(color_scheme="dark")
        dark = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert light == "rgb(246, 247, 249)" and dark == "rgb(18, 21, 28)", (light, dark)
        await console.shots("dark-rule-edit")
        await emit(stubs, "demo.alert", severity="critical", host="db-1")
        await console.open("/enforcements")
        await expect(page.locator("table[data-list=enforcements] tbody tr")).to_have_count(2)
        await console.shots("dark-enforcements")
