"""Webhooks over real HTTP: the web service (uvicorn, in this process) in front of a real api
on a real PostgreSQL. Every refusal stores nothing; a 202 comes only after the commit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2

from services.api.server import ApiServer
from services.api.servicers.webhooks import signature_of
from shared import limits
from shared.gen.automation.v1 import condition_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel, count, field_violations, rule, web_service
from tools.postgres import free_port

SECRET = "s3cret-that-is-long-enough"
HOOK = "demo.hook"
EQUALS = condition_pb2.CONDITION_OPERATOR_EQUALS


@asynccontextmanager
async def serve(target: str, token: str = TOKENS["webhook"], rpc_timeout_s: float = 10.0) -> AsyncIterator[str]:
    """The web service on a free port, its deliveries sent with ``token``; its base URL."""
    async with channel(target, token=token) as ch, web_service(target, ch, rpc_timeout_s) as url:
        yield url


@pytest.fixture
async def web(api: ApiServer) -> AsyncIterator[str]:
    async with serve(f"127.0.0.1:{api.port}") as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def hook(stubs: Stubs, secret: str = "", enabled: bool = True) -> rule_pb2.Trigger:
    """A webhook trigger and a rule that fires for action == "push"."""
    trigger = await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(
            trigger=rule_pb2.Trigger(ref=HOOK, webhook_enabled=enabled, webhook_secret=secret)
        )
    )
    await stubs.rules.CreateRule(
        rule_pb2.CreateRuleRequest(
            rule=rule(
                "demo.on_push",
                HOOK,
                conditions=[("action", EQUALS, "push")],
                params={"repo": "{{ event.payload.repo }}"},
            )
        )
    )
    return trigger


def signed(body: bytes, secret: str = SECRET, header: str = "X-Hub-Signature-256") -> dict[str, str]:
    return {"content-type": "application/json", header: signature_of(secret, body)}


async def post(
    http: httpx.AsyncClient, web: str, key: str, payload: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return await http.post(
        f"{web}/webhooks/{key}", content=body, headers=headers or {"content-type": "application/json"}
    )


async def test_a_trigger_has_a_webhook_key_and_never_returns_its_secret(stubs: Stubs) -> None:
    trigger = await hook(stubs, SECRET)
    assert trigger.webhook_key.startswith("wh_") and len(trigger.webhook_key) == 35
    assert trigger.webhook_enabled and trigger.webhook_signed and trigger.webhook_secret == ""
    got = await stubs.rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=HOOK))
    assert got.webhook_secret == "" and got.webhook_signed
    rotated = await stubs.rules.RotateWebhookKey(rule_pb2.RotateWebhookKeyRequest(ref=HOOK))
    assert rotated.webhook_key != trigger.webhook_key and rotated.webhook_key.startswith("wh_")
    cleared = await stubs.rules.UpdateTrigger(
        rule_pb2.UpdateTriggerRequest(
            trigger=rule_pb2.Trigger(ref=HOOK), update_mask=field_mask_pb2.FieldMask(paths=["webhook_secret"])
        )
    )
    assert not cleared.webhook_signed


async def test_a_signed_delivery_is_stored_with_its_metadata_and_matched_by_the_rules(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    trigger = await hook(stubs, SECRET)
    body = json.dumps({"action": "push", "repo": "payments"}).encode()
    headers = signed(body) | {
        "authorization": "Bearer leak",
        "x-github-event": "push",
        "user-agent": "GitHub-Hookshot/1",
    }
    answer = await post(http, web, trigger.webhook_key, body, headers)
    assert answer.status_code == 202, answer.text
    got = answer.json()
    assert got["hmac_verified"] is True and got["replayed"] is False and len(got["enforcement_ids"]) == 1
    row = await conn.fetchrow("SELECT payload, config, source_ref FROM event WHERE id = $1", got["event_id"])
    assert row is not None
    config = json.loads(row["config"])
    assert json.loads(row["payload"]) == {"action": "push", "repo": "payments"} and row["source_ref"] == "webhook"
    assert {k: config[k] for k in ("source", "webhook_key", "hmac_verified", "user_agent")} == {
        "source": "webhook",
        "webhook_key": trigger.webhook_key,
        "hmac_verified": True,
        "user_agent": "GitHub-Hookshot/1",
    }
    assert config["source_ip"] == "127.0.0.1" and config["received_at"]
    assert config["headers"]["x-github-event"] == "push"
    # Credentials and signatures are used, never stored.
    assert "authorization" not in config["headers"] and "x-hub-signature-256" not in config["headers"]
    enforcement = json.loads(
        await conn.fetchval("SELECT config FROM enforcement WHERE id = $1", got["enforcement_ids"][0])
    )
    assert enforcement == {"repo": "payments"}


async def test_the_generic_signature_header_works_too(stubs: Stubs, web: str, http: httpx.AsyncClient) -> None:
    trigger = await hook(stubs, SECRET)
    body = b'{"action": "pull"}'
    answer = await post(http, web, trigger.webhook_key, body, signed(body, header="X-Signature"))
    assert answer.status_code == 202 and answer.json()["enforcement_ids"] == []


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "application/json"},
        signed(b'{"action": "push"}', "another-secret-entirely"),
        {"content-type": "application/json", "X-Hub-Signature-256": "sha256=" + "0" * 64},
        {"content-type": "application/json", "X-Hub-Signature-256": "garbage"},
    ],
    ids=["unsigned", "other secret", "zero digest", "garbage"],
)
async def test_unsigned_or_badly_signed_deliveries_are_401_and_store_nothing(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection, headers: dict[str, str]
) -> None:
    trigger = await hook(stubs, SECRET)
    answer = await post(http, web, trigger.webhook_key, b'{"action": "push"}', headers)
    assert answer.status_code == 401, answer.text
    assert await count(conn, "event") == 0


async def test_a_redelivery_with_the_same_id_stores_one_event(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    trigger = await hook(stubs)
    first = await post(
        http,
        web,
        trigger.webhook_key,
        {"action": "push"},
        {"content-type": "application/json", "X-GitHub-Delivery": "d-1"},
    )
    again = await post(
        http,
        web,
        trigger.webhook_key,
        {"action": "push"},
        {"content-type": "application/json", "X-GitHub-Delivery": "d-1", "x-extra": "different headers"},
    )
    assert first.status_code == again.status_code == 202
    assert again.json()["event_id"] == first.json()["event_id"] and again.json()["replayed"] is True
    assert again.json()["enforcement_ids"] == first.json()["enforcement_ids"]
    other = await post(
        http,
        web,
        trigger.webhook_key,
        {"action": "push"},
        {"content-type": "application/json", "Idempotency-Key": "d-2"},
    )
    assert other.status_code == 202 and other.json()["event_id"] != first.json()["event_id"]
    assert await count(conn, "event") == 2


async def test_a_form_body_becomes_the_payload(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    trigger = await hook(stubs)
    answer = await http.post(
        f"{web}/webhooks/{trigger.webhook_key}",
        content=b"action=push&tag=a&tag=b",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 202, answer.text
    payload = json.loads(await conn.fetchval("SELECT payload FROM event WHERE id = $1", answer.json()["event_id"]))
    assert payload == {"action": "push", "tag": ["a", "b"]}
    assert len(answer.json()["enforcement_ids"]) == 1


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'{"a": NaN}', 400),
        (b"[" * 100_000 + b"]" * 100_000, 400),
        (b'{"a": "nul\\u0000"}', 400),
        (json.dumps({"a": "x" * (limits.MAX_WEBHOOK_BODY_BYTES + 1)}).encode(), 413),
    ],
    ids=["bad json", "not an object", "nan", "too deep", "nul", "oversize"],
)
async def test_bad_bodies_are_refused_and_store_nothing(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection, body: bytes, status: int
) -> None:
    trigger = await hook(stubs)
    answer = await post(http, web, trigger.webhook_key, body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]
    assert await count(conn, "event") == 0


async def test_unknown_or_disabled_keys_are_404_and_other_methods_405(
    stubs: Stubs, web: str, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    trigger = await hook(stubs, enabled=False)
    assert (await post(http, web, trigger.webhook_key, {"action": "push"})).status_code == 404
    assert (await post(http, web, "wh_" + "0" * 32, {"action": "push"})).status_code == 404
    assert (await post(http, web, "not-a-key", {"action": "push"})).status_code == 404
    assert (await http.get(f"{web}/webhooks/{trigger.webhook_key}")).status_code == 405
    await stubs.rules.UpdateTrigger(
        rule_pb2.UpdateTriggerRequest(
            trigger=rule_pb2.Trigger(ref=HOOK, webhook_enabled=True),
            update_mask=field_mask_pb2.FieldMask(paths=["webhook_enabled"]),
        )
    )
    assert (await post(http, web, trigger.webhook_key, {"action": "push"})).status_code == 202
    rotated = await stubs.rules.RotateWebhookKey(rule_pb2.RotateWebhookKeyRequest(ref=HOOK))
    assert (await post(http, web, trigger.webhook_key, {"action": "push"})).status_code == 404
    assert (await post(http, web, rotated.webhook_key, {"action": "push"})).status_code == 202
    assert await count(conn, "event") == 2


async def test_api_down_is_503_with_retry_after_and_stores_nothing(
    api_config: Any, stubs: Stubs, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    trigger = await hook(stubs)
    # A web service pointed at an address where no api listens: the delivery cannot be stored.
    async with serve(f"127.0.0.1:{free_port()}", rpc_timeout_s=1.0) as web:
        answer = await post(http, web, trigger.webhook_key, {"action": "push"})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert await count(conn, "event") == 0


async def test_a_web_service_without_the_sensor_role_answers_503(
    stubs: Stubs, api: ApiServer, http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    trigger = await hook(stubs)
    async with serve(f"127.0.0.1:{api.port}", token=TOKENS["viewer"]) as web:
        answer = await post(http, web, trigger.webhook_key, {"action": "push"})
    assert answer.status_code == 503
    assert await count(conn, "event") == 0


async def test_a_short_secret_is_refused_and_the_audit_never_holds_the_secret(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await hook(stubs)
    mask = field_mask_pb2.FieldMask(paths=["webhook_secret"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.rules.UpdateTrigger(
            rule_pb2.UpdateTriggerRequest(trigger=rule_pb2.Trigger(ref=HOOK, webhook_secret="short"), update_mask=mask)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "trigger.webhook_secret" in field_violations(err.value)
    updated = await stubs.rules.UpdateTrigger(
        rule_pb2.UpdateTriggerRequest(trigger=rule_pb2.Trigger(ref=HOOK, webhook_secret=SECRET), update_mask=mask)
    )
    assert updated.webhook_signed and updated.webhook_secret == ""
    changes = [json.loads(r["change"]) for r in await conn.fetch("SELECT change FROM audit_log ORDER BY id")]
    assert {"webhook_secret": "set"} in changes
    assert SECRET not in json.dumps(changes)
