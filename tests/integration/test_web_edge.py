"""The web service's edge over real HTTP and sockets, in front of a real api on a real
PostgreSQL: webhook provenance, signature schemes with replay protection, the stored-header
allow-list, bodies (unknown keys, deadline, budget, hang-ups), client addresses, and sign-in
(CSRF, throttling)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_network
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2

from services.api.server import ApiServer
from services.api.servicers.webhooks import signature_of, standard_signature_of, stripe_signature_of
from services.web.session import COOKIE, csrf_of
from shared.gen.automation.v1 import event_pb2, event_pb2_grpc, rule_pb2, webhook_pb2, webhook_pb2_grpc
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel, eventually, field_violations, new_event, rpc_error, struct, web_service

SECRET = "s3cret-that-is-long-enough"
HOOK = "demo.edge"
READ_S = 15.0
"""Longest wait for an answer on a raw socket: a hang fails the test instead of stalling it."""


@asynccontextmanager
async def serve(api: ApiServer, **settings: Any) -> AsyncIterator[str]:
    target = f"127.0.0.1:{api.port}"
    async with channel(target, token=TOKENS["webhook"]) as ch, web_service(target, ch, **settings) as url:
        yield url


@pytest.fixture
async def web(api: ApiServer) -> AsyncIterator[str]:
    async with serve(api) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, follow_redirects=False) as client:
        yield client


async def hook(stubs: Stubs, secret: str = SECRET) -> str:
    trigger = await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=HOOK, webhook_enabled=True, webhook_secret=secret))
    )
    return trigger.webhook_key


async def events(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM event WHERE trigger_ref = $1", HOOK))


async def config_of(conn: asyncpg.Connection, event_id: int) -> dict[str, Any]:
    return dict(json.loads(await conn.fetchval("SELECT config FROM event WHERE id = $1", event_id)))


def standard(body: bytes, msg_id: str, stamp: int, secret: str = SECRET) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": standard_signature_of(secret, msg_id, stamp, body),
    }


def stripe(body: bytes, stamp: int, secret: str = SECRET) -> dict[str, str]:
    return {"content-type": "application/json", "stripe-signature": stripe_signature_of(secret, stamp, body)}


# ---- provenance ------------------------------------------------------------------------------


async def test_a_sensor_cannot_write_webhook_provenance(api: ApiServer, stubs: Stubs, conn: asyncpg.Connection) -> None:
    await hook(stubs)
    async with channel(f"127.0.0.1:{api.port}", token=TOKENS["sensor"]) as ch:
        sensor = event_pb2_grpc.EventServiceStub(ch)
        forged = new_event(HOOK, {"action": "push"}, source_ref="webhook", config=struct({"hmac_verified": True}))
        exc = await rpc_error(
            sensor.CreateEvent(event_pb2.CreateEventRequest(event=forged)), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert set(field_violations(exc)) == {"event.source_ref", "event.config.hmac_verified"}
        batch = [
            new_event(HOOK, {}, config=struct({"source": "webhook", "source_ip": "1.2.3.4"})),
            new_event(HOOK, {}, request_id="webhook:1:abc"),
            new_event(HOOK, {}, source_ref="WebHook "),
        ]
        exc = await rpc_error(
            sensor.CreateEvents(event_pb2.CreateEventsRequest(events=batch)), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert set(field_violations(exc)) == {
            "events[0].config.source",
            "events[0].config.source_ip",
            "events[1].request_id",
            "events[2].source_ref",
        }
        # Its own provenance is still its to state.
        ok = new_event(HOOK, {}, source_ref="sensor.ci", config=struct({"hmac": "n/a"}))
        await sensor.CreateEvent(event_pb2.CreateEventRequest(event=ok))
        # Nor can it hand a "delivery" over itself, with a client address of its choosing:
        # DeliverWebhook is the web service's alone (role webhook).
        hooks = webhook_pb2_grpc.WebhookServiceStub(ch)
        exc = await rpc_error(
            hooks.DeliverWebhook(webhook_pb2.DeliverWebhookRequest(key="wh_x", body=b"{}", source_ip="203.0.113.9")),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert "webhook" in (exc.details() or "")
    assert await conn.fetchval("SELECT count(*) FROM event WHERE source_ref = 'webhook'") == 0
    assert await events(conn) == 1


# ---- signature schemes and replay ------------------------------------------------------------


@pytest.mark.parametrize("secret", [SECRET, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
async def test_standard_webhooks_fresh_replayed_stale_and_tampered(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection, secret: str
) -> None:
    key = await hook(stubs, secret)
    url = f"{web}/webhooks/{key}"
    body = b'{"action": "push"}'
    now = int(time.time())
    headers = standard(body, "msg_1", now, secret)
    first = await http.post(url, content=body, headers=headers)
    assert first.status_code == 202, first.text
    assert first.json()["hmac_verified"] and first.json()["signature_scheme"] == "standard-webhooks"
    # The captured delivery sent again, as is: answered with the first event, nothing stored.
    again = await http.post(url, content=body, headers=headers)
    assert (
        again.status_code == 202 and again.json()["replayed"] and again.json()["event_id"] == first.json()["event_id"]
    )
    # Under a new id it no longer verifies (the id is signed), nor with a new timestamp.
    assert (await http.post(url, content=body, headers=headers | {"webhook-id": "msg_2"})).status_code == 401
    assert (
        await http.post(url, content=body, headers=headers | {"webhook-timestamp": str(now + 1)})
    ).status_code == 401
    # A sender's retry (same id, new timestamp, signed again) is the first event too.
    retry = await http.post(url, content=body, headers=standard(body, "msg_1", now + 2, secret))
    assert retry.status_code == 202 and retry.json()["replayed"]
    # Outside the tolerance either way, properly signed: refused (30 s past it, so that a slow
    # run's clock, which moved on since ``now``, does not bring the future one back inside).
    for stamp in (now - 330, now + 330):
        stale = await http.post(url, content=body, headers=standard(body, "msg_3", stamp, secret))
        assert stale.status_code == 401 and "timestamp" in stale.json()["error"], stale.text
    # Several signatures (a secret being rotated): one that holds is enough.
    rotating = standard(body, "msg_4", now, secret)
    rotating["webhook-signature"] = "v1,bm90IGl0 " + rotating["webhook-signature"]
    assert (await http.post(url, content=body, headers=rotating)).status_code == 202
    assert await events(conn) == 2
    stored = await config_of(conn, first.json()["event_id"])
    assert stored["signature_scheme"] == "standard-webhooks" and stored["hmac_verified"] is True
    assert "webhook-signature" not in stored["headers"] and stored["headers"]["webhook-id"] == "msg_1"


async def test_stripe_fresh_replayed_stale_and_retried(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    key = await hook(stubs)
    url = f"{web}/webhooks/{key}"
    now = int(time.time())
    body = b'{"id": "evt_1", "type": "charge.succeeded"}'
    first = await http.post(url, content=body, headers=stripe(body, now))
    assert first.status_code == 202 and first.json()["signature_scheme"] == "stripe", first.text
    assert (await http.post(url, content=body, headers=stripe(body, now))).json()["replayed"]
    # Stripe retries an event with a new timestamp: its id is what repeats.
    assert (await http.post(url, content=body, headers=stripe(body, now + 5))).json()["replayed"]
    stale = await http.post(url, content=body, headers=stripe(body, now - 400))
    assert stale.status_code == 401
    tampered = stripe(body, now)
    tampered["stripe-signature"] = tampered["stripe-signature"].replace(f"t={now}", f"t={now + 1}")
    assert (await http.post(url, content=body, headers=tampered)).status_code == 401
    # A body without an event id is keyed by what was signed: the same capture is one event.
    plain = b'{"type": "ping"}'
    assert (await http.post(url, content=plain, headers=stripe(plain, now))).json()["replayed"] is False
    assert (await http.post(url, content=plain, headers=stripe(plain, now))).json()["replayed"] is True
    assert await events(conn) == 2


async def test_github_redelivery_is_one_event(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    key = await hook(stubs)
    body = b'{"action": "push"}'
    headers = {
        "content-type": "application/json",
        "x-hub-signature-256": signature_of(SECRET, body),
        "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    }
    first = await http.post(f"{web}/webhooks/{key}", content=body, headers=headers)
    redelivered = await http.post(f"{web}/webhooks/{key}", content=body, headers=headers)
    assert first.status_code == 202 and first.json()["signature_scheme"] == "github"
    assert redelivered.json()["replayed"] and redelivered.json()["event_id"] == first.json()["event_id"]
    assert await events(conn) == 1


async def test_only_allow_listed_headers_are_stored(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    key = await hook(stubs, "")
    secrets_in_headers = {
        "x-auth-token": "a",
        "private-token": "b",
        "x-access-token": "c",
        "x-gitlab-token": "d",
        "x-api-key": "e",
        "x-custom-secret": "f",
        "cookie": "g=h",
        "authorization": "Bearer i",
    }
    kept = {
        "x-gitlab-event": "Push Hook",
        "x-github-event": "push",
        "user-agent": "GitLab/17",
        "x-slack-retry-num": "1",
    }
    answer = await http.post(
        f"{web}/webhooks/{key}",
        content=b"{}",
        headers={"content-type": "application/json"} | secrets_in_headers | kept,
    )
    assert answer.status_code == 202, answer.text
    stored = (await config_of(conn, answer.json()["event_id"]))["headers"]
    assert stored == kept | {"content-type": "application/json"}
    assert answer.json()["hmac_verified"] is False


# ---- bodies ------------------------------------------------------------------------------------


async def raw(web: str, head: str, body: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sent ``head`` (request line and headers) and ``body``, left open."""
    host, port = web.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


def upload(key: str, length: int, headers: str = "") -> str:
    return (
        f"POST /webhooks/{key} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{headers}\r\n"
    )


async def status_of(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), READ_S)
    return int(line.split()[1])


async def test_an_unknown_or_disabled_key_is_answered_before_any_body(
    stubs: Stubs, web: str, conn: asyncpg.Connection
) -> None:
    key = await hook(stubs)
    await stubs.rules.UpdateTrigger(
        rule_pb2.UpdateTriggerRequest(
            trigger=rule_pb2.Trigger(ref=HOOK, webhook_enabled=False),
            update_mask=field_mask_pb2.FieldMask(paths=["webhook_enabled"]),
        )
    )
    for k in ("wh_" + "0" * 32, key, "nonsense"):
        # Headers only: the 256 KiB body is never sent, and the answer comes anyway.
        reader, writer = await raw(web, upload(k, 256 * 1024))
        assert await status_of(reader) == 404, k
        writer.close()
    assert await events(conn) == 0


async def test_a_signed_webhook_refuses_an_unsigned_delivery_before_its_body(stubs: Stubs, web: str) -> None:
    key = await hook(stubs)
    reader, writer = await raw(web, upload(key, 1000))
    assert await status_of(reader) == 401
    writer.close()


async def test_a_stalled_body_is_408_and_stalled_headers_are_closed(
    api: ApiServer, stubs: Stubs, conn: asyncpg.Connection
) -> None:
    key = await hook(stubs, "")
    async with serve(api, read_deadline_s=0.5) as web:
        reader, writer = await raw(web, upload(key, 100), b'{"a":')
        assert await status_of(reader) == 408
        writer.close()
        reader, writer = await raw(web, f"POST /webhooks/{key} HTTP/1.1\r\nHost: x\r\n")
        assert await asyncio.wait_for(reader.read(), READ_S) == b""  # closed, nothing answered
        writer.close()
    assert await events(conn) == 0


async def test_bodies_in_flight_are_bounded_by_the_budget(
    api: ApiServer, stubs: Stubs, conn: asyncpg.Connection
) -> None:
    key = await hook(stubs, "")
    body = json.dumps({"pad": "x" * 150_000}).encode()
    async with serve(api, body_budget_bytes=300_000) as web, httpx.AsyncClient(timeout=30) as http:
        # The server asks for the body (100 Continue) once its claim on the budget is taken:
        # only then is the upload in flight. Sent at once, a body raced the next request's.
        held_reader, held = await raw(web, upload(key, len(body), "Expect: 100-continue\r\n"))
        assert await status_of(held_reader) == 100
        assert await asyncio.wait_for(held_reader.readline(), READ_S) == b"\r\n"
        held.write(body[:1000])
        await held.drain()

        busy = await http.post(f"{web}/webhooks/{key}", content=body, headers={"content-type": "application/json"})
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "5" and "in flight" in busy.json()["error"]
        held.write(body[1000:])
        await held.drain()
        assert await status_of(held_reader) == 202
        held.close()
        answer = await http.post(f"{web}/webhooks/{key}", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 202
    assert await events(conn) >= 2


async def test_a_hang_up_mid_body_is_one_log_line(
    stubs: Stubs, web: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    key = await hook(stubs, "")
    _, writer = await raw(web, upload(key, 10_000), b'{"a": "')
    writer.close()

    async def logged() -> bool:
        return any("hung up" in r.getMessage() for r in caplog.records)

    await eventually(logged, what="the hang-up to be logged")
    assert [r for r in caplog.records if r.exc_info] == []
    assert len([r for r in caplog.records if "hung up" in r.getMessage()]) == 1
    assert await events(conn) == 0


# ---- client addresses -------------------------------------------------------------------------


async def source_ip(http: httpx.AsyncClient, web: str, key: str, forwarded: str | None) -> str:
    headers = {"content-type": "application/json"} | ({"x-forwarded-for": forwarded} if forwarded else {})
    answer = await http.post(f"{web}/webhooks/{key}", content=b"{}", headers=headers)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["event_id"])


async def test_the_client_address_believes_only_trusted_proxies(
    api: ApiServer, stubs: Stubs, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    key = await hook(stubs, "")

    async def stored(web: str, forwarded: str | None) -> str:
        event_id = int(await source_ip(http, web, key, forwarded))
        return str((await config_of(conn, event_id))["source_ip"])

    async with serve(api) as web:  # no proxy configured: the header is never read
        assert await stored(web, "6.6.6.6") == "127.0.0.1"
    proxies = (ip_network("127.0.0.0/8"), ip_network("10.0.0.0/8"))
    async with serve(api, trusted_proxies=proxies) as web:
        assert await stored(web, None) == "127.0.0.1"
        # The client wrote 6.6.6.6; its proxy saw 203.0.113.9; our inner proxy 10.1.1.1.
        assert await stored(web, "6.6.6.6, 203.0.113.9, 10.1.1.1") == "203.0.113.9"
        assert await stored(web, "10.2.2.2, 10.1.1.1") == "10.2.2.2"
        assert await stored(web, "6.6.6.6, not-an-address") == "127.0.0.1"


# ---- sign-in and sign-out ---------------------------------------------------------------------


def csrf_field(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]*)"', page)
    assert found
    return found.group(1)


async def test_cross_site_sign_in_and_sign_out_are_refused(web: str) -> None:
    async with httpx.AsyncClient(base_url=web, timeout=30) as browser:
        # Another site's form: no cookie of ours, no or a made-up CSRF value.
        for fields in ({}, {"csrf": "0" * 32}):
            answer = await browser.post("/signin", data={"token": TOKENS["viewer"], "next": "/"} | fields)
            assert answer.status_code == 403 and COOKIE not in answer.cookies
        page = await browser.get("/signin")
        answer = await browser.post("/signin", data={"token": TOKENS["viewer"], "csrf": csrf_field(page.text)})
        assert answer.status_code == 303 and browser.cookies[COOKIE] == TOKENS["viewer"]
        # Sign-out posted without this console's CSRF value signs nobody out.
        for fields in ({}, {"csrf": "0" * 32}):
            assert (await browser.post("/signout", data=fields)).status_code == 403
        assert (await browser.get("/events")).status_code == 200
        out = await browser.post("/signout", data={"csrf": csrf_of(TOKENS["viewer"])})
        assert out.status_code == 303 and COOKIE not in browser.cookies


async def test_failed_sign_ins_are_throttled_per_address(api: ApiServer) -> None:
    async with (
        serve(api, signin_burst=3, signin_refill_s=3600, trusted_proxies=(ip_network("127.0.0.1/32"),)) as web,
        httpx.AsyncClient(base_url=web, timeout=30) as browser,
    ):
        csrf = csrf_field((await browser.get("/signin")).text)

        async def sign_in(token: str, address: str = "198.51.100.7") -> httpx.Response:
            return await browser.post(
                "/signin", data={"token": token, "csrf": csrf}, headers={"x-forwarded-for": address}
            )

        for _ in range(3):
            assert (await sign_in("atk_wrong-" + "x" * 30)).status_code == 401
        throttled = await sign_in(TOKENS["viewer"])  # even the right token, from there
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) > 0
        assert COOKIE not in throttled.cookies
        assert (await sign_in(TOKENS["viewer"], "198.51.100.8")).status_code == 303
