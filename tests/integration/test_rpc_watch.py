"""WatchEnforcements, ReleaseEnforcement, GetDispatchState and RetryEnforcement over a real
channel to a real api on a real PostgreSQL.

A ``Watch`` (``tests.integration.watching``) reads one stream in a background task and keeps
every message in arrival order. Where a test must show that something is *not* delivered, it
waits for further heartbeats: the server sends one only after a round of its loop in which it
had nothing (more) to hand out, so two more heartbeats mean two rounds that delivered nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest

from services.api.server import ApiServer
from services.api.store import Store
from shared.config import ApiConfig
from shared.gen.automation.v1 import (
    analytics_pb2_grpc,
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    execution_pb2_grpc,
    history_pb2_grpc,
    rule_pb2_grpc,
)
from tests.conftest import Stubs
from tests.helpers import channel as authed_channel
from tests.helpers import eventually, field_violations, new_event, rpc_error, rule
from tests.integration.watching import Watch, pending, setup, state

PROCESSED = common_pb2.ENFORCEMENT_STATUS_PROCESSED
DISABLED = common_pb2.ENFORCEMENT_STATUS_DISABLED


Opener = Callable[..., Watch]


@pytest.fixture
async def watch() -> AsyncIterator[Opener]:
    """Opens watch streams; closes every one still open at the end of the test."""
    opened: list[Watch] = []

    def open_(stubs: Stubs, executor_id: str, max_in_flight: int = 0, **kw: Any) -> Watch:
        w = Watch(stubs, executor_id, max_in_flight, **kw)
        opened.append(w)
        return w

    yield open_
    for w in opened:
        await w.close()


@contextlib.asynccontextmanager
async def serve(config: ApiConfig) -> AsyncIterator[Stubs]:
    """A real api with ``config`` and stubs over a real channel to it."""
    server = ApiServer(config)
    await server.start()
    try:
        target = f"127.0.0.1:{server.port}"
        async with authed_channel(target) as channel:
            yield Stubs(
                channel=channel,
                target=target,
                events=event_pb2_grpc.EventServiceStub(channel),
                enforcements=enforcement_pb2_grpc.EnforcementServiceStub(channel),
                rules=rule_pb2_grpc.RuleServiceStub(channel),
                executions=execution_pb2_grpc.ExecutionServiceStub(channel),
                history=history_pb2_grpc.HistoryServiceStub(channel),
                analytics=analytics_pb2_grpc.AnalyticsServiceStub(channel),
            )
    finally:
        await server.stop()


@pytest.fixture
async def one_attempt(api_config: ApiConfig) -> AsyncIterator[Stubs]:
    """An api on which an enforcement is handed out once before it counts as exhausted."""
    async with serve(dataclasses.replace(api_config, max_attempts=1)) as stubs:
        yield stubs


@pytest.fixture
async def long_lease(api_config: ApiConfig) -> AsyncIterator[Stubs]:
    """An api whose leases outlive any test: whatever is handed out again was released."""
    async with serve(dataclasses.replace(api_config, lease_s=600.0)) as stubs:
        yield stubs


def leases(s: enforcement_pb2.GetDispatchStateResponse) -> dict[str, int]:
    return {x.executor_id: x.leased for x in s.leases}


def resolve(stubs: Stubs, id_: int, status: int = PROCESSED) -> Awaitable[enforcement_pb2.ResolveEnforcementResponse]:
    return stubs.enforcements.ResolveEnforcement(
        enforcement_pb2.ResolveEnforcementRequest(id=id_, status=status)  # type: ignore[arg-type]
    )


def release(stubs: Stubs, id_: int, executor_id: str, error: str = "") -> Awaitable[Any]:
    return stubs.enforcements.ReleaseEnforcement(
        enforcement_pb2.ReleaseEnforcementRequest(id=id_, executor_id=executor_id, error=error)
    )


# --- WatchEnforcements ----------------------------------------------------------------------


async def test_watch_delivers_every_pending_enforcement_oldest_first_then_new_ones(stubs: Stubs, watch: Opener) -> None:
    await setup(stubs)
    before = await pending(stubs, 3)
    w = watch(stubs, "exec-a")
    first = await w.delivered(3)
    assert [d.enforcement.id for d in first] == before
    assert all(d.attempt == 1 for d in first)
    assert all(d.enforcement.status == common_pb2.ENFORCEMENT_STATUS_CREATED for d in first)
    assert all(d.lease_expires_at.ToDatetime() > d.enforcement.created.ToDatetime() for d in first)

    after = await pending(stubs, 2)
    await w.delivered(5)
    assert w.ids == before + after
    assert w.error is None


async def test_watch_hands_out_at_most_max_in_flight_until_one_is_resolved(stubs: Stubs, watch: Opener) -> None:
    await setup(stubs)
    ids = await pending(stubs, 5)
    w = watch(stubs, "exec-a", max_in_flight=2)
    await w.delivered(2)
    await w.beats(2)
    assert w.ids == ids[:2]
    assert w.heartbeats[-1].in_flight == 2
    s = await state(stubs)
    assert (s.pending, s.waiting, leases(s)) == (5, 3, {"exec-a": 2})

    await resolve(stubs, ids[0])
    await w.delivered(3)
    await w.beats(2)
    assert w.ids == ids[:3]
    assert w.heartbeats[-1].in_flight == 2

    await resolve(stubs, ids[1], DISABLED)
    await resolve(stubs, ids[2])
    await w.delivered(5)
    assert w.ids == ids


async def test_new_work_is_handed_to_an_open_stream_leased_by_its_own_insert(
    stubs: Stubs, watch: Opener, api_config: ApiConfig
) -> None:
    await setup(stubs)
    w = watch(stubs, "exec-a")
    await w.beats(1)  # the stream is open and has looked for waiting work
    (enf_id,) = await pending(stubs, 1)
    (d,) = await w.delivered(1)
    assert (d.enforcement.id, d.attempt) == (enf_id, 1)
    # A claim would lease from its own later now(); the hand-off leases in the insert, whose
    # transaction also stamped `created`.
    lease = d.lease_expires_at.ToDatetime() - d.enforcement.created.ToDatetime()
    assert lease.total_seconds() == api_config.lease_s
    s = await state(stubs)
    assert (s.pending, s.waiting, leases(s)) == (1, 0, {"exec-a": 1})
    await resolve(stubs, enf_id)
    assert (await state(stubs)).pending == 0


async def test_a_stream_kept_busy_by_hand_offs_still_polls_for_other_work(
    api_config: ApiConfig, watch: Opener, conn: asyncpg.Connection
) -> None:
    async with serve(dataclasses.replace(api_config, poll_s=1.0)) as stubs:
        await _busy_stream_polls(stubs, watch, conn)


async def _busy_stream_polls(stubs: Stubs, watch: Opener, conn: asyncpg.Connection) -> None:
    await setup(stubs)
    w = watch(stubs, "exec-a", max_in_flight=1000)
    stop = asyncio.Event()

    async def flood() -> None:
        # Hand-offs wake the stream far more often than its poll interval (1 s here).
        while not stop.is_set():
            await pending(stubs, 1)

    flooding = asyncio.create_task(flood())
    try:
        await w.delivered(20)
        # Work from another writer that announces nothing: only a poll finds it.
        await conn.execute("SET automation.notify = off")
        orphan = await conn.fetchval(
            "INSERT INTO enforcement (rule, rule_ref, trigger_ref) "
            "SELECT id, ref, trigger_ref FROM rule WHERE ref = 'demo.a' RETURNING id"
        )
        enough = len(w.ids) + 800  # a few seconds of hand-offs: several poll intervals

        async def found_or_enough() -> bool:
            return orphan in w.ids or len(w.ids) >= enough

        await eventually(found_or_enough, timeout=30, what="the orphan or 800 more hand-offs")
    finally:
        stop.set()
        await flooding
    assert orphan in w.ids


async def test_new_work_does_not_overtake_work_waiting_for_credit(stubs: Stubs, watch: Opener) -> None:
    await setup(stubs)
    w = watch(stubs, "exec-a", max_in_flight=1)
    await w.beats(1)
    first, second = await pending(stubs, 2)
    await w.delivered(1)
    (third,) = await pending(stubs, 1)
    await w.beats(2)
    assert w.ids == [first]
    await resolve(stubs, first)
    await w.delivered(2)
    await resolve(stubs, second)
    await w.delivered(3)
    assert w.ids == [first, second, third]


async def test_watch_sends_heartbeats_while_idle(stubs: Stubs, watch: Opener) -> None:
    w = watch(stubs, "exec-a")
    await w.beats(3)
    assert w.deliveries == []
    assert all(h.in_flight == 0 for h in w.heartbeats)
    times = [h.server_time.ToDatetime() for h in w.heartbeats]
    assert times == sorted(times) and times[0].year >= 2024


async def test_watch_filters_by_rule_and_trigger_refs(stubs: Stubs, watch: Opener) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"), rule("demo.b", "core.webhook"), rule("demo.t", "core.timer"))
    hook = await pending(stubs, 2)
    timer = await pending(stubs, 1, "core.timer")
    by_rule = watch(stubs, "exec-rule", rule_refs=["demo.b"])
    by_trigger = watch(stubs, "exec-trigger", trigger_refs=["core.timer"])
    await by_rule.delivered(2)
    await by_trigger.delivered(1)
    await by_rule.beats(2)
    await by_trigger.beats(2)
    assert {d.enforcement.rule_ref for d in by_rule.deliveries} == {"demo.b"}
    assert len(by_rule.ids) == 2 and set(by_rule.ids) < set(hook)
    assert by_trigger.ids == timer
    s = await state(stubs)
    assert (s.pending, s.waiting) == (5, 2)


async def test_two_streams_never_receive_the_same_enforcement(stubs: Stubs, watch: Opener) -> None:
    await setup(stubs)
    a = watch(stubs, "exec-a", max_in_flight=10)
    b = watch(stubs, "exec-b", max_in_flight=10)
    await a.beats(1)
    await b.beats(1)
    batch = await stubs.events.CreateEvents(
        event_pb2.CreateEventsRequest(events=[new_event("core.webhook", {"i": i}) for i in range(15)])
    )
    ids = [i for r in batch.receipts for i in r.enforcement_ids]

    async def all_delivered() -> bool:
        return len(a.deliveries) + len(b.deliveries) >= 15

    await eventually(all_delivered, what="15 deliveries over both streams")
    await a.beats(2)
    await b.beats(2)
    # Each stream holds at most 10, so both got some; none got one the other has.
    assert 5 <= len(a.ids) <= 10 and 5 <= len(b.ids) <= 10
    assert set(a.ids).isdisjoint(b.ids)
    assert sorted(a.ids + b.ids) == sorted(ids)
    assert leases(await state(stubs)) == {"exec-a": len(a.ids), "exec-b": len(b.ids)}


async def test_closing_a_stream_releases_its_leases_to_another_stream_at_once(
    long_lease: Stubs, watch: Opener, conn: asyncpg.Connection
) -> None:
    stubs = long_lease
    await setup(stubs)
    ids = await pending(stubs, 3)
    a = watch(stubs, "exec-a", max_in_flight=3)
    await a.delivered(3)
    assert leases(await state(stubs)) == {"exec-a": 3}

    await a.close()
    b = watch(stubs, "exec-b")
    # Leases last 600s here: getting them now means closing the stream gave them back.
    got = await b.delivered(3)
    assert [d.enforcement.id for d in got] == ids
    assert [d.attempt for d in got] == [2, 2, 2]
    assert leases(await state(stubs)) == {"exec-b": 3}
    errors = await conn.fetch("SELECT last_error FROM enforcement_dispatch ORDER BY enforcement")
    assert [r["last_error"] for r in errors] == ["stream closed (exec-a)"] * 3


async def test_an_open_stream_keeps_its_lease_past_the_first_expiry(
    stubs: Stubs, watch: Opener, conn: asyncpg.Connection
) -> None:
    await setup(stubs)
    (id_,) = await pending(stubs, 1)
    a = watch(stubs, "exec-a")
    (delivery,) = await a.delivered(1)
    first_expiry = delivery.lease_expires_at.ToDatetime()

    async def past_first_expiry() -> bool:
        return any(h.server_time.ToDatetime() > first_expiry for h in a.heartbeats)

    await eventually(past_first_expiry, what="a heartbeat after the first lease expiry")
    b = watch(stubs, "exec-b")
    await b.beats(2)
    assert b.deliveries == []
    assert a.ids == [id_]
    assert leases(await state(stubs)) == {"exec-a": 1}
    renewed = await conn.fetchval("SELECT lease_expires_at FROM enforcement_dispatch WHERE enforcement = $1", id_)
    assert renewed.replace(tzinfo=None) > first_expiry


async def test_lease_of_a_holder_that_vanished_expires_and_is_handed_out_again(
    stubs: Stubs, store: Store, watch: Opener, conn: asyncpg.Connection
) -> None:
    await setup(stubs)
    (id_,) = await pending(stubs, 1)
    # A holder that went away without a word (an api replica that died): claimed, never renewed.
    (claimed,) = await store.dispatch.claim(executor_id="ghost", token="ghost/1", limit=1, lease_s=1.0, max_attempts=5)
    assert claimed.enforcement.id == id_
    s = await state(stubs)
    assert (leases(s), s.waiting) == ({"ghost": 1}, 0)

    w = watch(stubs, "exec-a")
    (delivery,) = await w.delivered(1)
    assert (delivery.enforcement.id, delivery.attempt) == (id_, 2)
    assert leases(await state(stubs)) == {"exec-a": 1}
    last_error = await conn.fetchval("SELECT last_error FROM enforcement_dispatch WHERE enforcement = $1", id_)
    assert last_error == "lease of ghost expired"


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"executor_id": ""}, "executor_id"),
        ({"executor_id": "x", "max_in_flight": -1}, "max_in_flight"),
        ({"executor_id": "x", "max_in_flight": 1001}, "max_in_flight"),
        ({"executor_id": "x", "rule_refs": ["demo.a", "Bad"]}, "rule_refs[1]"),
        ({"executor_id": "x", "trigger_refs": ["nodot"]}, "trigger_refs[0]"),
    ],
    ids=["no-executor", "negative-credit", "too-much-credit", "bad-rule-ref", "bad-trigger-ref"],
)
async def test_watch_with_bad_request_fails_with_invalid_argument_naming_the_field(
    stubs: Stubs, conn: asyncpg.Connection, kw: dict[str, Any], field: str
) -> None:
    await setup(stubs)
    await pending(stubs, 1)
    call = stubs.enforcements.WatchEnforcements(enforcement_pb2.WatchEnforcementsRequest(**kw))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(info.value)
    assert await conn.fetchval("SELECT count(*) FROM enforcement_dispatch WHERE leased_by IS NOT NULL") == 0


# --- ReleaseEnforcement ---------------------------------------------------------------------


async def test_release_by_the_holder_hands_it_out_again_as_attempt_2(
    stubs: Stubs, watch: Opener, conn: asyncpg.Connection
) -> None:
    await setup(stubs)
    (id_,) = await pending(stubs, 1)
    w = watch(stubs, "exec-a", max_in_flight=1)
    (first,) = await w.delivered(1)
    assert first.attempt == 1

    resp = await release(stubs, id_, "exec-a", "cannot decide yet")
    assert resp.released is True
    deliveries = await w.delivered(2)
    assert [(d.enforcement.id, d.attempt) for d in deliveries] == [(id_, 1), (id_, 2)]
    last_error = await conn.fetchval("SELECT last_error FROM enforcement_dispatch WHERE enforcement = $1", id_)
    assert last_error == "cannot decide yet"


async def test_release_by_another_executor_is_ignored(stubs: Stubs, watch: Opener) -> None:
    await setup(stubs)
    (id_,) = await pending(stubs, 1)
    w = watch(stubs, "exec-a", max_in_flight=1)
    await w.delivered(1)
    resp = await release(stubs, id_, "exec-b", "not mine")
    assert resp.released is False
    await w.beats(2)
    assert w.ids == [id_]
    assert leases(await state(stubs)) == {"exec-a": 1}


async def test_release_of_an_enforcement_nobody_holds_releases_nothing(stubs: Stubs) -> None:
    await setup(stubs)
    (id_,) = await pending(stubs, 1)
    assert (await release(stubs, id_, "exec-a")).released is False
    assert (await release(stubs, 999999, "exec-a")).released is False


@pytest.mark.parametrize(("id_", "executor", "field"), [(1, "", "executor_id"), (0, "exec-a", "id")])
async def test_release_with_bad_request_is_invalid_argument_naming_the_field(
    stubs: Stubs, id_: int, executor: str, field: str
) -> None:
    err = await rpc_error(release(stubs, id_, executor), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in field_violations(err)


# --- GetDispatchState -----------------------------------------------------------------------


async def test_dispatch_state_when_nothing_is_pending(stubs: Stubs) -> None:
    s = await state(stubs)
    assert (s.pending, s.waiting, s.exhausted_count) == (0, 0, 0)
    assert not s.HasField("oldest_pending_age")
    assert list(s.leases) == [] and list(s.exhausted) == []


async def test_dispatch_state_counts_pending_waiting_and_leases_per_executor(stubs: Stubs, watch: Opener) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"), rule("demo.t", "core.timer"))
    await pending(stubs, 3)
    await pending(stubs, 2, "core.timer")
    a = watch(stubs, "exec-a", max_in_flight=2, trigger_refs=["core.webhook"])
    b = watch(stubs, "exec-b", max_in_flight=1, trigger_refs=["core.timer"])
    await a.delivered(2)
    await b.delivered(1)
    s = await state(stubs)
    assert (s.pending, s.waiting, s.exhausted_count) == (5, 2, 0)
    assert [(x.executor_id, x.leased) for x in s.leases] == [("exec-a", 2), ("exec-b", 1)]
    assert s.HasField("oldest_pending_age")
    assert s.oldest_pending_age.ToTimedelta().total_seconds() >= 0


@pytest.mark.parametrize("limit", [-1, 1001])
async def test_dispatch_state_with_bad_exhausted_limit_is_invalid_argument(stubs: Stubs, limit: int) -> None:
    err = await rpc_error(state(stubs, exhausted_limit=limit), grpc.StatusCode.INVALID_ARGUMENT)
    assert "exhausted_limit" in field_violations(err)


# --- exhaustion and RetryEnforcement --------------------------------------------------------


async def test_exhausted_enforcement_is_listed_and_retry_makes_it_deliverable_again(
    one_attempt: Stubs, watch: Opener
) -> None:
    stubs = one_attempt
    await setup(stubs)
    (id_,) = await pending(stubs, 1)
    w = watch(stubs, "exec-a", max_in_flight=1)
    await w.delivered(1)
    assert (await release(stubs, id_, "exec-a", "action backend down")).released is True

    async def exhausted() -> enforcement_pb2.GetDispatchStateResponse | None:
        s = await state(stubs)
        return s if s.exhausted_count else None

    s = await eventually(exhausted, what="the enforcement to be reported exhausted")
    assert (s.pending, s.waiting, s.exhausted_count) == (1, 0, 1)
    (x,) = s.exhausted
    assert (x.id, x.rule_ref, x.attempts, x.last_error) == (id_, "demo.a", 1, "action backend down")
    assert x.created == w.deliveries[0].enforcement.created
    await w.beats(2)
    assert w.ids == [id_]  # not handed out again on its own

    retried = await stubs.enforcements.RetryEnforcement(enforcement_pb2.RetryEnforcementRequest(id=id_))
    assert retried.enforcement.id == id_
    assert retried.enforcement.status == common_pb2.ENFORCEMENT_STATUS_CREATED
    deliveries = await w.delivered(2)
    assert [(d.enforcement.id, d.attempt) for d in deliveries] == [(id_, 1), (id_, 1)]
    s = await state(stubs)
    assert (s.exhausted_count, list(s.exhausted), leases(s)) == (0, [], {"exec-a": 1})


async def test_exhausted_list_respects_the_limit_oldest_first(one_attempt: Stubs, watch: Opener) -> None:
    stubs = one_attempt
    await setup(stubs)
    ids = await pending(stubs, 3)
    w = watch(stubs, "exec-a", max_in_flight=3)
    await w.delivered(3)
    await w.close()  # the close releases all three; with one attempt each they are exhausted

    async def all_exhausted() -> bool:
        return (await state(stubs)).exhausted_count == 3

    await eventually(all_exhausted, what="three exhausted enforcements")
    s = await state(stubs, exhausted_limit=2)
    assert [x.id for x in s.exhausted] == ids[:2]
    assert all(x.last_error == "stream closed (exec-a)" for x in s.exhausted)


async def test_retry_of_an_enforcement_that_is_not_exhausted_is_failed_precondition(stubs: Stubs) -> None:
    await setup(stubs)
    (id_,) = await pending(stubs, 1)
    err = await rpc_error(
        stubs.enforcements.RetryEnforcement(enforcement_pb2.RetryEnforcementRequest(id=id_)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "not exhausted" in (err.details() or "")


async def test_retry_of_a_resolved_or_unknown_enforcement_is_not_found(stubs: Stubs) -> None:
    await setup(stubs)
    (id_,) = await pending(stubs, 1)
    await resolve(stubs, id_)
    for missing in (id_, 987654):
        await rpc_error(
            stubs.enforcements.RetryEnforcement(enforcement_pb2.RetryEnforcementRequest(id=missing)),
            grpc.StatusCode.NOT_FOUND,
        )
    err = await rpc_error(
        stubs.enforcements.RetryEnforcement(enforcement_pb2.RetryEnforcementRequest(id=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "id" in field_violations(err)
