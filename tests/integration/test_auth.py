"""Authentication and roles over real channels: every RPC for every role as the access table
says, and every way a credential can be wrong."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.api.auth import ACCESS, OPERATOR, ROLES, new_token, token_hash
from services.api.server import SERVICE_NAMES, ApiServer
from services.api.store import Store, create_pool
from shared.config import ApiConfig
from shared.gen.automation.v1 import auth_pb2, auth_pb2_grpc, rule_pb2, rule_pb2_grpc
from tests.helpers import eventually
from tests.integration.health_support import check

ROOT = Path(__file__).resolve().parents[2]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclasses.dataclass
class Secured:
    api: ApiServer
    target: str
    tokens: dict[str, str]  # role -> a token with only that role
    store: Store


@pytest.fixture
async def secured(api_config: ApiConfig) -> AsyncIterator[Secured]:
    """An api with authentication on, and one token per role."""
    store = Store(await create_pool(api_config.database_url, 1, 2))
    tokens = {}
    for role in ROLES:
        token, digest = new_token()
        await store.tokens.create(f"t-{role}", [role], digest, None)
        tokens[role] = token
    api = ApiServer(dataclasses.replace(api_config, insecure=False))
    await api.start()
    try:
        yield Secured(api, f"127.0.0.1:{api.port}", tokens, store)
    finally:
        await api.stop()
        await store.close()


def _md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def _code(channel: grpc.aio.Channel, method: str, token: str | None, body: bytes = b"") -> grpc.StatusCode:
    """The status of calling ``method`` with an empty request (authorisation comes first)."""
    service = descriptor_pool.Default().FindServiceByName(method.split("/")[0])
    streaming = service.FindMethodByName(method.split("/")[1]).server_streaming
    try:
        if streaming:
            stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{method}")
            call = stream(body, metadata=_md(token), timeout=10)
            async for _ in call:
                call.cancel()  # allowed: it started streaming
                return grpc.StatusCode.OK
            return grpc.StatusCode.OK
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{method}")
        await unary(body, metadata=_md(token), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _methods() -> list[str]:
    out: list[str] = []
    for name in SERVICE_NAMES:
        service = descriptor_pool.Default().FindServiceByName(name)
        out.extend(f"{service.full_name}/{m.name}" for m in service.methods)
    return out


def test_every_method_of_every_service_has_an_access_rule() -> None:
    missing = [m for m in _methods() if m not in ACCESS]
    assert missing == [], f"add these to services/api/auth.py ACCESS: {missing}"
    assert all(OPERATOR in roles for roles in ACCESS.values())


async def test_every_rpc_answers_every_role_as_the_access_table_says(secured: Secured) -> None:
    async with grpc.aio.insecure_channel(secured.target) as channel:
        for method in _methods():
            for role, token in secured.tokens.items():
                code = await _code(channel, method, token)
                if role in ACCESS[method]:
                    assert code not in (DENIED, UNAUTHENTICATED), (method, role, code)
                else:
                    assert code == DENIED, (method, role, code)


async def test_who_am_i_answers_each_role_its_own_name_and_roles(secured: Secured) -> None:
    async with grpc.aio.insecure_channel(secured.target) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        for role, token in secured.tokens.items():
            me = await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=_md(token))
            assert (me.name, list(me.roles), me.authentication) == (f"t-{role}", [role], True)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=_md("atk_forged"))
        assert info.value.code() == UNAUTHENTICATED


async def test_who_am_i_without_authentication_is_the_development_principal(api_config: ApiConfig) -> None:
    api = ApiServer(dataclasses.replace(api_config, insecure=True))
    await api.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            me = await auth_pb2_grpc.AuthServiceStub(channel).WhoAmI(auth_pb2.WhoAmIRequest())
        assert me.authentication is False
        assert sorted(me.roles) == sorted(ROLES) and me.name == "insecure-development"
    finally:
        await api.stop()


async def test_permission_denied_names_the_role_needed(secured: Secured) -> None:
    async with grpc.aio.insecure_channel(secured.target) as channel:
        stub = rule_pb2_grpc.RuleServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateTrigger(
                rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="a.b")),
                metadata=_md(secured.tokens["viewer"]),
            )
        assert info.value.code() == DENIED
        assert "needs operator" in (info.value.details() or "")


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer atk_not-a-real-token", "atk_no_scheme"],
)
async def test_missing_or_malformed_credentials_are_unauthenticated(secured: Secured, header: str | None) -> None:
    async with grpc.aio.insecure_channel(secured.target) as channel:
        metadata = (("authorization", header),) if header is not None else ()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rule_pb2_grpc.RuleServiceStub(channel).ListRules(rule_pb2.ListRulesRequest(), metadata=metadata)
        assert info.value.code() == UNAUTHENTICATED


async def test_expired_revoked_and_tampered_tokens_do_not_verify(secured: Secured, conn: asyncpg.Connection) -> None:
    expired, digest = new_token()
    await secured.store.tokens.create("old", ["viewer"], digest, -1)
    revoked, digest = new_token()
    await secured.store.tokens.create("gone", ["viewer"], digest, None)
    tampered, digest = new_token()
    await secured.store.tokens.create("bent", ["viewer"], digest, None)
    await secured.api.authenticator.load()
    async with grpc.aio.insecure_channel(secured.target) as channel:
        stub = rule_pb2_grpc.RuleServiceStub(channel)
        await stub.ListRules(rule_pb2.ListRulesRequest(), metadata=_md(revoked))
        await stub.ListRules(rule_pb2.ListRulesRequest(), metadata=_md(tampered))
        await secured.store.tokens.revoke("gone")
        other, _ = new_token()
        await conn.execute("UPDATE api_token SET token_hash = $1 WHERE name = 'bent'", token_hash(other))
        await secured.api.authenticator.load()
        for token in (expired, revoked, tampered):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListRules(rule_pb2.ListRulesRequest(), metadata=_md(token))
            assert info.value.code() == UNAUTHENTICATED


async def test_a_revocation_reaches_another_replica_within_seconds(secured: Secured, api_config: ApiConfig) -> None:
    second = ApiServer(dataclasses.replace(api_config, insecure=False))
    await second.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            stub = rule_pb2_grpc.RuleServiceStub(channel)
            viewer = secured.tokens["viewer"]
            await stub.ListRules(rule_pb2.ListRulesRequest(), metadata=_md(viewer))
            await secured.store.tokens.revoke("t-viewer")

            async def refused() -> bool:
                try:
                    await stub.ListRules(rule_pb2.ListRulesRequest(), metadata=_md(viewer))
                except grpc.aio.AioRpcError as exc:
                    return exc.code() == UNAUTHENTICATED
                return False

            await eventually(refused, timeout=10, what="the second replica to refuse the revoked token")
    finally:
        await second.stop()


async def test_health_is_open_and_reflection_needs_any_valid_token(secured: Secured) -> None:
    async with grpc.aio.insecure_channel(secured.target) as channel:
        assert await check(channel, "") == health_pb2.HealthCheckResponse.SERVING
        reflect: grpc.aio.StreamStreamMultiCallable[
            reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
        ] = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in reflect(iter([request])):
                pass
        assert info.value.code() == UNAUTHENTICATED
        answers = [a async for a in reflect(iter([request]), metadata=_md(secured.tokens["sensor"]))]
        names = {s.name for s in answers[0].list_services_response.service}
        assert set(SERVICE_NAMES) <= names


async def test_last_use_is_recorded(secured: Secured, conn: asyncpg.Connection) -> None:
    async with grpc.aio.insecure_channel(secured.target) as channel:
        await rule_pb2_grpc.RuleServiceStub(channel).ListRules(
            rule_pb2.ListRulesRequest(), metadata=_md(secured.tokens["viewer"])
        )
    await secured.api.authenticator.flush()
    assert await conn.fetchval("SELECT last_used_at IS NOT NULL FROM api_token WHERE name = 't-viewer'")
    assert await conn.fetchval("SELECT last_used_at IS NULL FROM api_token WHERE name = 't-sensor'")


def _cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DATABASE_URL=db_url)
    return subprocess.run(
        [sys.executable, "-m", "services.api", "tokens", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_token_commands_create_list_and_revoke(db_url: str, conn: asyncpg.Connection) -> None:
    made = await asyncio.to_thread(_cli, db_url, "create", "--name", "ci-bot", "--role", "sensor", "--role", "viewer")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("atk_") and len(token) >= 40
    stored = await conn.fetchrow("SELECT roles, token_hash FROM api_token WHERE name = 'ci-bot'")
    assert stored is not None
    assert sorted(stored["roles"]) == ["sensor", "viewer"]
    assert bytes(stored["token_hash"]) == token_hash(token)  # only the hash is kept
    listed = await asyncio.to_thread(_cli, db_url, "list")
    assert "ci-bot" in listed.stdout and token not in listed.stdout and "active" in listed.stdout
    again = await asyncio.to_thread(_cli, db_url, "create", "--name", "ci-bot", "--role", "sensor")
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = await asyncio.to_thread(_cli, db_url, "create", "--name", "x", "--role", "root")
    assert bad.returncode == 2
    revoked = await asyncio.to_thread(_cli, db_url, "revoke", "ci-bot")
    assert revoked.returncode == 0
    assert await conn.fetchval("SELECT revoked_at IS NOT NULL FROM api_token WHERE name = 'ci-bot'")
    unknown = await asyncio.to_thread(_cli, db_url, "revoke", "nobody")
    assert unknown.returncode == 1 and "no token named nobody" in unknown.stderr


async def test_tokens_create_out_writes_a_private_file_and_keeps_a_valid_one(
    db_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    out = tmp_path / "secrets" / "executor"
    args = ("create", "--name", "svc-executor", "--role", "executor", "--out", str(out))
    made = await asyncio.to_thread(_cli, db_url, *args)
    assert made.returncode == 0, made.stderr
    token = out.read_text().strip()
    assert token not in made.stdout + made.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert bytes(await conn.fetchval("SELECT token_hash FROM api_token WHERE name = 'svc-executor'")) == token_hash(
        token
    )
    again = await asyncio.to_thread(_cli, db_url, *args)  # a restarted compose step
    assert again.returncode == 0 and "kept" in again.stderr
    assert out.read_text().strip() == token
    audited = await conn.fetchval("SELECT count(*) FROM audit_log WHERE entity_type = 'token'")
    assert audited == 1
