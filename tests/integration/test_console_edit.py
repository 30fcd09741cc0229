"""Editing rules and triggers from the console, over real HTTP against a real api on PostgreSQL:
each form's outcome checked against what the api then holds and what its audit trail records,
the api's refusals shown next to their fields with nothing written, and the roles (a viewer's
forged form refused by the console and by the api)."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2, json_format

from services.api.server import ApiServer
from shared.gen.automation.v1 import audit_pb2, audit_pb2_grpc, rule_pb2, rule_pb2_grpc
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel, web_service
from tests.integration.console_support import HOOK, OTHER, RULE, console, emit, get, hidden, seed

Fields = list[tuple[str, str]]


@pytest.fixture
async def web(api: ApiServer) -> AsyncIterator[str]:
    target = f"127.0.0.1:{api.port}"
    async with channel(target, token=TOKENS["webhook"]) as ch, web_service(target, ch) as url:
        yield url


async def post(client: httpx.AsyncClient, path: str, fields: Fields) -> httpx.Response:
    """A form as a browser posts it: URL-encoded, a name as often as the form has it."""
    from urllib.parse import urlencode

    return await client.post(
        path, content=urlencode(fields).encode(), headers={"content-type": "application/x-www-form-urlencoded"}
    )


def rows(*items: tuple[str, str, str]) -> Fields:
    out: Fields = []
    for field, op, value in items:
        out += [("row_field", field), ("row_operator", op), ("row_value", value)]
    return out


def field_error(page: str, name: str) -> str:
    found = re.search(rf'<span class="field-error" id="err-{re.escape(name)}" role="alert">([^<]*)</span>', page)
    assert found, f"no error shown next to {name}"
    return html.unescape(found.group(1))


async def audit(stubs: Stubs, rpc: str, ref: str) -> list[audit_pb2.AuditRecord]:
    async with channel(stubs.target, TOKENS["operator"]) as ch:
        answer = await audit_pb2_grpc.AuditServiceStub(ch).ListAuditRecords(
            audit_pb2.ListAuditRecordsRequest(rpc=f"automation.v1.RuleService/{rpc}", entity_ref=ref)
        )
    return list(answer.records)


async def rule_refs(stubs: Stubs) -> set[str]:
    return {r.ref for r in (await stubs.rules.ListRules(rule_pb2.ListRulesRequest())).rules}


# ---- rules -------------------------------------------------------------------------------------


async def test_an_operator_creates_a_rule_from_rows_and_it_fires(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    async with console(web, "operator") as operator:
        page = await get(operator, f"/rules/new?trigger_ref={HOOK}")
        answer = await post(
            operator,
            "/rules/new",
            [
                ("csrf", hidden(page, "csrf")),
                ("ref", "demo.big_push"),
                ("trigger_ref", HOOK),
                ("label", "Big pushes"),
                ("enabled", "yes"),
                ("condition", "all"),
                ("mode", "rows"),
                ("action_ref", "core.echo"),
                ("action_params", '{"size": "{{ event.payload.size }}"}'),
                ("conditions", "[]"),
                ("step", "create"),
                *rows(("action", "equals", "push"), ("size", "greaterthan", "100"), ("", "equals", "")),
            ],
        )
        assert answer.status_code == 303, answer.text[:2000]
        assert answer.headers["location"] == "/rules/demo.big_push?notice=created"
    created = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.big_push"))
    conditions = [json_format.MessageToDict(c) for c in created.conditions]
    assert conditions == [
        {"field": "action", "operator": "CONDITION_OPERATOR_EQUALS", "value": "push"},
        {"field": "size", "operator": "CONDITION_OPERATOR_GREATERTHAN", "value": 100.0},
    ]
    assert created.enabled and created.label == "Big pushes" and created.action_ref == "core.echo"
    fired = await emit(stubs, action="push", size=500)
    assert {e.rule_ref for e in fired.enforcements} == {RULE, "demo.big_push"}
    small = await emit(stubs, action="push", size=5)
    assert {e.rule_ref for e in small.enforcements} == {RULE}
    (record,) = await audit(stubs, "CreateRule", "demo.big_push")
    assert record.principal == "test-operator"


async def test_the_api_refusal_is_shown_next_to_its_field_and_nothing_is_written(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    before = await rule_refs(stubs)
    async with console(web, "operator") as operator:
        csrf = hidden(await get(operator, "/rules/new"), "csrf")
        base: Fields = [("csrf", csrf), ("trigger_ref", HOOK), ("mode", "rows"), ("step", "create")]
        # The console's own checks: parameters that are not a JSON object.
        page = await post(operator, "/rules/new", [*base, ("ref", "demo.x"), ("action_params", "[1")])
        assert page.status_code == 400
        assert field_error(page.text, "action_params").startswith("not JSON")
        # The api's: a regular expression RE2 cannot compile, shown in its row.
        page = await post(
            operator,
            "/rules/new",
            [
                *base,
                ("ref", "demo.x"),
                ("action_params", "{}"),
                *rows(("a", "equals", "1"), ("b", "regex", "(unclosed")),
            ],
        )
        assert page.status_code == 400
        second_row = page.text.split('aria-label="value 2"', 1)[1].split("</td>", 1)[0]
        assert 'class="field-error"' in second_row and "value" in second_row
        assert 'aria-label="value 1"' in page.text.split('aria-label="value 2"')[0]
        assert 'value="(unclosed"' in page.text  # what was typed is kept
        # A bad ref, and a ref that exists: next to the ref.
        page = await post(operator, "/rules/new", [*base, ("ref", "Not A Ref"), ("action_params", "{}")])
        assert page.status_code == 400 and field_error(page.text, "ref")
        page = await post(operator, "/rules/new", [*base, ("ref", RULE), ("action_params", "{}")])
        assert page.status_code == 400 and RULE in field_error(page.text, "ref")
    assert await rule_refs(stubs) == before


async def test_conditions_as_json_with_groups_and_short_operator_names(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    tree = (
        '[{"any": [{"field": "action", "operator": "equals", "value": "push"},'
        ' {"not": {"field": "x", "operator": "exists"}}]}]'
    )
    async with console(web, "operator") as operator:
        csrf = hidden(await get(operator, "/rules/new"), "csrf")
        answer = await post(
            operator,
            "/rules/new",
            [
                ("csrf", csrf),
                ("ref", "demo.grouped"),
                ("trigger_ref", HOOK),
                ("mode", "json"),
                ("conditions", tree),
                ("action_params", ""),
                ("enabled", "yes"),
                ("step", "create"),
            ],
        )
        assert answer.status_code == 303, answer.text[:2000]
        # A tree with groups opens in the JSON editor; rows cannot hold it.
        page = await get(operator, "/rules/demo.grouped/edit")
        assert 'name="mode" value="json" checked' in page
        assert 'value="rows" disabled' in page
        assert "&#34;operator&#34;: &#34;exists&#34;" in page
    stored = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref="demo.grouped"))
    assert len(stored.conditions) == 1 and len(stored.conditions[0].any) == 2
    assert [e.rule_ref for e in (await emit(stubs, action="pull")).enforcements] == ["demo.grouped"]


async def test_the_tester_runs_the_rule_as_typed_on_a_payload_or_a_stored_event(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    stored_event = (await emit(stubs, action="push", repo="payments")).event.id
    async with console(web, "operator") as operator:
        csrf = hidden(await get(operator, f"/rules/{RULE}/edit"), "csrf")
        typed = [("csrf", csrf), ("mode", "rows"), ("action_params", "{}"), ("step", "test")]
        page = await post(
            operator,
            f"/rules/{RULE}/edit",
            [*typed, *rows(("repo", "equals", "payments")), ("payload", '{"repo": "payments"}')],
        )
        assert page.status_code == 200 and "matched</span>" in page.text
        page = await post(
            operator,
            f"/rules/{RULE}/edit",
            [*typed, *rows(("repo", "equals", "billing")), ("event_id", str(stored_event))],
        )
        assert page.status_code == 200 and "no match</span>" in page.text and 'id="test-result"' in page.text
        page = await post(operator, f"/rules/{RULE}/edit", [*typed, ("payload", "[1, 2]")])
        assert 'id="test-error"' in page.text and "JSON object" in page.text
    # Testing changed nothing.
    stored = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref=RULE))
    assert [c.field for c in stored.conditions] == ["action"]


async def test_an_edit_is_reviewed_as_a_diff_then_saves_only_what_changed(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    async with console(web, "operator") as operator:
        form = await get(operator, f"/rules/{RULE}/edit")
        assert 'value="action"' in form and 'value="push"' in form
        edited = [
            ("csrf", hidden(form, "csrf")),
            ("label", "Pushes to main"),
            ("action_ref", "core.echo"),
            ("mode", "rows"),
            ("condition", "all"),
            ("action_params", '{"repo": "{{ event.payload.repo }}"}'),
            ("conditions", "[]"),
            *rows(("action", "equals", "push"), ("ref", "equals", "refs/heads/main")),
        ]
        review = await post(operator, f"/rules/{RULE}/edit", [*edited, ("step", "review")])
        assert review.status_code == 200
        diff = review.text.split('id="diff">', 1)[1].split("</pre>", 1)[0]
        assert '<span class="diff-del">- label: </span>' in diff
        assert '<span class="diff-add">+ label: Pushes to main</span>' in diff
        assert "diff-add" in diff.split("refs/heads/main")[0].rsplit("<span", 1)[1]
        assert "Changes label, conditions." in review.text, re.findall(r"<p>Changes[^<]*", review.text)
        # Nothing is saved by the review.
        assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref=RULE))).label == ""
        saved = await post(
            operator, f"/rules/{RULE}/edit", [*edited, ("base", hidden(review.text, "base")), ("step", "save")]
        )
        assert saved.status_code == 303 and saved.headers["location"] == f"/rules/{RULE}?notice=saved"
    stored = await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref=RULE))
    assert stored.label == "Pushes to main" and [c.field for c in stored.conditions] == ["action", "ref"]
    (record,) = await audit(stubs, "UpdateRule", RULE)
    assert record.principal == "test-operator"
    change = json_format.MessageToDict(record.change)
    assert set(change) == {"label", "conditions"} and change["label"] == {"old": "", "new": "Pushes to main"}


async def test_a_save_over_a_rule_changed_meanwhile_shows_the_new_diff_and_saves_nothing(
    stubs: Stubs, web: str
) -> None:
    await seed(stubs)
    async with console(web, "operator") as operator:
        form = await get(operator, f"/rules/{RULE}/edit")
        edited = [("csrf", hidden(form, "csrf")), ("label", "mine"), ("action_ref", "core.echo"), ("mode", "rows")]
        edited += rows(("action", "equals", "push"))
        review = await post(operator, f"/rules/{RULE}/edit", [*edited, ("step", "review")])
        base = hidden(review.text, "base")
        await stubs.rules.UpdateRule(
            rule_pb2.UpdateRuleRequest(
                rule=rule_pb2.Rule(ref=RULE, label="theirs"), update_mask=field_mask_pb2.FieldMask(paths=["label"])
            )
        )
        again = await post(operator, f"/rules/{RULE}/edit", [*edited, ("base", base), ("step", "save")])
        assert again.status_code == 409 and 'id="moved"' in again.text
        assert '<span class="diff-del">- label: theirs</span>' in again.text
    assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref=RULE))).label == "theirs"


async def test_a_rule_is_deleted_after_a_confirmation_page(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    async with console(web, "operator") as operator:
        assert f'href="/rules/{RULE}/delete"' in await get(operator, f"/rules/{RULE}")
        page = await get(operator, f"/rules/{RULE}/delete")
        assert 'id="confirm-delete"' in page
        assert RULE in await rule_refs(stubs)  # the page alone deletes nothing
        answer = await post(operator, f"/rules/{RULE}/delete", [("csrf", hidden(page, "csrf"))])
        assert answer.status_code == 303 and answer.headers["location"] == "/rules?notice=rule-deleted"
        assert "Rule deleted." in await get(operator, "/rules?notice=rule-deleted")
    assert RULE not in await rule_refs(stubs)
    (record,) = await audit(stubs, "DeleteRule", RULE)
    assert record.principal == "test-operator"


# ---- triggers ----------------------------------------------------------------------------------


async def test_a_trigger_is_created_signed_and_an_unsigned_webhook_needs_confirming(stubs: Stubs, web: str) -> None:
    async with console(web, "operator") as operator:
        csrf = hidden(await get(operator, "/triggers/new"), "csrf")
        base: Fields = [("csrf", csrf), ("label", "Deploys"), ("webhook_enabled", "yes"), ("secret", "keep")]
        page = await post(operator, "/triggers/new", [*base, ("ref", "ops.deploy")])
        assert page.status_code == 400 and 'id="unsigned-warning"' in page.text and 'id="unsigned-ok"' in page.text
        with pytest.raises(grpc.aio.AioRpcError):
            await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref="ops.deploy"))
        # A secret too short: the api's words, next to the secret.
        page = await post(operator, "/triggers/new", [*base, ("ref", "ops.deploy"), ("webhook_secret", "short")])
        assert page.status_code == 400 and "16 to 255" in field_error(page.text, "webhook_secret")
        answer = await post(operator, "/triggers/new", [*base, ("ref", "ops.deploy"), ("webhook_secret", "s" * 24)])
        assert answer.status_code == 303 and answer.headers["location"] == "/triggers/ops.deploy?notice=created"
        # Confirmed unsigned: created, and its page says what that means.
        answer = await post(operator, "/triggers/new", [*base, ("ref", "ops.open"), ("unsigned_ok", "yes")])
        assert answer.status_code == 303
        assert 'id="unsigned-webhook"' in await get(operator, "/triggers/ops.open")
        assert 'id="unsigned-webhook"' not in await get(operator, "/triggers/ops.deploy")
    signed = await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref="ops.deploy"))
    assert signed.webhook_enabled and signed.webhook_signed and signed.label == "Deploys"
    (record,) = await audit(stubs, "CreateTrigger", "ops.deploy")
    assert record.principal == "test-operator"
    assert "s" * 24 not in str(record.change)  # the secret is never in the trail


async def test_editing_a_trigger_schema_secret_and_mode(stubs: Stubs, web: str) -> None:
    await seed(stubs)  # HOOK: webhook on, unsigned
    async with console(web, "operator") as operator:
        form = await get(operator, f"/triggers/{HOOK}/edit")
        csrf = hidden(form, "csrf")
        base: Fields = [("csrf", csrf), ("label", "Hook"), ("webhook_enabled", "yes")]
        # A schema the api cannot compile: its words next to the schema, nothing written.
        page = await post(
            operator, f"/triggers/{HOOK}/edit", [*base, ("secret", "keep"), ("out_schema", '{"type": "nope"}')]
        )
        assert page.status_code == 400 and field_error(page.text, "out_schema")
        assert (await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=HOOK))).label == ""
        schema = '{"type": "object", "required": ["action"]}'
        fields = [
            *base,
            ("secret", "set"),
            ("webhook_secret", "k" * 20),
            ("out_schema", schema),
            ("schema_mode", "warn"),
        ]
        answer = await post(operator, f"/triggers/{HOOK}/edit", fields)
        assert answer.status_code == 303, answer.text[:2000]
        stored = await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=HOOK))
        assert stored.label == "Hook" and stored.webhook_signed and stored.schema_mode == rule_pb2.SCHEMA_MODE_WARN
        assert json_format.MessageToDict(stored.out_schema) == {"type": "object", "required": ["action"]}
        # Removing the secret of an enabled webhook opens it: a warning first.
        fields = [*base, ("secret", "remove"), ("out_schema", schema), ("schema_mode", "warn")]
        page = await post(operator, f"/triggers/{HOOK}/edit", fields)
        assert page.status_code == 400 and 'id="unsigned-warning"' in page.text
        assert (await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=HOOK))).webhook_signed
        answer = await post(operator, f"/triggers/{HOOK}/edit", [*fields, ("unsigned_ok", "yes")])
        assert answer.status_code == 303
        # The same form again: nothing to save, no call made.
        page = await post(operator, f"/triggers/{HOOK}/edit", fields)
        assert 'id="form-notice"' in page.text and "Nothing changed" in page.text
    assert not (await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=HOOK))).webhook_signed
    records = await audit(stubs, "UpdateTrigger", HOOK)
    assert len(records) == 2 and all(r.principal == "test-operator" for r in records)


async def test_enabling_an_unsigned_webhook_from_its_toggle_is_confirmed_first(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    async with console(web, "operator") as operator:
        page = await get(operator, f"/triggers/{OTHER}")
        answer = await post(
            operator, f"/triggers/{OTHER}/webhook", [("csrf", hidden(page, "csrf")), ("enabled", "true")]
        )
        assert (
            answer.status_code == 200
            and 'id="unsigned-warning"' in answer.text
            and 'id="enable-unsigned"' in answer.text
        )
        assert not (await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=OTHER))).webhook_enabled
        confirmed = [("csrf", hidden(page, "csrf")), ("enabled", "true"), ("unsigned_ok", "yes")]
        assert (await post(operator, f"/triggers/{OTHER}/webhook", confirmed)).status_code == 303
    assert (await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=OTHER))).webhook_enabled


async def test_a_trigger_is_deleted_after_a_confirmation_naming_its_rules(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    async with console(web, "operator") as operator:
        page = await get(operator, f"/triggers/{HOOK}/delete")
        assert 'id="delete-rules"' in page and f'href="/rules/{RULE}"' in page
        answer = await post(operator, f"/triggers/{HOOK}/delete", [("csrf", hidden(page, "csrf"))])
        assert answer.status_code == 303 and answer.headers["location"] == "/triggers?notice=trigger-deleted"
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=HOOK))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    (record,) = await audit(stubs, "DeleteTrigger", HOOK)
    assert record.principal == "test-operator"


# ---- roles and forgery -------------------------------------------------------------------------


async def test_a_viewer_sees_no_change_buttons_and_its_forged_forms_are_refused(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    before = await rule_refs(stubs)
    async with console(web, "viewer") as viewer:
        for path, ids in {
            "/rules": ["new-rule"],
            f"/rules/{RULE}": ["edit-rule", "delete-rule"],
            "/triggers": ["new-trigger"],
            f"/triggers/{HOOK}": ["edit-trigger", "delete-trigger", "new-rule"],
        }.items():
            page = await get(viewer, path)
            for id_ in ids:
                assert f'id="{id_}"' not in page, (path, id_)
        csrf = hidden(await get(viewer, "/rules"), "csrf")  # the sign-out form's: a valid value
        for path in (
            "/rules/new",
            f"/rules/{RULE}/edit",
            f"/rules/{RULE}/delete",
            "/triggers/new",
            f"/triggers/{HOOK}/edit",
        ):
            assert (await viewer.get(path)).status_code == 403, path
        forged = {
            "/rules/new": [("ref", "demo.sneaky"), ("trigger_ref", HOOK), ("step", "create"), ("action_params", "{}")],
            f"/rules/{RULE}/edit": [("label", "x"), ("base", "0"), ("step", "save"), ("action_params", "{}")],
            f"/rules/{RULE}/delete": [],
            "/triggers/new": [("ref", "demo.sneaky"), ("secret", "keep")],
            f"/triggers/{HOOK}/edit": [("label", "x"), ("secret", "keep"), ("webhook_enabled", "yes")],
            f"/triggers/{HOOK}/delete": [],
        }
        for path, fields in forged.items():
            answer = await post(viewer, path, [("csrf", csrf), *fields])
            assert answer.status_code == 403, (path, answer.status_code)
    async with console(web, "operator") as operator:
        answer = await post(operator, f"/rules/{RULE}/delete", [("csrf", "forged")])
        assert answer.status_code == 403
    assert await rule_refs(stubs) == before
    assert (await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=HOOK))).label == ""
    # The api refuses the viewer's token too, whatever a console would let through.
    async with channel(stubs.target, TOKENS["viewer"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rule_pb2_grpc.RuleServiceStub(ch).DeleteRule(rule_pb2.DeleteRuleRequest(ref=RULE))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
