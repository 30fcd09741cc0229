"""Page tokens through the real api: bound to their list and filters, tamper-evident, valid on
every replica and across restarts; Page.cut tokens continue right after the cut."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from services.api.server import ApiServer
from services.api.store import Store, create_pool
from services.api.store._paging import Scope, Where
from services.api.store._secret import SharedKey
from shared.config import ApiConfig
from shared.gen.automation.v1 import (
    enforcement_pb2,
    event_pb2,
    event_pb2_grpc,
    history_pb2,
    rule_pb2,
    rule_pb2_grpc,
)
from shared.limits import MAX_PAGE_TOKEN
from tests.conftest import Stubs
from tests.helpers import channel as authed_channel
from tests.helpers import field_violations, new_event, rpc_error, rule

HOOK = "core.webhook"
TIMER = "core.timer"
RESTART = "start again without a page_token"


async def setup(stubs: Stubs) -> None:
    for ref in (HOOK, TIMER):
        await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=ref)))


async def events(stubs: Stubs, trigger_ref: str, n: int) -> list[int]:
    """Creates ``n`` events of ``trigger_ref`` one by one; their ids, newest first (the list order)."""
    ids = []
    for _ in range(n):
        created = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(trigger_ref)))
        ids.append(created.event.id)
    return ids[::-1]


async def refused(call: Awaitable[object]) -> str:
    """The page_token violation of a call that must be INVALID_ARGUMENT on page_token."""
    err = await rpc_error(call, grpc.StatusCode.INVALID_ARGUMENT)
    violations = field_violations(err)
    assert list(violations) == ["page_token"], violations
    assert RESTART in violations["page_token"]
    return violations["page_token"]


def list_events(
    stubs: Stubs, token: str, size: int = 2, trigger_ref: str = "", source_ref: str = "", rule_ref: str = ""
) -> Awaitable[event_pb2.ListEventsResponse]:
    return stubs.events.ListEvents(
        event_pb2.ListEventsRequest(
            page_size=size, page_token=token, trigger_ref=trigger_ref, source_ref=source_ref, rule_ref=rule_ref
        )
    )


async def first_token(stubs: Stubs, trigger_ref: str = "") -> str:
    token = (await list_events(stubs, "", trigger_ref=trigger_ref)).next_page_token
    assert token
    return token


async def test_token_of_list_events_is_refused_by_list_enforcements(stubs: Stubs) -> None:
    await setup(stubs)
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.hook", HOOK)))
    await events(stubs, HOOK, 3)  # three enforcements too: ListEnforcements has pages
    token = await first_token(stubs)
    why = await refused(
        stubs.enforcements.ListEnforcements(enforcement_pb2.ListEnforcementsRequest(page_size=2, page_token=token))
    )
    assert "was not issued by this list with these filters" in why
    assert token not in why
    # ListEnforcements' own token still works.
    own = await stubs.enforcements.ListEnforcements(enforcement_pb2.ListEnforcementsRequest(page_size=2))
    rest = await stubs.enforcements.ListEnforcements(
        enforcement_pb2.ListEnforcementsRequest(page_size=2, page_token=own.next_page_token)
    )
    assert len(rest.enforcements) == 1


async def test_token_of_one_filter_value_is_refused_with_another(stubs: Stubs) -> None:
    await setup(stubs)
    await events(stubs, HOOK, 3)
    await events(stubs, TIMER, 3)
    token = await first_token(stubs, trigger_ref=HOOK)
    why = await refused(list_events(stubs, token, trigger_ref=TIMER))
    assert "was not issued by this list with these filters" in why
    # Dropping the filter, adding another, or using it for another field is refused as well.
    await refused(list_events(stubs, token))
    await refused(list_events(stubs, token, trigger_ref=HOOK, source_ref="s"))
    await refused(list_events(stubs, token, rule_ref=HOOK))
    # With its own filter it pages on.
    assert len((await list_events(stubs, token, trigger_ref=HOOK)).events) == 1


async def test_token_with_any_one_character_changed_is_refused(stubs: Stubs) -> None:
    await setup(stubs)
    await events(stubs, HOOK, 3)
    token = await first_token(stubs)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, ch in enumerate(token):
        changed = alphabet[alphabet.index(ch) ^ 1]  # the lowest bit: base64 ignores it in a final character
        await refused(list_events(stubs, token[:i] + changed + token[i + 1 :]))
    assert len((await list_events(stubs, token)).events) == 1


@pytest.mark.parametrize("length", [MAX_PAGE_TOKEN + 1, 100_000])
async def test_over_long_token_is_refused_and_not_echoed(stubs: Stubs, length: int) -> None:
    token = "A" * length
    err = await rpc_error(list_events(stubs, token), grpc.StatusCode.INVALID_ARGUMENT)
    why = field_violations(err)["page_token"]
    assert str(MAX_PAGE_TOKEN) in why and RESTART in why
    assert "A" * 20 not in (err.details() or "") and "A" * 20 not in why


async def test_valid_tokens_page_through_every_row_once(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await setup(stubs)
    # A batch shares one `created` (ties broken by id); single events of both triggers around it.
    await events(stubs, HOOK, 2)
    await stubs.events.CreateEvents(event_pb2.CreateEventsRequest(events=[new_event(HOOK) for _ in range(4)]))
    await events(stubs, TIMER, 2)
    await events(stubs, HOOK, 3)
    for trigger_ref in ("", HOOK):
        expected = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM event WHERE $1 = '' OR trigger_ref = $1 ORDER BY created DESC, id DESC", trigger_ref
            )
        ]
        seen: list[int] = []
        token = ""
        while True:
            page = await list_events(stubs, token, 2, trigger_ref=trigger_ref)
            assert len(page.events) == 2 or not page.next_page_token
            seen.extend(e.id for e in page.events)
            token = page.next_page_token
            if not token:
                break
        assert seen == expected and len(set(seen)) == len(seen)


@dataclass
class Replica:
    target: str
    events: event_pb2_grpc.EventServiceAsyncStub


@asynccontextmanager
async def running(config: ApiConfig) -> AsyncIterator[Replica]:
    """An api of its own on the test database, with an EventService stub."""
    server = ApiServer(config)
    await server.start()
    try:
        target = f"127.0.0.1:{server.port}"
        async with authed_channel(target) as channel:
            yield Replica(target, event_pb2_grpc.EventServiceStub(channel))
    finally:
        await server.stop()


async def test_token_works_after_a_restart_and_on_every_replica(api_config: ApiConfig) -> None:
    async with running(api_config) as first:
        async with authed_channel(first.target) as channel:
            await rule_pb2_grpc.RuleServiceStub(channel).CreateTrigger(
                rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="any.trigger"))
            )
        await first.events.CreateEvents(
            event_pb2.CreateEventsRequest(events=[new_event("any.trigger") for _ in range(5)])
        )
        page = await first.events.ListEvents(event_pb2.ListEventsRequest(page_size=2))
        everything = await first.events.ListEvents(event_pb2.ListEventsRequest())
    ids = [e.id for e in everything.events]
    assert [e.id for e in page.events] == ids[:2]

    # The first api is gone; a new one on the same database reads the same key.
    async with running(api_config) as second, running(api_config) as third:
        after = await second.events.ListEvents(
            event_pb2.ListEventsRequest(page_size=2, page_token=page.next_page_token)
        )
        assert [e.id for e in after.events] == ids[2:4]
        # A replica running beside it takes the second's token.
        last = await third.events.ListEvents(event_pb2.ListEventsRequest(page_size=2, page_token=after.next_page_token))
        assert [e.id for e in last.events] == ids[4:] and last.next_page_token == ""


async def test_cut_page_token_continues_right_after_the_cut(stubs: Stubs, store: Store) -> None:
    await setup(stubs)
    ids = await events(stubs, HOOK, 7)
    page = await store.events.list(5, "", trigger_ref=HOOK)
    assert [e.id for e in page.items] == ids[:5]
    cut = page.cut(2)
    assert [e.id for e in cut.items] == ids[:2]
    rest = await store.events.list(5, cut.next_token, trigger_ref=HOOK)
    assert [e.id for e in rest.items] == ids[2:7] and rest.next_token == ""
    # The api takes the token as one of its own (same key, same list, same filters).
    over_rpc = await list_events(stubs, cut.next_token, 10, trigger_ref=HOOK)
    assert [e.id for e in over_rpc.events] == ids[2:7]
    await refused(list_events(stubs, cut.next_token, 10, trigger_ref=TIMER))
    # A cut of the last page points into it as well.
    last = (await store.events.list(5, page.next_token, trigger_ref=HOOK)).cut(1)
    assert [e.id for e in (await store.events.list(5, last.next_token, trigger_ref=HOOK)).items] == ids[6:]


async def test_history_tokens_are_bound_to_their_entity_type(stubs: Stubs, conn: asyncpg.Connection) -> None:
    t0 = datetime(2024, 6, 1, tzinfo=UTC)
    for table in ("execution_history", "worker_history"):
        for i in range(3):
            await conn.execute(
                f"INSERT INTO {table} (time, operation, entity_id, changed_fields) VALUES ($1, 'UPDATE', 1, '{{}}')",
                t0 + timedelta(hours=i),
            )
    page = await stubs.history.ListHistory(history_pb2.ListHistoryRequest(entity_type="execution", page_size=2))
    await refused(
        stubs.history.ListHistory(
            history_pb2.ListHistoryRequest(entity_type="worker", page_size=2, page_token=page.next_page_token)
        )
    )
    rest = await stubs.history.ListHistory(
        history_pb2.ListHistoryRequest(entity_type="execution", page_size=2, page_token=page.next_page_token)
    )
    assert [r.entity_id for r in rest.records] == [1]


async def test_replicas_starting_together_create_one_key(db_url: str, conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SELECT count(*) FROM api_secret") == 0
    pools = [await create_pool(db_url, 1, 2) for _ in range(4)]
    try:
        signers = await asyncio.gather(*(SharedKey(p).signer() for p in pools))
    finally:
        for p in pools:
            await p.close()
    # Every replica signs alike: a token of one is a token of all.
    scope = Scope.of("SELECT id FROM event", Where())
    cursor = (datetime(2024, 1, 1, tzinfo=UTC), 1)
    assert len({s.encode(scope, cursor) for s in signers}) == 1
    assert await conn.fetchval("SELECT count(*) FROM api_secret") == 1
    assert await conn.fetchval("SELECT octet_length(value) FROM api_secret WHERE name = 'page_token'") == 32
