"""Live tails (TailEvents, TailEnforcements) over real channels to a real api on PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from services.api.server import ApiServer
from services.api.servicers.tails import PAGE
from shared.config import ApiConfig
from shared.errors import error_reason
from shared.gen.automation.v1 import (
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    rule_pb2,
)
from shared.transport import ClientSecurity, open_channel
from tests.conftest import Stubs
from tests.helpers import OPERATOR, TOKENS, channel, field_violations, new_event, rule, throughout
from tests.integration.tails_support import Stream, emit, opened, tail_enforcements, tail_events, take, triggers

CREATED = enforcement_pb2.TailEnforcementsResponse.CHANGE_CREATED
RESOLVED = enforcement_pb2.TailEnforcementsResponse.CHANGE_RESOLVED
STARTED = enforcement_pb2.TailEnforcementsResponse.CHANGE_STARTED


async def quiet_until(stubs: Stubs, call: Stream, trigger_ref: str) -> int:
    """Stores a sentinel event and returns its id once it is the very next message: nothing
    else (no duplicate, no stray row) came before it."""
    sentinel = await emit(stubs, trigger_ref, sentinel=True)
    (msg,) = await take(call, 1)
    assert msg.event.id == sentinel, f"expected the sentinel {sentinel}, got event {msg.event.id}"
    return sentinel


# --- from now, with filters -----------------------------------------------------------------------


async def test_tail_events_from_now_delivers_new_matching_events_in_order(api: ApiServer, stubs: Stubs) -> None:
    await triggers(stubs, "demo.a", "demo.b")
    before = await emit(stubs, "demo.a", n=-1)
    call = await opened(api, tail_events(stubs, trigger_ref="demo.a"))
    wanted = []
    for i in range(5):
        wanted.append(await emit(stubs, "demo.a", n=i))
        await emit(stubs, "demo.b", n=i)
    got = await take(call, 5)
    assert [m.event.id for m in got] == wanted
    assert before not in [m.event.id for m in got]
    assert all(m.event.trigger_ref == "demo.a" and m.cursor for m in got)
    await quiet_until(stubs, call, "demo.a")
    call.cancel()


async def test_tail_events_source_filter(api: ApiServer, stubs: Stubs) -> None:
    await triggers(stubs, "demo.a")
    call = await opened(api, tail_events(stubs, source_ref="sensor-1"))
    await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("demo.a", {"x": 1})))
    resp = await stubs.events.CreateEvent(
        event_pb2.CreateEventRequest(event=new_event("demo.a", {"x": 2}, source_ref="sensor-1"))
    )
    (msg,) = await take(call, 1)
    assert msg.event.id == resp.event.id and msg.event.source_ref == "sensor-1"
    call.cancel()


# --- enforcements: created, then resolved ---------------------------------------------------------


async def test_tail_enforcements_created_then_resolved(api: ApiServer, stubs: Stubs) -> None:
    await triggers(stubs, "demo.a", "demo.b")
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.r", "demo.a")))
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.other", "demo.b")))
    call = await opened(api, tail_enforcements(stubs, rule_ref="demo.r"))
    await emit(stubs, "demo.b", n=0)  # fires demo.other: filtered out
    resp = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("demo.a", {"n": 1})))
    (enf,) = resp.enforcements
    (created,) = await take(call, 1)
    assert created.change == CREATED and created.enforcement.id == enf.id
    assert created.enforcement.status == common_pb2.ENFORCEMENT_STATUS_CREATED
    assert not created.enforcement.HasField("resolved_at")

    async with channel(stubs.target, TOKENS["executor"]) as ch:
        executor = enforcement_pb2_grpc.EnforcementServiceStub(ch)
        await executor.ResolveEnforcement(
            enforcement_pb2.ResolveEnforcementRequest(
                id=enf.id, status=common_pb2.ENFORCEMENT_STATUS_PROCESSED, executor_id="test"
            )
        )
    (resolved,) = await take(call, 1)
    assert resolved.change == RESOLVED and resolved.enforcement.id == enf.id
    assert resolved.enforcement.status == common_pb2.ENFORCEMENT_STATUS_PROCESSED
    assert resolved.enforcement.HasField("resolved_at")
    call.cancel()

    # Resumed from the CREATED message's cursor: the resolution again, and only it.
    again = tail_enforcements(stubs, rule_ref="demo.r", cursor=created.cursor)
    (msg,) = await take(again, 1)
    assert (msg.change, msg.enforcement.id) == (RESOLVED, enf.id)
    again.cancel()


async def test_announced_start_then_snapshot_misses_nothing(api: ApiServer, stubs: Stubs) -> None:
    """The console's pattern: open the tail, wait for its start, read the snapshot; a change
    made after the start is in the tail, even for an enforcement created before it."""
    await triggers(stubs, "demo.a")
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.r", "demo.a")))
    resp = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("demo.a", {"n": 1})))
    (before,) = resp.enforcements
    call = tail_enforcements(stubs, rule_ref="demo.r", announce_start=True)
    (start,) = await take(call, 1)
    assert start.change == STARTED and not start.HasField("enforcement") and start.cursor
    snapshot = await stubs.enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=before.id))
    assert snapshot.status == common_pb2.ENFORCEMENT_STATUS_CREATED

    async with channel(stubs.target, TOKENS["executor"]) as ch:
        await enforcement_pb2_grpc.EnforcementServiceStub(ch).ResolveEnforcement(
            enforcement_pb2.ResolveEnforcementRequest(
                id=before.id, status=common_pb2.ENFORCEMENT_STATUS_DISABLED, executor_id="test"
            )
        )
    (resolved,) = await take(call, 1)
    assert (resolved.change, resolved.enforcement.id) == (RESOLVED, before.id)
    assert resolved.enforcement.status == common_pb2.ENFORCEMENT_STATUS_DISABLED
    call.cancel()

    # The start cursor resumes at the start: the resolution again, and no second start.
    again = tail_enforcements(stubs, rule_ref="demo.r", cursor=start.cursor)
    (msg,) = await take(again, 1)
    assert (msg.change, msg.enforcement.id) == (RESOLVED, before.id)
    again.cancel()


async def test_tail_events_announces_its_start(api: ApiServer, stubs: Stubs) -> None:
    await triggers(stubs, "demo.a")
    call = tail_events(stubs, trigger_ref="demo.a", announce_start=True)
    (start,) = await take(call, 1)
    assert start.start and not start.HasField("event") and start.cursor
    id_ = await emit(stubs, "demo.a")
    (msg,) = await take(call, 1)
    assert (msg.start, msg.event.id) == (False, id_)
    call.cancel()


async def test_tail_enforcements_status_filter_sends_only_that_change(api: ApiServer, stubs: Stubs) -> None:
    await triggers(stubs, "demo.a")
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.r", "demo.a")))
    call = await opened(api, tail_enforcements(stubs, status=common_pb2.ENFORCEMENT_STATUS_DISABLED))
    ids = []
    for i in range(2):
        resp = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("demo.a", {"n": i})))
        ids.append(resp.enforcements[0].id)
    for id_, status in zip(
        ids, (common_pb2.ENFORCEMENT_STATUS_PROCESSED, common_pb2.ENFORCEMENT_STATUS_DISABLED), strict=True
    ):
        await stubs.enforcements.ResolveEnforcement(
            enforcement_pb2.ResolveEnforcementRequest(id=id_, status=status, executor_id="test")
        )
    (msg,) = await take(call, 1)
    assert (msg.change, msg.enforcement.id) == (RESOLVED, ids[1])
    assert msg.enforcement.status == common_pb2.ENFORCEMENT_STATUS_DISABLED
    call.cancel()


# --- resuming -------------------------------------------------------------------------------------


async def test_resume_after_disconnect_no_gaps_no_duplicates(api: ApiServer, stubs: Stubs) -> None:
    await triggers(stubs, "demo.a")
    call = await opened(api, tail_events(stubs, trigger_ref="demo.a"))
    first = [await emit(stubs, "demo.a", n=i) for i in range(3)]
    got = await take(call, 3)
    assert [m.event.id for m in got] == first
    cursor = got[-1].cursor
    call.cancel()

    # While disconnected: single calls, concurrent calls (coalesced into shared statements
    # and committing in any order) and a batch.
    written = [await emit(stubs, "demo.a", n=10)]
    written += await asyncio.gather(*(emit(stubs, "demo.a", n=20 + i) for i in range(20)))
    batch = await stubs.events.CreateEvents(
        event_pb2.CreateEventsRequest(events=[new_event("demo.a", {"n": 100 + i}) for i in range(50)])
    )
    written += [r.event_id for r in batch.receipts]

    resumed = tail_events(stubs, trigger_ref="demo.a", cursor=cursor)
    got = await take(resumed, len(written))
    ids = [m.event.id for m in got]
    assert sorted(ids) == sorted(written) and len(set(ids)) == len(ids)
    await quiet_until(stubs, resumed, "demo.a")
    resumed.cancel()


async def test_resume_across_an_api_restart(api_config: ApiConfig, api: ApiServer, stubs: Stubs) -> None:
    await triggers(stubs, "demo.a")
    call = await opened(api, tail_events(stubs))
    ids = [await emit(stubs, "demo.a", n=i) for i in range(2)]
    got = await take(call, 2)
    assert [m.event.id for m in got] == ids
    call.cancel()
    await api.stop()

    restarted = ApiServer(api_config)
    await restarted.start()
    try:
        async with channel(f"127.0.0.1:{restarted.port}") as ch:
            events = event_pb2_grpc.EventServiceStub(ch)
            later = []
            for i in range(4):
                resp = await events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("demo.a", {"n": 10 + i})))
                later.append(resp.event.id)
            resumed = events.TailEvents(event_pb2.TailEventsRequest(cursor=got[-1].cursor))
            assert [m.event.id for m in await take(resumed, 4)] == later
            sentinel = await events.CreateEvent(event_pb2.CreateEventRequest(event=new_event("demo.a", {"end": 1})))
            (msg,) = await take(resumed, 1)
            assert msg.event.id == sentinel.event.id
            resumed.cancel()
    finally:
        await restarted.stop()


# --- out-of-order commits -------------------------------------------------------------------------

_INSERT = "INSERT INTO event (trigger_ref, payload) VALUES ($1, $2::jsonb) RETURNING id"


async def warm_chunk(conn: asyncpg.Connection) -> None:
    """An event before the tail starts, so that today's chunk exists: on TimescaleDB the first
    insert into a new chunk holds the chunk's creation lock until it commits, and a second
    writer would wait for the held transaction instead of committing before it."""
    await conn.fetchval(_INSERT, "demo.a", '{"warm": true}')


async def test_out_of_order_commit_is_delivered_once(
    api: ApiServer, stubs: Stubs, db_url: str, conn: asyncpg.Connection
) -> None:
    await triggers(stubs, "demo.a")
    await warm_chunk(conn)
    call = await opened(api, tail_events(stubs, trigger_ref="demo.a"))
    late = await asyncpg.connect(db_url)
    try:
        held = late.transaction()
        await held.start()
        low = await late.fetchval(_INSERT, "demo.a", '{"late": true}')
        high = await conn.fetchval(_INSERT, "demo.a", '{"late": false}')
        assert low < high
        (msg,) = await take(call, 1)
        assert msg.event.id == high
        cursor = msg.cursor
        call.cancel()
        # Committed after a later id was delivered and the stream closed: the cursor still
        # knows that `low` was not delivered and `high` was.
        await held.commit()
    finally:
        await late.close()
    resumed = tail_events(stubs, trigger_ref="demo.a", cursor=cursor)
    (msg,) = await take(resumed, 1)
    assert msg.event.id == low
    await quiet_until(stubs, resumed, "demo.a")
    resumed.cancel()


async def test_out_of_order_commit_on_an_open_stream(
    api: ApiServer, stubs: Stubs, db_url: str, conn: asyncpg.Connection
) -> None:
    await triggers(stubs, "demo.a")
    await warm_chunk(conn)
    call = await opened(api, tail_events(stubs))
    late = await asyncpg.connect(db_url)
    try:
        async with late.transaction():
            low = await late.fetchval(_INSERT, "demo.a", "{}")
            high = await conn.fetchval(_INSERT, "demo.a", "{}")
            (msg,) = await take(call, 1)
            assert msg.event.id == high
    finally:
        await late.close()
    (msg,) = await take(call, 1)
    assert msg.event.id == low
    await quiet_until(stubs, call, "demo.a")
    call.cancel()


# --- slow consumers -------------------------------------------------------------------------------


async def test_slow_consumer_is_read_a_bounded_page_ahead(api: ApiServer, stubs: Stubs) -> None:
    assert api.store is not None
    await triggers(stubs, "demo.a")
    big = "x" * 16_000
    n = 200  # fewer than a track remembers (MAX_SEEN): all of them are delivered live
    # A client that does not grow its receive window (no BDP probing): HTTP/2's 64 KiB per
    # stream is all it takes in before the application reads.
    slow = open_channel(stubs.target, ClientSecurity(token=OPERATOR), [("grpc.http2.bdp_probe", 0)])
    call = await opened(api, event_pb2_grpc.EventServiceStub(slow).TailEvents(event_pb2.TailEventsRequest()))
    for start in range(0, n, 50):
        await stubs.events.CreateEvents(
            event_pb2.CreateEventsRequest(
                events=[new_event("demo.a", {"n": i, "pad": big}) for i in range(start, start + 50)]
            )
        )
    received = await take(call, 3)
    store = api.store

    def not_far_ahead() -> None:
        ahead = store.tails.rows_read - len(received)
        # A page in the generator, and what HTTP/2 flow control lets sit in the transport
        # (a 64 KiB window: a few 16 KB messages).
        assert ahead <= 2 * PAGE, f"the tail read {ahead} rows ahead of a client that took {len(received)}"

    # The client takes nothing for a while: an api that read on regardless would do it then.
    await throughout(not_far_ahead, window_s=1.5)
    received += await take(call, n - 3)
    assert [m.event.payload["n"] for m in received] == list(range(n))
    assert api.store.tails.rows_read == n
    call.cancel()
    await slow.close()


# --- refusals -------------------------------------------------------------------------------------


async def test_bad_cursor_is_invalid_argument(api: ApiServer, stubs: Stubs) -> None:
    await triggers(stubs, "demo.a")
    call = await opened(api, tail_events(stubs, trigger_ref="demo.a"))
    await emit(stubs, "demo.a")
    (msg,) = await take(call, 1)
    call.cancel()
    body, _, tag = msg.cursor.partition(".")
    flipped = body[:8] + ("B" if body[8] != "B" else "C") + body[9:]
    altered_tag = msg.cursor[:-2] + ("AA" if msg.cursor[-2:] != "AA" else "BB")
    for bad in ("nope", f"{flipped}.{tag}", altered_tag, "A" + msg.cursor, "x" * 20_000):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await take(tail_events(stubs, trigger_ref="demo.a", cursor=bad), 1)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cursor" in field_violations(info.value)
    # Other filters, or the other tail.
    for call in (
        tail_events(stubs, trigger_ref="demo.b", cursor=msg.cursor),
        tail_enforcements(stubs, cursor=msg.cursor),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await take(call, 1)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cursor" in field_violations(info.value)


async def test_expired_cursor_is_failed_precondition(api: ApiServer, stubs: Stubs) -> None:
    from services.api.servicers.tails import MAX_CURSOR_AGE, Cursors, Track, micros

    assert api.store is not None
    now = await api.store.tails.now()
    old = Track(micros(now - MAX_CURSOR_AGE) - 1_000_000, 0)
    filters = sorted({"trigger_ref": "", "source_ref": "", "rule_ref": ""}.items())
    cursor = Cursors(await api.store.tails.signer(), 1, 1, filters).encode([old])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await take(tail_events(stubs, cursor=cursor), 1)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(info.value) == "CURSOR_EXPIRED"


async def test_sensor_may_not_tail(api: ApiServer, stubs: Stubs) -> None:
    async with channel(stubs.target, TOKENS["sensor"]) as ch:
        for call in (
            event_pb2_grpc.EventServiceStub(ch).TailEvents(event_pb2.TailEventsRequest()),
            enforcement_pb2_grpc.EnforcementServiceStub(ch).TailEnforcements(enforcement_pb2.TailEnforcementsRequest()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await take(call, 1)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_viewer_may_tail(api: ApiServer, stubs: Stubs) -> None:
    await triggers(stubs, "demo.a")
    async with channel(stubs.target, TOKENS["viewer"]) as ch:
        call = await opened(api, event_pb2_grpc.EventServiceStub(ch).TailEvents(event_pb2.TailEventsRequest()))
        id_ = await emit(stubs, "demo.a")
        (msg,) = await take(call, 1)
        assert msg.event.id == id_
        call.cancel()


def test_a_full_track_waits_for_the_window_and_then_delivers_each_row_once() -> None:
    """The throttle of a fast stream, without waiting WINDOW: rows are (key us, id)."""
    from services.api.servicers.tails import MAX_SEEN, WINDOW_US, Track

    track = Track(0, 0)
    now = 10 * WINDOW_US
    rows = [(now - 100 + i, i + 1) for i in range(MAX_SEEN + 10)]  # all unstable at `now`
    delivered: list[tuple[int, int]] = []
    for key, id_ in rows:
        if not track.admit(key, id_, now - WINDOW_US):
            break
        delivered.append((key, id_))
    assert len(delivered) == MAX_SEEN and len(track.seen) == MAX_SEEN
    # Later, everything is stable: the rest come in order, the delivered ones are skipped by
    # id in the read (track.skip()) and fall under the position as it passes them.
    later = now + 2 * WINDOW_US
    skip = set(track.skip())
    for key, id_ in rows:
        if id_ in skip:
            continue
        assert track.admit(key, id_, later - WINDOW_US)
        delivered.append((key, id_))
    track.settle(later - WINDOW_US)
    assert sorted(delivered) == rows and track.seen == []
