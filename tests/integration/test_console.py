"""The operator console over real HTTP: the web service (uvicorn, in this process) in front of a
real api on a real PostgreSQL. Sign-in, pages, operator actions (CSRF, roles) and the live
Server-Sent Events streams, each checked against what the api then holds."""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
import pytest
from markupsafe import escape

from services.web.console import PAGE_SIZE
from services.web.session import COOKIE, csrf_of
from shared.gen.automation.v1 import (
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2,
    rule_pb2,
)
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel, new_event, rule
from tests.integration.console_support import (
    HOOK,
    OTHER,
    RULE,
    Message,
    Sse,
    console,
    emit,
    exhausted_enforcement,
    get,
    hidden,
    pushed,
    seed,
    submit,
)

PROCESSED = common_pb2.ENFORCEMENT_STATUS_PROCESSED
DISABLED = common_pb2.ENFORCEMENT_STATUS_DISABLED


# ---- fixtures and helpers --------------------------------------------------------------------
# (the shared ones are ``tests.integration.console_support``'s; ``web`` is the conftest's)


@pytest.fixture
async def anonymous(web: str) -> AsyncIterator[httpx.AsyncClient]:
    async with console(web) as client:
        yield client


@pytest.fixture
async def viewer(web: str) -> AsyncIterator[httpx.AsyncClient]:
    async with console(web, "viewer") as client:
        yield client


@pytest.fixture
async def operator(web: str) -> AsyncIterator[httpx.AsyncClient]:
    async with console(web, "operator") as client:
        yield client


async def resolve(stubs: Stubs, enforcement_id: int, status: common_pb2.EnforcementStatus.ValueType) -> None:
    """Resolves as an executor does (the executor token)."""
    async with channel(stubs.target, TOKENS["executor"]) as ch:
        await enforcement_pb2_grpc.EnforcementServiceStub(ch).ResolveEnforcement(
            enforcement_pb2.ResolveEnforcementRequest(id=enforcement_id, status=status, executor_id="test")
        )


async def exhausted_ids(stubs: Stubs) -> set[int]:
    state = await stubs.enforcements.GetDispatchState(enforcement_pb2.GetDispatchStateRequest())
    return {x.id for x in state.exhausted}


async def event_ids(stubs: Stubs, **filters: Any) -> list[int]:
    """Every stored event id (ListEvents, all pages), newest first."""
    out: list[int] = []
    token = ""
    while True:
        page = await stubs.events.ListEvents(event_pb2.ListEventsRequest(page_token=token, **filters))
        out.extend(e.id for e in page.events)
        if not page.next_page_token:
            return out
        token = page.next_page_token


def keys(page: str) -> list[int]:
    """The ids of a page's list rows, in order."""
    return [int(k) for k in re.findall(r'<tr data-key="(\d+)"', page)]


def signin_target(path: str) -> str:
    return "/signin?" + urlencode({"next": path})


async def sign_in(client: httpx.AsyncClient, data: dict[str, str]) -> httpx.Response:
    """Posts the sign-in form as a browser does: from the sign-in page, with its CSRF value."""
    page = await get(client, "/signin")
    return await client.post("/signin", data={"csrf": hidden(page, "csrf"), **data})


# ---- Server-Sent Events --------------------------------------------------------------------------


def rows(message: Message) -> dict[int, str]:
    """A rows message as {key: html}."""
    return {int(r["key"]): r["html"] for r in message.data["rows"]}


# ---- 1. signed out: everything goes to sign-in -------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/events",
        "/enforcements",
        "/rules",
        "/triggers",
        "/dispatch",
        "/volume",
        "/events/1",
        "/live/enforcements",
        "/events?trigger_ref=demo.hook&source_ref=s",
    ],
)
async def test_every_page_redirects_to_signin_keeping_next(anonymous: httpx.AsyncClient, path: str) -> None:
    answer = await anonymous.get(path)
    assert answer.status_code == 303
    assert answer.headers["location"] == signin_target(path)


async def test_a_signed_out_post_changes_nothing_and_goes_to_signin(stubs: Stubs, anonymous: httpx.AsyncClient) -> None:
    await seed(stubs)
    event, _ = await pushed(stubs)
    answer = await submit(anonymous, f"/events/{event}/reemit", {"csrf": csrf_of(TOKENS["operator"])})
    assert answer.status_code == 303 and answer.headers["location"] == signin_target("/")
    assert await event_ids(stubs) == [event]


@pytest.mark.parametrize(
    ("target", "landing"),
    [
        ("/events?trigger_ref=demo.hook", "/events?trigger_ref=demo.hook"),
        ("//evil.example/x", "/"),
        ("https://evil.example", "/"),
        ("/\\evil.example", "/"),
        ("", "/"),
    ],
)
async def test_signin_goes_to_next_on_this_site_only(anonymous: httpx.AsyncClient, target: str, landing: str) -> None:
    page = await get(anonymous, "/signin?" + urlencode({"next": target}))
    assert hidden(page, "next") == landing  # the sign-in form carries only a local next
    answer = await sign_in(anonymous, {"token": TOKENS["viewer"], "next": target})
    assert answer.status_code == 303
    assert answer.headers["location"] == landing


# ---- 2. sign-in and sign-out -------------------------------------------------------------------


async def test_an_unknown_token_or_an_oversized_form_signs_nobody_in(anonymous: httpx.AsyncClient) -> None:
    for token in ("atk_test-nobody-" + "x" * 32, "not a usable token", ""):
        answer = await sign_in(anonymous, {"token": token, "next": "/events"})
        assert answer.status_code == 401, token
        assert "does not accept" in answer.text
        assert "set-cookie" not in answer.headers
    # A sign-in form is small: a valid token in a huge form is refused, not read whole.
    answer = await sign_in(anonymous, {"token": TOKENS["viewer"], "next": "/", "pad": "x" * 10_000})
    assert answer.status_code == 413 and "set-cookie" not in answer.headers


@pytest.mark.parametrize("role", ["sensor", "executor"])
async def test_a_token_without_viewer_or_operator_is_403(anonymous: httpx.AsyncClient, role: str) -> None:
    answer = await sign_in(anonymous, {"token": TOKENS[role], "next": "/events"})
    assert answer.status_code == 403
    assert "neither the viewer nor the operator role" in answer.text
    assert "set-cookie" not in answer.headers
    assert (await anonymous.get("/events")).status_code == 303


async def test_signin_sets_a_strict_httponly_cookie_and_signout_clears_it(anonymous: httpx.AsyncClient) -> None:
    answer = await sign_in(anonymous, {"token": TOKENS["viewer"], "next": "/events"})
    assert answer.status_code == 303 and answer.headers["location"] == "/events"
    cookie = answer.headers["set-cookie"]
    attributes = {part.strip().lower() for part in cookie.split(";")}
    assert cookie.startswith(f"{COOKIE}={TOKENS['viewer']}")
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/" in attributes
    for path in ("/events", "/enforcements", "/rules", "/triggers", "/dispatch", "/volume"):
        page = await anonymous.get(path)
        assert page.status_code == 200, path
        assert "test-viewer" in page.text and "Sign out" in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"

    out = await submit(anonymous, "/signout", {"csrf": csrf_of(TOKENS["viewer"])})
    assert out.status_code == 303 and out.headers["location"] == "/signin"
    cleared = out.headers["set-cookie"].lower()
    assert cleared.startswith(f"{COOKIE}=") and "max-age=0" in cleared and "path=/" in cleared
    assert COOKIE not in anonymous.cookies
    assert (await anonymous.get("/events")).status_code == 303


# ---- 3. pages show the api's data --------------------------------------------------------------


async def test_events_list_shows_ids_and_triggers_and_filters_by_trigger(
    stubs: Stubs, viewer: httpx.AsyncClient
) -> None:
    await seed(stubs)
    hook_event, _ = await pushed(stubs)
    other_event = (await emit(stubs, OTHER, n=1)).event.id
    page = await get(viewer, "/events")
    assert keys(page) == [other_event, hook_event]
    assert f'href="/triggers/{HOOK}"' in page and f'href="/triggers/{OTHER}"' in page
    narrowed = await get(viewer, f"/events?trigger_ref={OTHER}")
    assert keys(narrowed) == [other_event]
    assert f'value="{OTHER}"' in narrowed  # the filter form keeps what was typed
    empty = await get(viewer, "/events?trigger_ref=demo.none")
    assert keys(empty) == [] and "No events match these filters." in empty


async def test_events_are_paged_older_and_back_to_newest_keeping_filters(
    stubs: Stubs, viewer: httpx.AsyncClient
) -> None:
    await seed(stubs)
    oldest, _ = await pushed(stubs)
    batch = await stubs.events.CreateEvents(
        event_pb2.CreateEventsRequest(events=[new_event(OTHER, {"n": i}) for i in range(PAGE_SIZE + 5)])
    )
    stored = await event_ids(stubs)
    assert sorted(stored) == sorted([oldest, *(r.event_id for r in batch.receipts)]) and stored[-1] == oldest

    for query, rest in (("", stored[PAGE_SIZE:]), (f"trigger_ref={OTHER}", stored[PAGE_SIZE:-1])):
        first = await get(viewer, f"/events?{query}")
        assert keys(first) == stored[:PAGE_SIZE]
        assert "« Newest" not in first
        older = re.search(r'<a href="([^"]+)" rel="next">Older', first)
        assert older, "no Older link"
        href = html.unescape(older.group(1))
        assert href.startswith(f"/events?{query}&page_token=" if query else "/events?page_token=")

        second = await get(viewer, href)
        assert keys(second) == rest
        assert 'rel="next"' not in second
        assert f'<a href="/events?{html.escape(query)}">« Newest</a>' in second


async def test_event_page_shows_the_formatted_payload_and_its_enforcements(
    stubs: Stubs, viewer: httpx.AsyncClient
) -> None:
    await seed(stubs)
    event, enforcement = await pushed(stubs)
    page = await get(viewer, f"/events/{event}")
    assert f"<h1>Event {event} <small>{HOOK}</small></h1>" in page
    text = html.unescape(page)
    assert json.dumps({"repo": "payments", "action": "push"}, indent=2, sort_keys=True) in text
    assert keys(page) == [enforcement]
    assert 'data-status="created"' in page
    assert f'data-live="/live/enforcements?event={event}"' in page


async def test_enforcement_page_shows_pending_then_the_resolution_time(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    event, enforcement = await pushed(stubs)
    page = await get(viewer, f"/enforcements/{enforcement}")
    assert f"Enforcement {enforcement} <small>{RULE}</small>" in page
    assert 'data-status="created"' in page
    assert re.search(r'data-field="resolved_at"><span class="muted">Pending</span>', page)
    assert f'<a href="/events/{event}">{event}</a>' in page
    assert "&#34;repo&#34;: &#34;payments&#34;" in page  # the rendered config
    assert "No execution" in page

    await resolve(stubs, enforcement, PROCESSED)
    page = await get(viewer, f"/enforcements/{enforcement}")
    assert 'data-status="processed"' in page
    assert len(re.findall(r'data-field="resolved_at"><time datetime="[^"]+Z"', page)) == 2
    assert "Pending" not in page
    assert "No execution" not in page and "<code>core.echo</code>" in page  # the execution it requested


async def test_enforcements_list_and_its_status_filter(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    _, first = await pushed(stubs)
    _, second = await pushed(stubs)
    await resolve(stubs, first, DISABLED)
    page = await get(viewer, "/enforcements")
    assert keys(page) == [second, first]
    assert keys(await get(viewer, "/enforcements?status=disabled")) == [first]
    assert keys(await get(viewer, "/enforcements?status=created")) == [second]


async def test_rules_list_and_rule_page(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.quiet", OTHER, enabled=False)))
    page = await get(viewer, "/rules")
    assert f'<a href="/rules/{RULE}">{RULE}</a>' in page and '<a href="/rules/demo.quiet">demo.quiet</a>' in page
    assert re.findall(r'<tr data-key="([^"]+)"', await get(viewer, "/rules?enabled=no")) == ["demo.quiet"]
    assert re.findall(r'<tr data-key="([^"]+)"', await get(viewer, f"/rules?trigger_ref={HOOK}")) == [RULE]

    detail = await get(viewer, f"/rules/{RULE}")
    assert f"Rule {RULE} <span" in detail and "enabled</span>" in detail
    assert '<code>action</code> <span class="op">equals</span> <code>&#34;push&#34;</code>' in detail
    assert f'<a href="/triggers/{HOOK}">{HOOK}</a>' in detail


async def test_trigger_page_shows_its_webhook_url_and_rules(stubs: Stubs, web: str, viewer: httpx.AsyncClient) -> None:
    trigger = await seed(stubs)
    assert trigger.webhook_key.startswith("wh_")
    page = await get(viewer, f"/triggers/{HOOK}")
    assert f'<input id="webhook-url" readonly value="{web}/webhooks/{trigger.webhook_key}">' in page
    assert web.startswith("http://127.0.0.1:")
    assert f'<a href="/rules/{RULE}">{RULE}</a>' in page
    other = await get(viewer, f"/triggers/{OTHER}")
    assert re.search(r'<h2>Webhook <span class="badge badge-disabled">disabled</span>', other)
    assert "No rules: its events are stored and fire nothing." in other
    listing = await get(viewer, "/triggers")
    assert set(re.findall(r'<tr data-key="([^"]+)"', listing)) == {HOOK, OTHER}


async def test_dispatch_lists_an_exhausted_enforcement_with_retry_for_an_operator(
    stubs: Stubs, conn: asyncpg.Connection, operator: httpx.AsyncClient
) -> None:
    await seed(stubs)
    enforcement = await exhausted_enforcement(stubs, conn)
    page = await get(operator, "/dispatch")
    assert f'<tr data-key="{enforcement}">' in page
    assert "backend down" in page
    assert f'action="/enforcements/{enforcement}/retry"' in page
    assert f'data-retry="{enforcement}">Retry</button>' in page
    assert hidden(page, "csrf") == csrf_of(TOKENS["operator"])


async def test_volume_draws_charts(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    await pushed(stubs)
    today = datetime.now(UTC)
    for span, bars, per, label in (
        ("", 24, "hour", today.strftime("%Y-%m-%d %H:00 UTC")),
        ("?range=7d", 42, "4 hours", today.strftime("%Y-%m-%d ") + f"{today.hour // 4 * 4:02d}:00 UTC"),
        ("?range=30d", 30, "day", today.strftime("%Y-%m-%d UTC")),
        ("?range=nonsense", 24, "hour", today.strftime("%Y-%m-%d %H:00 UTC")),
    ):
        page = await get(viewer, "/volume" + span)
        assert page.count("<svg ") == 2
        assert 'id="events-chart"' in page and 'id="enforcements-chart"' in page
        # One bar per hour, 4 hours or day, in each chart; the event and its enforcement are
        # counted in the last, which holds the current hour (unless the hour turned meanwhile).
        assert page.count("<g><title>") == 2 * bars, span
        assert f"per {per}, UTC" in page
        if datetime.now(UTC).hour == today.hour:
            assert f"<g><title>{label}: 1 · events 1</title>" in page, span
            assert f"<g><title>{label}: 1 · created 1</title>" in page, span
        assert page.count("1 in all") == 2


# ---- 4. bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/events?reemit_of=abc", "reemit_of: must be a positive whole number"),
        ("/events?reemit_of=%C2%B2", "reemit_of: must be a positive whole number"),  # a digit, not ASCII
        ("/enforcements?event=9223372036854775808", "event: must be a positive whole number"),
        ("/events?reemit_of=0", "reemit_of: must be a positive whole number"),
        ("/enforcements?status=bogus", "status: must be one of created, processed, disabled"),
        ("/enforcements?event=-1", "event: must be a positive whole number"),
        ("/events?trigger_ref=" + "a" * 300, "trigger_ref"),
        ("/enforcements?rule_ref=" + "a" * 300, "rule_ref"),
    ],
)
async def test_bad_filters_are_400_with_a_banner_naming_the_field(
    viewer: httpx.AsyncClient, path: str, named: str
) -> None:
    page = await get(viewer, path, 400)
    banner = re.search(r'<div class="banner error" role="alert">([^<]*)</div>', page)
    assert banner, "no error banner"
    assert named in html.unescape(banner.group(1))
    assert "data-live" not in page  # no live stream for a refused list


async def test_unknown_records_are_404_pages(viewer: httpx.AsyncClient) -> None:
    for path in ("/enforcements/999999", "/events/999999", "/rules/nope.nope", "/triggers/nope.nope"):
        page = await get(viewer, path, 404)
        assert "<h1>Not found</h1>" in page, path


@pytest.mark.parametrize("id_", ["9223372036854775808", "99999999999999999999", "%C2%B2", "0", "abc"])
async def test_an_id_no_record_can_have_is_404_on_every_route(
    stubs: Stubs, operator: httpx.AsyncClient, id_: str
) -> None:
    before = await event_ids(stubs)
    for path in (f"/events/{id_}", f"/enforcements/{id_}"):
        assert (await operator.get(path)).status_code == 404, path
    csrf = {"csrf": csrf_of(TOKENS["operator"])}
    for path in (f"/events/{id_}/reemit", f"/enforcements/{id_}/retry"):
        assert (await submit(operator, path, csrf)).status_code == 404, path
    assert (await operator.get(f"/live/enforcements?id={id_}")).status_code in (400, 404)
    assert await event_ids(stubs) == before


async def test_html_in_a_payload_is_shown_escaped(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    attack = "<script>alert(1)</script>"
    resp = await emit(stubs, action="push", repo=attack, **{attack: '"><img src=x onerror=alert(2)>'})
    (enforcement,) = resp.enforcements
    for path in ("/events", f"/events/{resp.event.id}", f"/enforcements/{enforcement.id}"):
        page = await get(viewer, path)
        assert attack not in page, path
        assert "<img src=x" not in page, path
        assert str(escape(attack)) in page, path


async def test_unicode_payload_values_render(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    event = (await emit(stubs, OTHER, city="Zürich", note="東京 🚀", ключ="значение")).event.id
    for path in ("/events", f"/events/{event}"):
        page = await get(viewer, path)
        assert "Zürich" in page and "東京 🚀" in page and "значение" in page, path
    assert "&#34;ключ&#34;: &#34;значение&#34;" in await get(viewer, f"/events/{event}")


# ---- 5. operator actions: roles and CSRF ---------------------------------------------------------


async def test_a_viewer_sees_no_operator_buttons(
    stubs: Stubs, conn: asyncpg.Connection, viewer: httpx.AsyncClient, operator: httpx.AsyncClient
) -> None:
    await seed(stubs)
    event, _ = await pushed(stubs)
    exhausted = await exhausted_enforcement(stubs, conn)
    pages = {
        f"/events/{event}": ['id="reemit"', f'action="/events/{event}/reemit"'],
        "/dispatch": [f'data-retry="{exhausted}"', f'action="/enforcements/{exhausted}/retry"'],
        f"/rules/{RULE}": ['id="toggle-rule"', f'action="/rules/{RULE}/enabled"'],
        f"/triggers/{HOOK}": ['id="toggle-webhook"', 'id="rotate-key"', f'action="/triggers/{HOOK}/rotate"'],
    }
    for path, markup in pages.items():
        as_viewer, as_operator = await get(viewer, path), await get(operator, path)
        for m in markup:
            assert m in as_operator, (path, m)
            assert m not in as_viewer, (path, m)
    # Viewers may test a rule (it stores nothing): that form is theirs too.
    assert 'id="run-test"' in await get(viewer, f"/rules/{RULE}")


async def test_a_viewer_cannot_reemit_even_with_a_valid_csrf(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    event, _ = await pushed(stubs)
    before = await event_ids(stubs)
    answer = await submit(
        viewer, f"/events/{event}/reemit", {"csrf": csrf_of(TOKENS["viewer"]), "request_id": "console:v"}
    )
    assert answer.status_code == 403
    assert "operator role" in answer.text
    assert await event_ids(stubs) == before


@pytest.mark.parametrize(
    "csrf",
    [None, "", "0" * 32, csrf_of(TOKENS["viewer"])],
    ids=["missing", "empty", "wrong", "another person's"],
)
async def test_an_operator_form_without_the_right_csrf_is_403_and_changes_nothing(
    stubs: Stubs, conn: asyncpg.Connection, operator: httpx.AsyncClient, csrf: str | None
) -> None:
    await seed(stubs)
    event, _ = await pushed(stubs)
    exhausted = await exhausted_enforcement(stubs, conn)
    before = await event_ids(stubs)
    fields = {} if csrf is None else {"csrf": csrf}
    for path, extra in (
        (f"/events/{event}/reemit", {"request_id": "console:x"}),
        (f"/rules/{RULE}/enabled", {"enabled": "false"}),
        (f"/enforcements/{exhausted}/retry", {}),
        (f"/triggers/{HOOK}/webhook", {"enabled": "false"}),
    ):
        answer = await submit(operator, path, fields | extra)
        assert answer.status_code == 403, path
        assert "stale or did not come from this console" in answer.text
    assert await event_ids(stubs) == before
    assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref=RULE))).enabled
    assert (await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=HOOK))).webhook_enabled
    assert exhausted in await exhausted_ids(stubs)


async def test_a_form_that_is_not_urlencoded_is_refused(stubs: Stubs, operator: httpx.AsyncClient) -> None:
    await seed(stubs)
    event, _ = await pushed(stubs)
    before = await event_ids(stubs)
    answer = await operator.post(
        f"/events/{event}/reemit", content=json.dumps({"csrf": csrf_of(TOKENS["operator"])}).encode()
    )
    assert answer.status_code == 415
    assert await event_ids(stubs) == before


async def test_an_operator_reemits_once_per_form(stubs: Stubs, operator: httpx.AsyncClient) -> None:
    await seed(stubs)
    event, _ = await pushed(stubs)
    page = await get(operator, f"/events/{event}")
    form = {"csrf": hidden(page, "csrf"), "request_id": hidden(page, "request_id")}
    assert form["request_id"].startswith("console:")

    answer = await submit(operator, f"/events/{event}/reemit", form)
    assert answer.status_code == 303
    target = answer.headers["location"]
    found = re.fullmatch(r"/events/(\d+)\?notice=reemitted", target)
    assert found, target
    new = int(found.group(1))
    assert new != event
    assert await event_ids(stubs, reemit_of=event) == [new]

    again = await submit(operator, f"/events/{event}/reemit", form)
    assert again.status_code == 303 and again.headers["location"] == target
    assert await event_ids(stubs, reemit_of=event) == [new]

    shown = await get(operator, target)
    assert "Re-emitted: this is the new event." in shown
    assert f'<a href="/events/{event}">{event}</a>' in shown  # its "Re-emit of"
    assert f'<a href="/events/{new}">{new}</a>' in await get(operator, f"/events/{event}")  # "Re-emitted as"


async def test_an_operator_disables_and_enables_a_rule(stubs: Stubs, operator: httpx.AsyncClient) -> None:
    await seed(stubs)
    page = await get(operator, f"/rules/{RULE}")
    assert hidden(page, "enabled") == "false"
    answer = await submit(operator, f"/rules/{RULE}/enabled", {"csrf": hidden(page, "csrf"), "enabled": "false"})
    assert answer.status_code == 303 and answer.headers["location"] == f"/rules/{RULE}?notice=disabled"
    assert not (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref=RULE))).enabled
    shown = await get(operator, answer.headers["location"])
    assert "Disabled." in shown and hidden(shown, "enabled") == "true"

    answer = await submit(operator, f"/rules/{RULE}/enabled", {"csrf": hidden(shown, "csrf"), "enabled": "true"})
    assert answer.status_code == 303 and answer.headers["location"] == f"/rules/{RULE}?notice=enabled"
    assert (await stubs.rules.GetRule(rule_pb2.GetRuleRequest(ref=RULE))).enabled


async def test_an_operator_retries_an_exhausted_enforcement(
    stubs: Stubs, conn: asyncpg.Connection, operator: httpx.AsyncClient
) -> None:
    await seed(stubs)
    enforcement = await exhausted_enforcement(stubs, conn)
    page = await get(operator, "/dispatch")
    answer = await submit(operator, f"/enforcements/{enforcement}/retry", {"csrf": hidden(page, "csrf")})
    assert answer.status_code == 303 and answer.headers["location"] == "/dispatch?notice=retried"
    assert enforcement not in await exhausted_ids(stubs)
    shown = await get(operator, answer.headers["location"])
    assert "Offered again to executors." in shown and f'data-retry="{enforcement}"' not in shown
    # Retrying what is no longer exhausted is a conflict, not a success.
    again = await submit(operator, f"/enforcements/{enforcement}/retry", {"csrf": hidden(page, "csrf")})
    assert again.status_code == 409


@pytest.mark.parametrize(
    ("fields", "verdict"),
    [
        ({"payload": '{"action": "push", "repo": "x"}'}, "matched"),
        ({"payload": '{"action": "pull"}'}, "no match"),
        ({"event_id": "stored"}, "matched"),
    ],
    ids=["typed, matching", "typed, not matching", "stored event"],
)
async def test_the_rule_test_form_shows_the_verdict_and_the_nodes(
    stubs: Stubs, viewer: httpx.AsyncClient, fields: dict[str, str], verdict: str
) -> None:
    await seed(stubs)
    event, _ = await pushed(stubs)
    if "event_id" in fields:
        fields = {"event_id": str(event)}
    before = await event_ids(stubs)
    answer = await submit(viewer, f"/rules/{RULE}/test", {"csrf": csrf_of(TOKENS["viewer"])} | fields)
    assert answer.status_code == 200, answer.text
    result = answer.text[answer.text.index('id="test-result"') :]
    assert f">{verdict}</span>" in result
    assert "<th>Node</th>" in result
    assert "<td>equals <code>action</code></td>" in result
    assert ('<span class="yes">' in result) == (verdict == "matched")
    if "payload" in fields:
        assert html.unescape(answer.text).count(fields["payload"]) == 1  # kept in the form
    assert await event_ids(stubs) == before


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"payload": "{not json"}, "payload: not JSON"),
        ({"payload": "[1, 2]"}, "payload: must be a JSON object"),
        ({"event_id": "x1"}, "event id: must be a positive whole number"),
        ({"event_id": "²"}, "event id: must be a positive whole number"),
        ({"event_id": "99999999999999999999"}, "event id: must be a positive whole number"),
    ],
)
async def test_a_bad_rule_test_is_400(
    stubs: Stubs, viewer: httpx.AsyncClient, fields: dict[str, str], message: str
) -> None:
    await seed(stubs)
    answer = await submit(viewer, f"/rules/{RULE}/test", {"csrf": csrf_of(TOKENS["viewer"])} | fields)
    assert answer.status_code == 400
    assert message in html.unescape(answer.text)
    assert 'id="test-result"' not in answer.text


# ---- 6. live streams -----------------------------------------------------------------------------


async def test_live_enforcements_snapshot_changes_and_resume(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    _, first = await pushed(stubs)
    _, second = await pushed(stubs)

    async with viewer.stream("GET", "/live/enforcements") as response:
        sse = Sse(response)
        snapshot = await sse.next("rows")
        assert snapshot.id and snapshot.data["snapshot"] is True
        assert rows(snapshot).keys() == {first, second}
        assert all(f'data-key="{k}"' in v for k, v in rows(snapshot).items())

        _, third = await pushed(stubs)
        change = await sse.next("rows")
        assert "snapshot" not in change.data and change.id and change.id != snapshot.id
        assert rows(change).keys() == {third}
        assert 'data-status="created"' in rows(change)[third]
        cursor = sse.last_id

    # Changes while no stream is open: the resumed stream delivers them, and nothing older.
    await resolve(stubs, first, PROCESSED)
    async with viewer.stream("GET", "/live/enforcements", headers={"Last-Event-ID": cursor}) as response:
        sse = Sse(response)
        resumed = await sse.next("rows")
        assert "snapshot" not in resumed.data
        assert rows(resumed).keys() == {first}
        assert 'data-status="processed"' in rows(resumed)[first]
        await resolve(stubs, second, DISABLED)
        later = await sse.next("rows")
        assert rows(later).keys() == {second} and 'data-status="disabled"' in rows(later)[second]


async def test_live_enforcements_with_a_garbage_cursor_start_afresh(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    _, enforcement = await pushed(stubs)
    async with viewer.stream("GET", "/live/enforcements", headers={"Last-Event-ID": "garbage"}) as response:
        sse = Sse(response)
        snapshot = await sse.next("rows")
        assert snapshot.data["snapshot"] is True and snapshot.id and snapshot.id != "garbage"
        assert rows(snapshot).keys() == {enforcement}


async def test_live_enforcements_with_a_status_filter_removes_rows_leaving_it(
    stubs: Stubs, viewer: httpx.AsyncClient
) -> None:
    await seed(stubs)
    _, first = await pushed(stubs)
    _, resolved = await pushed(stubs)
    await resolve(stubs, resolved, PROCESSED)
    async with viewer.stream("GET", "/live/enforcements?status=created") as response:
        sse = Sse(response)
        snapshot = await sse.next("rows")
        assert rows(snapshot).keys() == {first}
        await resolve(stubs, first, PROCESSED)
        change = await sse.next("rows")
        assert change.data["rows"] == [{"key": first, "remove": True}]


async def test_live_events_snapshot_then_new_events(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    old = (await emit(stubs, OTHER, n=0)).event.id
    await pushed(stubs)
    async with viewer.stream("GET", f"/live/events?trigger_ref={OTHER}") as response:
        sse = Sse(response)
        snapshot = await sse.next("rows")
        assert snapshot.data["snapshot"] is True and rows(snapshot).keys() == {old}
        await pushed(stubs)  # another trigger: filtered out
        new = (await emit(stubs, OTHER, n=1)).event.id
        change = await sse.next("rows")
        assert rows(change).keys() == {new} and f'data-key="{new}"' in rows(change)[new]


async def test_live_events_of_a_reemission_filter_show_only_its_reemissions(
    stubs: Stubs, operator: httpx.AsyncClient
) -> None:
    await seed(stubs)
    original, _ = await pushed(stubs)
    await emit(stubs, OTHER, n=0)
    first = await stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=original))
    page = await get(operator, f"/events?reemit_of={original}")
    assert keys(page) == [first.event.id]
    async with operator.stream("GET", f"/live/events?reemit_of={original}") as response:
        sse = Sse(response)
        snapshot = await sse.next("rows")
        assert rows(snapshot).keys() == {first.event.id}
        await emit(stubs, OTHER, n=1)  # not a re-emission: not shown
        second = await stubs.events.ReemitEvent(event_pb2.ReemitEventRequest(id=original))
        change = await sse.next("rows")
        assert rows(change).keys() == {second.event.id}


async def test_live_enforcement_parts_follow_its_resolution(stubs: Stubs, viewer: httpx.AsyncClient) -> None:
    await seed(stubs)
    _, enforcement = await pushed(stubs)
    async with viewer.stream("GET", f"/live/enforcements?id={enforcement}") as response:
        sse = Sse(response)
        first = await sse.next("parts")
        assert first.id and first.data["status"] == "created"
        assert "Pending" in first.data["parts"]["overview"]
        assert "<time" not in first.data["parts"]["metadata"].split("Resolved At")[1]

        _, other = await pushed(stubs)  # same rule, another event: not this page's
        await resolve(stubs, other, PROCESSED)
        await resolve(stubs, enforcement, PROCESSED)
        resolved = await sse.next("parts")
        assert resolved.data["status"] == "processed"
        overview = resolved.data["parts"]["overview"]
        assert re.search(r'data-field="resolved_at"><time datetime=', overview)
        assert "Pending" not in overview
        assert "core.echo" in resolved.data["parts"]["executions"]


async def test_live_streams_refuse_bad_input_and_need_a_signed_in_viewer(
    stubs: Stubs, viewer: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    await seed(stubs)
    assert (await viewer.get("/live/enforcements?id=abc")).status_code == 400
    assert (await viewer.get("/live/enforcements?status=bogus")).status_code == 400
    assert (await viewer.get("/live/enforcements?id=999999")).status_code == 404
    answer = await anonymous.get("/live/events")
    assert answer.status_code == 303 and answer.headers["location"] == signin_target("/live/events")
