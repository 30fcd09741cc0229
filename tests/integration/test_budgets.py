"""No client can take the others down: per-principal shares, the reserve for ingest and the
executor's path, health outside every budget, ingest pacing, and streams that end when their
token is revoked or expires. Real channels, real tokens, a real api."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.api.auth import new_token
from services.api.server import ApiServer
from services.api.store import Store
from shared.config import ApiConfig
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs, stubs_for
from tests.helpers import channel, eventually, new_event, rpc_error, rule
from tests.integration.health_support import SERVING, check
from tests.integration.watching import Watch, setup, state

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PROCESSED = common_pb2.ENFORCEMENT_STATUS_PROCESSED


def retry_delay(exc: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a refusal, in seconds (None when it has none)."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


class Clients:
    """Principals of their own (a fresh token each) with stubs over their own channels."""

    def __init__(self, api: ApiServer, store: Store, stack: AsyncExitStack) -> None:
        self.api, self.store, self.stack = api, store, stack
        self.target = f"127.0.0.1:{api.port}"

    async def make(self, name: str, role: str, expires_days: float | None = None) -> Stubs:
        token, digest = new_token()
        await self.store.tokens.create(name, [role], digest, expires_days)
        await self.api.authenticator.load()
        ch = await self.stack.enter_async_context(channel(self.target, token))
        return stubs_for(ch, self.target)


@pytest.fixture
def shares() -> dict[str, Any]:
    """Budget settings for the test (small, so that they can be filled)."""
    return {}


@pytest.fixture
async def budgeted(api_config: ApiConfig, shares: dict[str, Any], store: Store) -> AsyncIterator[Clients]:
    api = ApiServer(dataclasses.replace(api_config, token_refresh_s=0.2, **shares))
    await api.start()
    try:
        async with AsyncExitStack() as stack:
            yield Clients(api, store, stack)
    finally:
        await api.stop()


class Tails:
    """Server streams held open, read in the background (and cancelled at the end)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.errors: list[grpc.aio.AioRpcError] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self, call: Any, first: bool = True) -> Any:
        """Opens ``call``; with ``first``, waits for its first message (the announced start)."""
        self.calls.append(call)
        if first:
            await call.read()
        self._tasks.append(asyncio.create_task(self._drain(call)))
        return call

    async def _drain(self, call: Any) -> None:
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            self.errors.append(exc)

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()


def tail_events(stubs: Stubs) -> Any:
    return stubs.events.TailEvents(event_pb2.TailEventsRequest(announce_start=True))


@pytest.mark.parametrize("shares", [{"principal_streams": 4}])
async def test_a_viewer_holding_its_whole_stream_share_stops_nobody_else(budgeted: Clients) -> None:
    admin = await budgeted.make("admin", "operator")
    viewer = await budgeted.make("greedy-viewer", "viewer")
    other_viewer = await budgeted.make("other-viewer", "viewer")
    sensor = await budgeted.make("sensor", "sensor")
    executor = await budgeted.make("executor", "executor")
    await setup(admin, rule("demo.a", "core.webhook"))
    tails = Tails()
    try:
        for _ in range(4):
            await tails.open(tail_events(viewer))
        # The fifth is refused, to the viewer only, naming its budget and when to come back.
        err = await rpc_error(tails.open(tail_events(viewer)), EXHAUSTED)
        assert "API_PRINCIPAL_STREAMS" in (err.details() or "")
        assert "greedy-viewer" in (err.details() or "")
        assert retry_delay(err) == pytest.approx(5.0)
        # Everyone else goes on: another viewer's tail and list, a sensor's event, the
        # executor's watch and resolution, and the health check.
        await tails.open(tail_events(other_viewer))
        await other_viewer.events.ListEvents(event_pb2.ListEventsRequest())
        created = await sensor.events.CreateEvent(
            event_pb2.CreateEventRequest(event=new_event("core.webhook", {"n": 1}))
        )
        (enforcement,) = created.enforcements
        watch = Watch(executor, "exec-1")
        try:
            (delivery,) = await watch.delivered(1)
            assert delivery.enforcement.id == enforcement.id
            await executor.enforcements.ResolveEnforcement(
                enforcement_pb2.ResolveEnforcementRequest(
                    id=enforcement.id,
                    status=PROCESSED,
                    executor_id="exec-1",
                )
            )
        finally:
            watch.call.cancel()
        assert await check(sensor.channel, "") == SERVING
        # And the viewer's own non-stream calls still have their share.
        await viewer.events.ListEvents(event_pb2.ListEventsRequest())
    finally:
        tails.close()


@pytest.mark.parametrize("shares", [{"max_calls": 6, "reserved_calls": 3, "principal_streams": 2}])
async def test_reads_and_tails_never_take_the_reserve_of_ingest_and_the_executor(budgeted: Clients) -> None:
    admin = await budgeted.make("admin", "operator")
    await setup(admin, rule("demo.a", "core.webhook"))
    viewers = [await budgeted.make(f"viewer-{i}", "viewer") for i in range(2)]
    sensor = await budgeted.make("sensor", "sensor")
    executor = await budgeted.make("executor", "executor")
    tails = Tails()
    try:
        # Three viewers' tails fill what is not reserved (6 - 3)...
        await tails.open(tail_events(viewers[0]))
        await tails.open(tail_events(viewers[0]))
        await tails.open(tail_events(viewers[1]))
        err = await rpc_error(tails.open(tail_events(viewers[1])), EXHAUSTED)
        assert "at capacity" in (err.details() or "") and "3 are reserved" in (err.details() or "")
        err = await rpc_error(admin.rules.ListRules(rule_pb2.ListRulesRequest()), EXHAUSTED)
        # ...and ingest, the executor's watch and its resolution still get in.
        created = await sensor.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook")))
        watch = Watch(executor, "exec-1")
        try:
            await watch.delivered(1)
            await executor.enforcements.ResolveEnforcement(
                enforcement_pb2.ResolveEnforcementRequest(
                    id=created.enforcements[0].id, status=PROCESSED, executor_id="exec-1"
                )
            )
        finally:
            watch.call.cancel()
        # Health is outside every budget.
        assert await check(sensor.channel, "") == SERVING
    finally:
        tails.close()


@pytest.mark.parametrize("shares", [{"principal_calls": 3}])
async def test_a_principal_past_its_call_share_is_refused_and_only_it(budgeted: Clients) -> None:
    viewer = await budgeted.make("viewer", "viewer")
    other = await budgeted.make("other", "viewer")
    tails = Tails()
    try:
        for _ in range(3):
            await tails.open(tail_events(viewer))
        err = await rpc_error(viewer.events.ListEvents(event_pb2.ListEventsRequest()), EXHAUSTED)
        assert "API_PRINCIPAL_CALLS" in (err.details() or "")
        assert retry_delay(err) == pytest.approx(0.25)
        await other.events.ListEvents(event_pb2.ListEventsRequest())
        # A closed stream gives its share back.
        tails.calls[0].cancel()

        async def listed() -> bool:
            try:
                await viewer.events.ListEvents(event_pb2.ListEventsRequest())
            except grpc.aio.AioRpcError as exc:
                if exc.code() != EXHAUSTED:
                    raise
                return False
            return True

        await eventually(listed, what="the closed tail's share to come back")
    finally:
        tails.close()


@pytest.mark.parametrize("shares", [{"health_watches": 2, "max_calls": 2, "reserved_calls": 1}])
async def test_health_is_answered_whatever_else_runs_and_its_watches_are_bounded(budgeted: Clients) -> None:
    viewer = await budgeted.make("viewer", "viewer")
    tails = Tails()
    try:
        await tails.open(tail_events(viewer))  # the one non-reserved call slot
        await rpc_error(viewer.events.ListEvents(event_pb2.ListEventsRequest()), EXHAUSTED)
        async with grpc.aio.insecure_channel(budgeted.target) as anonymous:
            assert await check(anonymous, "") == SERVING
            watch: Any = anonymous.unary_stream(
                "/grpc.health.v1.Health/Watch",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            for _ in range(2):
                await tails.open(watch(health_pb2.HealthCheckRequest()))
            err = await rpc_error(tails.open(watch(health_pb2.HealthCheckRequest())), EXHAUSTED)
            assert "API_HEALTH_WATCHES" in (err.details() or "")
            assert await check(anonymous, "") == SERVING
    finally:
        tails.close()


@pytest.mark.parametrize("shares", [{"ingest_rate": 50.0}])
async def test_a_sensor_over_its_ingest_rate_is_slowed_then_refused_and_no_other_sensor_is(
    budgeted: Clients,
) -> None:
    admin = await budgeted.make("admin", "operator")
    await setup(admin, rule("demo.a", "core.webhook"))
    flood = await budgeted.make("flooding-sensor", "sensor")
    calm = await budgeted.make("calm-sensor", "sensor")

    def batch(n: int) -> event_pb2.CreateEventsRequest:
        return event_pb2.CreateEventsRequest(events=[new_event("core.webhook", {"i": i}) for i in range(n)])

    # The burst is 2 s of the rate (100 events). Of three more batches sent at once, one waits
    # its turn (2 s, the most a call is slowed) and is stored; the flood past that is refused,
    # with when to come back.
    await flood.events.CreateEvents(batch(100))
    results = await asyncio.gather(*(flood.events.CreateEvents(batch(100)) for _ in range(3)), return_exceptions=True)
    stored = [r for r in results if isinstance(r, event_pb2.CreateEventsResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(stored) == 1 and len(stored[0].receipts) == 100
    assert len(refused) == 2
    for err in refused:
        assert err.code() == EXHAUSTED
        assert "API_INGEST_RATE" in (err.details() or "") and "flooding-sensor" in (err.details() or "")
        delay = retry_delay(err)
        assert delay is not None and delay > 0
    # The other sensor has its own rate, untouched by the flood.
    await calm.events.CreateEvents(batch(100))
    await calm.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook")))


# A lease far longer than the test: the work can only move on because the watch released it.
@pytest.mark.parametrize("shares", [{"lease_s": 120.0}])
async def test_revocation_ends_tails_and_watches_and_releases_the_watchs_leases(budgeted: Clients) -> None:
    admin = await budgeted.make("admin", "operator")
    await setup(admin, rule("demo.a", "core.webhook"))
    viewer = await budgeted.make("revoked-viewer", "viewer")
    executor = await budgeted.make("revoked-executor", "executor")
    tails = Tails()
    try:
        events_tail = await tails.open(tail_events(viewer))
        enforcements_tail = await tails.open(
            viewer.enforcements.TailEnforcements(enforcement_pb2.TailEnforcementsRequest(announce_start=True))
        )
        created = await admin.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("core.webhook")))
        watch = Watch(executor, "exec-revoked")
        (delivery,) = await watch.delivered(1)
        assert delivery.enforcement.id == created.enforcements[0].id
        assert budgeted.api.authenticator.open_streams == 3

        await budgeted.store.tokens.revoke("revoked-viewer")
        await budgeted.store.tokens.revoke("revoked-executor")

        await asyncio.wait_for(watch.ended.wait(), 10)
        assert watch.error is not None and watch.error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (watch.error.details() or "")
        for call in (events_tail, enforcements_tail):
            assert await call.code() == grpc.StatusCode.UNAUTHENTICATED

        # The watch's lease is released as it ends (its cleanup runs once the client has its
        # status, so a moment later): another executor takes the work then, not a lease later.
        async def released() -> bool:
            s = await state(admin)
            return not [x for x in s.leases if x.executor_id == "exec-revoked"]

        await eventually(released, what="the revoked watch's lease released")
        other = await budgeted.make("other-executor", "executor")
        taker = Watch(other, "exec-other")
        try:
            (again,) = await taker.delivered(1)
            assert again.enforcement.id == delivery.enforcement.id
        finally:
            taker.call.cancel()

        async def none_open() -> bool:
            return budgeted.api.authenticator.open_streams == 0

        await eventually(none_open, what="every stream to be unregistered as it ends")
    finally:
        tails.close()


async def test_a_stream_ends_when_its_token_expires(budgeted: Clients) -> None:
    viewer = await budgeted.make("short-lived", "viewer", expires_days=3 / 86400)  # 3 seconds
    tails = Tails()
    try:
        call = await tails.open(tail_events(viewer))
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in (await call.details())
    finally:
        tails.close()


async def test_revocation_ends_a_reflection_stream_too(budgeted: Clients) -> None:
    """Bidirectional streams (reflection, what grpcurl holds open) are registered like tails."""
    viewer = await budgeted.make("grpcurl-user", "viewer")
    reflect: grpc.aio.StreamStreamMultiCallable[
        reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
    ] = viewer.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = reflect()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    answer = await call.read()
    assert isinstance(answer, reflection_pb2.ServerReflectionResponse) and answer.list_services_response.service
    await budgeted.store.tokens.revoke("grpcurl-user")
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
