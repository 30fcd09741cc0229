"""Payload search and counts over a real channel to a real api on a real PostgreSQL:
ListEvents' ``payload_contains`` (jsonb containment), its bounds, its refusal on secret fields,
its own statement timeout, and ``count_matching`` on ListEvents and ListEnforcements."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from services.api.auth import token_hash
from services.api.store import Store, create_pool
from services.api.store._paging import Count
from shared import limits
from shared.gen.automation.v1 import common_pb2, enforcement_pb2, event_pb2, event_pb2_grpc, rule_pb2
from tests.conftest import Stubs
from tests.helpers import channel, eventually, field_violations, new_event, rpc_error, rule, struct

PUSH = "demo.push"
OTHER = "demo.other"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


async def emit(stubs: Stubs, trigger_ref: str, *payloads: dict[str, Any]) -> list[int]:
    answer = await stubs.events.CreateEvents(
        event_pb2.CreateEventsRequest(events=[new_event(trigger_ref, p) for p in payloads])
    )
    return [r.event_id for r in answer.receipts]


async def search(stubs: Stubs, contains: dict[str, Any], **kw: Any) -> event_pb2.ListEventsResponse:
    answer: event_pb2.ListEventsResponse = await stubs.events.ListEvents(
        event_pb2.ListEventsRequest(payload_contains=struct(contains), **kw)
    )
    return answer


def ids(answer: event_pb2.ListEventsResponse) -> list[int]:
    return [e.id for e in answer.events]


@pytest.fixture
async def repos(stubs: Stubs) -> dict[str, list[int]]:
    """Events of two triggers naming repositories, with arrays and numbers, newest last."""
    for ref in (PUSH, OTHER):
        await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=ref)))
    out = {
        "x": await emit(
            stubs,
            PUSH,
            {"repo": {"name": "x", "stars": 3}, "labels": ["bug", "ui"], "by": "ann"},
            {"repo": {"name": "x", "stars": 4}, "labels": ["ui"], "by": "bob"},
        ),
        "y": await emit(stubs, PUSH, {"repo": {"name": "y", "stars": 3}, "labels": ["bug"], "by": "ann"}),
        "other": await emit(stubs, OTHER, {"repo": {"name": "x"}, "by": "cy"}),
    }
    return out


async def test_payload_contains_finds_the_events_whose_payload_contains_the_object(
    stubs: Stubs, repos: dict[str, list[int]]
) -> None:
    x1, x2 = repos["x"]
    (y,) = repos["y"]
    (other,) = repos["other"]
    assert ids(await search(stubs, {"repo": {"name": "x"}})) == [other, x2, x1]
    assert ids(await search(stubs, {"repo": {"name": "x"}}, trigger_ref=PUSH)) == [x2, x1]
    # Nested values together, numbers whole or not, arrays by their items in any order.
    assert ids(await search(stubs, {"repo": {"name": "x", "stars": 3}})) == [x1]
    assert ids(await search(stubs, {"repo": {"stars": 3.0}})) == [y, x1]
    assert ids(await search(stubs, {"labels": ["ui"]})) == [x2, x1]
    assert ids(await search(stubs, {"labels": ["ui", "bug"]})) == [x1]
    assert ids(await search(stubs, {"by": "ann", "labels": ["bug"]})) == [y, x1]
    # Non-matches: another value, a scalar where an object is, a missing key, a partial string.
    for miss in ({"repo": {"name": "z"}}, {"repo": "x"}, {"nope": 1}, {"repo": {"name": "X"}}, {"by": "an"}):
        assert ids(await search(stubs, miss)) == [], miss
    # An empty object filters nothing.
    assert len(ids(await search(stubs, {}))) == 4


async def test_payload_search_pages_and_combines_with_the_time_range(stubs: Stubs, repos: dict[str, list[int]]) -> None:
    x1, x2 = repos["x"]
    (other,) = repos["other"]
    first = await search(stubs, {"repo": {"name": "x"}}, page_size=2)
    assert ids(first) == [other, x2] and first.next_page_token
    second = await search(stubs, {"repo": {"name": "x"}}, page_size=2, page_token=first.next_page_token)
    assert ids(second) == [x1] and not second.next_page_token
    # The token is bound to the filter: another filter's page is refused, naming the token.
    error = await rpc_error(
        search(stubs, {"repo": {"name": "y"}}, page_size=2, page_token=first.next_page_token), INVALID
    )
    assert "page_token" in field_violations(error)
    # The same filter with its keys in another order is the same list.
    again = await search(stubs, {"repo": {"stars": 4, "name": "x"}}, page_size=1)
    assert ids(again) == [x2]
    future = common_pb2.TimeRange()
    future.start.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    assert ids(await search(stubs, {"repo": {"name": "x"}}, created=future)) == []
    past = common_pb2.TimeRange()
    past.end.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    assert ids(await search(stubs, {"repo": {"name": "x"}}, created=past)) == [other, x2, x1]


async def test_without_compressed_events_a_search_covers_every_day_and_says_no_range(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    """Nothing is compressed here (plain PostgreSQL, the Apache edition, or a store younger
    than a week): a search without a range reaches an event 60 days old, and the answer sets no
    searched_from (tests/integration/test_timescale.py has the compressed store's side)."""
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=PUSH)))
    old = await conn.fetchval(
        "INSERT INTO event (trigger, trigger_ref, payload, created) "
        'SELECT id, ref, \'{"repo": {"name": "x"}}\', now() - interval \'60 days\' FROM trigger WHERE ref = $1 '
        "RETURNING id",
        PUSH,
    )
    (new,) = await emit(stubs, PUSH, {"repo": {"name": "x"}})
    answer = await search(stubs, {"repo": {"name": "x"}}, count_matching=True)
    assert ids(answer) == [new, old]
    assert answer.matching_count == 2
    assert not answer.HasField("searched_from")


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"v": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("contains", "why"),
    [
        (_deep(limits.MAX_SEARCH_DEPTH + 1), "deeper"),
        ({f"k{i}": i for i in range(limits.MAX_SEARCH_VALUES + 1)}, f"at most {limits.MAX_SEARCH_VALUES}"),
        ({"k": "x" * (limits.MAX_SEARCH_BYTES + 1)}, "bytes"),
        ({"k": "nul\x00"}, "NUL"),
        ({"k": float("nan")}, "finite"),
    ],
    ids=["too-deep", "too-many-values", "too-large", "nul", "nan"],
)
async def test_a_filter_past_its_bounds_is_refused_naming_the_field(
    stubs: Stubs, repos: dict[str, list[int]], contains: dict[str, Any], why: str
) -> None:
    error = await rpc_error(search(stubs, contains), INVALID)
    violations = field_violations(error)
    assert any(f.startswith("payload_contains") for f in violations), violations
    assert why in " ".join(violations.values()), violations


async def test_a_filter_at_its_bounds_is_answered(stubs: Stubs, repos: dict[str, list[int]]) -> None:
    assert ids(await search(stubs, _deep(limits.MAX_SEARCH_DEPTH))) == []
    assert ids(await search(stubs, {f"k{i}": i for i in range(limits.MAX_SEARCH_VALUES)})) == []


SECRET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "token": {"type": "string", "x-secret": True},
        "creds": {"type": "object", "properties": {"password": {"type": "string", "x-secret": True}}},
        "keys": {"type": "array", "items": {"type": "object", "properties": {"key": {"x-secret": True}}}},
    },
}


async def test_searching_a_secret_field_needs_the_reveal_role(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await stubs.rules.CreateTrigger(
        rule_pb2.CreateTriggerRequest(
            trigger=rule_pb2.Trigger(
                ref="demo.secret",
                out_schema=struct(SECRET_SCHEMA),
                schema_mode=rule_pb2.SCHEMA_MODE_ENFORCE,
            )
        )
    )
    (stored,) = await emit(
        stubs,
        "demo.secret",
        {"token": "hunter2", "creds": {"password": "pw", "login": "ann"}, "keys": [{"key": "k1", "id": 1}]},
    )
    # Anyone may search what is not secret, beside a secret (keys[*].id beside keys[*].key).
    assert ids(await search(stubs, {"creds": {"login": "ann"}})) == [stored]
    assert ids(await search(stubs, {"keys": [{"id": 1}]})) == [stored]
    # A test at a secret path, below one, or above one (an object holding it) is refused to an
    # operator without reveal, whether the secret value matches or not, and names the path.
    for probe, path in (
        ({"token": "hunter2"}, "token"),
        ({"token": "guess"}, "token"),
        ({"creds": {"password": "pw"}}, "creds.password"),
        ({"creds": {}}, "creds"),
        ({"keys": [{"key": "k1"}]}, "keys[*].key"),
    ):
        error = await rpc_error(search(stubs, probe), DENIED)
        assert "payload_contains" in (error.details() or "") and path in (error.details() or ""), probe
        assert "reveal" in (error.details() or "")
    # Narrowed to one trigger, only that trigger's marks count: its events are all it reads.
    await rpc_error(search(stubs, {"token": "hunter2"}, trigger_ref="demo.secret"), DENIED)
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=PUSH)))
    assert ids(await search(stubs, {"token": "hunter2"}, trigger_ref=PUSH)) == []

    token = "atk_test-search-revealer-0123456789abcdef"
    await conn.execute(
        "INSERT INTO api_token (name, roles, token_hash) VALUES ('search-revealer', ARRAY['viewer', 'reveal'], $1)",
        token_hash(token),
    )
    async with channel(stubs.target, token) as ch:
        events = event_pb2_grpc.EventServiceStub(ch)

        async def found() -> list[int] | None:
            try:
                answer = await events.ListEvents(
                    event_pb2.ListEventsRequest(payload_contains=struct({"token": "hunter2"}))
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                return None  # the api has not loaded the new token yet
            return [e.id for e in answer.events]

        assert await eventually(found, what="the revealer's search") == [stored]


async def test_a_search_past_its_timeout_is_stopped_and_names_the_field(
    stubs: Stubs, repos: dict[str, list[int]], db_url: str
) -> None:
    # Another session holds the table: the search waits on its lock until its own statement
    # timeout ends it (statement_timeout counts lock waits), long before the pool's.
    holder = await asyncpg.connect(db_url)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE event IN ACCESS EXCLUSIVE MODE")
            error = await rpc_error(search(stubs, {"repo": {"name": "x"}}), INVALID)
            assert "payload_contains" in field_violations(error)
            assert f"{limits.SEARCH_TIMEOUT_S:g} s" in (error.details() or "")
            counted = stubs.enforcements.ListEnforcements(enforcement_pb2.ListEnforcementsRequest(count_matching=True))
            # A count waits on no lock of event; the enforcement list answers meanwhile.
            assert (await counted).matching_count == 0
    finally:
        await holder.close()
    # The connection that was stopped serves the next search.
    assert len(ids(await search(stubs, {"repo": {"name": "x"}}))) == 3


async def test_a_count_past_its_time_is_reported_stopped_not_failed(db_url: str) -> None:
    # A count is a courtesy beside its page: held up (here by a lock, which statement_timeout
    # counts), it stops at COUNT_TIMEOUT_S and says so, and raises nothing.
    store = Store(await create_pool(db_url, 1, 2))
    holder = await asyncpg.connect(db_url)
    try:
        assert await store.events.count() == Count(0)
        async with holder.transaction():
            await holder.execute("LOCK TABLE event IN ACCESS EXCLUSIVE MODE")
            assert await store.events.count(trigger_ref=PUSH) == Count(0, more=False, stopped=True)
            assert await store.events.count(payload_contains='{"a": 1}') == Count(0, stopped=True)
        # The stopped statement's connection serves the next count.
        assert await store.events.count() == Count(0)
    finally:
        await holder.close()
        await store.close()


async def test_counts_say_how_many_match_up_to_their_cap(stubs: Stubs) -> None:
    await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=PUSH)))
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.every", PUSH)))
    for n in range(2):
        await emit(stubs, PUSH, *({"batch": n, "i": i} for i in range(limits.MAX_BATCH)))
    await emit(stubs, PUSH, {"batch": 2, "i": 0}, {"batch": 2, "i": 1})

    async def counted(**kw: Any) -> tuple[int, bool, int]:
        answer = await stubs.events.ListEvents(event_pb2.ListEventsRequest(count_matching=True, page_size=5, **kw))
        assert not answer.matching_count_stopped
        return answer.matching_count, answer.matching_count_more, len(answer.events)

    assert await counted(payload_contains=struct({"batch": 2})) == (2, False, 2)
    assert await counted(payload_contains=struct({"batch": 1})) == (1000, False, 5)
    assert await counted(payload_contains=struct({"batch": 9})) == (0, False, 0)
    assert await counted() == (limits.MAX_COUNT, True, 5)
    # Without the ask, no count is made (and 0 says nothing).
    plain = await stubs.events.ListEvents(event_pb2.ListEventsRequest(page_size=1))
    assert (plain.matching_count, plain.matching_count_more) == (0, False)

    enforcements = await stubs.enforcements.ListEnforcements(
        enforcement_pb2.ListEnforcementsRequest(count_matching=True, rule_ref="demo.every", page_size=1)
    )
    assert (enforcements.matching_count, enforcements.matching_count_more) == (limits.MAX_COUNT, True)
    newest = (await stubs.events.ListEvents(event_pb2.ListEventsRequest(page_size=1))).events[0].id
    one = await stubs.enforcements.ListEnforcements(
        enforcement_pb2.ListEnforcementsRequest(count_matching=True, event=newest)
    )
    assert (one.matching_count, one.matching_count_more, len(one.enforcements)) == (1, False, 1)


async def test_concurrent_searches_each_get_their_own_answer(stubs: Stubs, repos: dict[str, list[int]]) -> None:
    # Each search runs in its own transaction with SET LOCAL: nothing leaks between them, nor
    # into the plain lists sharing the pool.
    answers = await asyncio.gather(
        *(search(stubs, {"repo": {"name": name}}) for name in ("x", "y", "z") * 4),
        *(stubs.events.ListEvents(event_pb2.ListEventsRequest()) for _ in range(4)),
    )
    assert [len(a.events) for a in answers] == [3, 1, 0] * 4 + [4] * 4
