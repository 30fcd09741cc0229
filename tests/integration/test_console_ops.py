"""Running the pipeline from the console: the executors view, delivery attempts, bulk retry,
executions and the audit trail. The new RPCs over real gRPC (ListExecutors from the api's own
watch streams, ListAttempts from the outcomes 0018's trigger records, RetryEnforcements and its
one audit record), then the console's pages and forms over real HTTP, as each role."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format

from services.api.server import ApiServer
from shared.gen.automation.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
)
from tests.conftest import Stubs
from tests.helpers import TOKENS, channel, eventually, web_service
from tests.integration.console_support import (
    RULE,
    Sse,
    console,
    exhausted_enforcement,
    get,
    hidden,
    pushed,
    seed,
    submit,
)

PROCESSED = common_pb2.ENFORCEMENT_STATUS_PROCESSED
OUTCOME = enforcement_pb2.AttemptOutcome


@pytest.fixture
async def web(api: ApiServer) -> AsyncIterator[str]:
    target = f"127.0.0.1:{api.port}"
    async with channel(target, token=TOKENS["webhook"]) as ch, web_service(target, ch) as url:
        yield url


@asynccontextmanager
async def watching(
    target: str, executor_id: str = "ex-1", max_in_flight: int = 4
) -> AsyncIterator[tuple[enforcement_pb2_grpc.EnforcementServiceAsyncStub, Any]]:
    """An executor's watch stream (executor token), open once the api lists it (its messages
    are left to the test: the first may be a delivery)."""
    async with channel(target, TOKENS["executor"]) as ch:
        stub = enforcement_pb2_grpc.EnforcementServiceStub(ch)
        call = stub.WatchEnforcements(
            enforcement_pb2.WatchEnforcementsRequest(executor_id=executor_id, max_in_flight=max_in_flight)
        )
        try:
            async with channel(target, TOKENS["viewer"]) as viewing:
                viewer = enforcement_pb2_grpc.EnforcementServiceStub(viewing)

                async def listed() -> bool:
                    answer = await viewer.ListExecutors(enforcement_pb2.ListExecutorsRequest())
                    return any(x.executor_id == executor_id for x in answer.executors)

                await eventually(listed, what=f"the api to list {executor_id}")
            yield stub, call
        finally:
            call.cancel()


async def delivered(call: Any) -> enforcement_pb2.Delivery:
    """The stream's next delivery (heartbeats passed)."""

    async def find() -> enforcement_pb2.Delivery:
        while True:
            message: enforcement_pb2.WatchEnforcementsResponse = await call.read()
            if message.HasField("delivery"):
                return message.delivery

    return await asyncio.wait_for(find(), 15)


async def executors(stubs: Stubs) -> list[enforcement_pb2.ConnectedExecutor]:
    return list((await stubs.enforcements.ListExecutors(enforcement_pb2.ListExecutorsRequest())).executors)


def change_of(record: audit_pb2.AuditRecord) -> dict[str, Any]:
    return json_format.MessageToDict(record.change)


async def audit_records(stubs: Stubs, **filters: Any) -> list[audit_pb2.AuditRecord]:
    stub = audit_pb2_grpc.AuditServiceStub(stubs.channel)
    return list((await stub.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(**filters))).records)


# ---- ListExecutors ---------------------------------------------------------------------------


async def test_list_executors_shows_each_stream_with_its_credit_work_and_last_resolve(stubs: Stubs) -> None:
    await seed(stubs)
    assert await executors(stubs) == []
    async with watching(stubs.target, "ex-1", 4) as (stub, call):
        (idle,) = await executors(stubs)
        assert (idle.executor_id, idle.principal, idle.credit, idle.in_flight, idle.leases_held) == (
            "ex-1",
            "test-executor",
            4,
            0,
            0,
        )
        assert idle.HasField("connected_since") and idle.api_replica
        assert not idle.HasField("last_resolve") and not idle.HasField("last_delivery")

        _, enforcement = await pushed(stubs)
        assert (await delivered(call)).enforcement.id == enforcement
        (busy,) = await executors(stubs)
        assert (busy.in_flight, busy.leases_held) == (1, 1)
        assert busy.HasField("last_delivery") and not busy.HasField("last_resolve")

        await stub.ResolveEnforcements(
            enforcement_pb2.ResolveEnforcementsRequest(
                decisions=[
                    enforcement_pb2.ResolveEnforcementRequest(id=enforcement, status=PROCESSED, executor_id="ex-1")
                ]
            )
        )
        (done,) = await executors(stubs)
        assert done.in_flight == 0 and done.HasField("last_resolve")
    # The stream closed: the executor is gone from the list.
    assert await eventually(lambda: _none(stubs), what="the closed stream to leave the list")


async def _none(stubs: Stubs) -> bool:
    return not await executors(stubs)


async def test_list_executors_answers_while_streams_come_and_go(stubs: Stubs) -> None:
    """Streams closing while ListExecutors reads their leases: each call answers OK (the fuzz
    smoke once got INTERNAL from a stream that left between the listing and the read)."""
    await seed(stubs)
    done = asyncio.Event()
    answered = 0

    async def keep_listing() -> None:
        nonlocal answered
        while not done.is_set():
            await executors(stubs)
            answered += 1

    listers = [asyncio.create_task(keep_listing()) for _ in range(4)]
    try:
        async with channel(stubs.target, TOKENS["executor"]) as ch:
            stub = enforcement_pb2_grpc.EnforcementServiceStub(ch)
            for round_ in range(10):
                calls = [
                    stub.WatchEnforcements(
                        enforcement_pb2.WatchEnforcementsRequest(executor_id=f"churn-{round_}-{i}", max_in_flight=1)
                    )
                    for i in range(12)
                ]

                async def all_listed() -> bool:
                    return len(await executors(stubs)) == 12

                await eventually(all_listed, what="the api to list the 12 streams")
                for call in calls:
                    call.cancel()
                await eventually(lambda: _none(stubs), what="the closed streams to leave the list")
                assert not any(t.done() for t in listers), [t.exception() for t in listers if t.done()]
    finally:
        done.set()
        outcomes = await asyncio.gather(*listers, return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failed, failed[0]
    assert answered > 0


async def test_list_executors_is_for_viewers_and_operators_only(stubs: Stubs) -> None:
    for role in ("viewer", "operator"):
        async with channel(stubs.target, TOKENS[role]) as ch:
            await enforcement_pb2_grpc.EnforcementServiceStub(ch).ListExecutors(enforcement_pb2.ListExecutorsRequest())
    for role in ("sensor", "executor"):
        async with channel(stubs.target, TOKENS[role]) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await enforcement_pb2_grpc.EnforcementServiceStub(ch).ListExecutors(
                    enforcement_pb2.ListExecutorsRequest()
                )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, role


# ---- ListAttempts ----------------------------------------------------------------------------


async def test_attempts_record_releases_expiry_exhaustion_and_retry(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await seed(stubs)
    _, enforcement = await pushed(stubs)
    fresh = await stubs.enforcements.ListAttempts(enforcement_pb2.ListAttemptsRequest(enforcement=enforcement))
    assert fresh.attempts == [] and fresh.HasField("dispatch")

    async with watching(stubs.target, "ex-1") as (stub, call):
        assert (await delivered(call)).attempt == 1
        await stub.ReleaseEnforcement(
            enforcement_pb2.ReleaseEnforcementRequest(id=enforcement, executor_id="ex-1", error="backend down")
        )
        assert (await delivered(call)).attempt == 2  # offered again, at once, to the same stream
    # The stream closed holding it: released with the stream's reason. Then, as if an api died
    # while another executor held it: its lease ran out, and it was exhausted.
    await eventually(lambda: _lease_free(conn, enforcement), what="the closed stream's release")
    await conn.execute(
        "UPDATE enforcement_dispatch SET leased_by = 'gone', lease_token = 'gone/1', attempts = 3, "
        "lease_expires_at = now() - interval '1 second' WHERE enforcement = $1",
        enforcement,
    )
    await conn.execute(
        "UPDATE enforcement_dispatch SET exhausted_at = now(), leased_by = NULL, lease_token = NULL, "
        "lease_expires_at = NULL, last_error = 'lease of gone expired' WHERE enforcement = $1",
        enforcement,
    )
    answer = await stubs.enforcements.ListAttempts(enforcement_pb2.ListAttemptsRequest(enforcement=enforcement))
    seen = [(a.attempt, a.outcome, a.executor_id, a.error) for a in answer.attempts]
    assert seen[0] == (1, OUTCOME.Value("ATTEMPT_OUTCOME_RELEASED"), "ex-1", "backend down")
    assert seen[1][:3] == (2, OUTCOME.Value("ATTEMPT_OUTCOME_RELEASED"), "ex-1")
    assert "stream closed" in seen[1][3]
    assert seen[2:] == [
        (3, OUTCOME.Value("ATTEMPT_OUTCOME_LEASE_EXPIRED"), "gone", "lease of gone expired"),
        (3, OUTCOME.Value("ATTEMPT_OUTCOME_EXHAUSTED"), "", "lease of gone expired"),
    ]
    assert answer.attempts[0].principal == "test-executor"
    assert answer.dispatch.HasField("exhausted_at") and answer.dispatch.last_error == "lease of gone expired"

    await stubs.enforcements.RetryEnforcement(enforcement_pb2.RetryEnforcementRequest(id=enforcement))
    after = await stubs.enforcements.ListAttempts(enforcement_pb2.ListAttemptsRequest(enforcement=enforcement))
    assert after.attempts[-1].outcome == OUTCOME.Value("ATTEMPT_OUTCOME_RETRIED")
    assert len(after.attempts) == 5, "a retry keeps the failed attempts before it"
    assert after.dispatch.attempts == 0 and not after.dispatch.HasField("exhausted_at")


async def _lease_free(conn: asyncpg.Connection, enforcement: int) -> bool:
    return bool(
        await conn.fetchval("SELECT leased_by IS NULL FROM enforcement_dispatch WHERE enforcement = $1", enforcement)
    )


async def test_attempts_of_a_resolved_or_unknown_enforcement(stubs: Stubs) -> None:
    await seed(stubs)
    _, enforcement = await pushed(stubs)
    async with channel(stubs.target, TOKENS["executor"]) as ch:
        await enforcement_pb2_grpc.EnforcementServiceStub(ch).ResolveEnforcement(
            enforcement_pb2.ResolveEnforcementRequest(id=enforcement, status=PROCESSED)
        )
    resolved = await stubs.enforcements.ListAttempts(enforcement_pb2.ListAttemptsRequest(enforcement=enforcement))
    assert not resolved.HasField("dispatch") and resolved.attempts == []
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stubs.enforcements.ListAttempts(enforcement_pb2.ListAttemptsRequest(enforcement=987654321))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stubs.enforcements.ListAttempts(enforcement_pb2.ListAttemptsRequest(enforcement=0))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- RetryEnforcements -----------------------------------------------------------------------


async def test_bulk_retry_by_filter_counts_first_then_retries_with_one_audit_record(
    stubs: Stubs, conn: asyncpg.Connection
) -> None:
    await seed(stubs)
    ids = [await exhausted_enforcement(stubs, conn) for _ in range(3)]
    _, pending = await pushed(stubs)  # not exhausted: never retried

    dry = await stubs.enforcements.RetryEnforcements(
        enforcement_pb2.RetryEnforcementsRequest(all_exhausted=True, rule_ref=RULE, validate_only=True)
    )
    assert (list(dry.ids), dry.matched) == (ids, 3)
    state = await stubs.enforcements.GetDispatchState(enforcement_pb2.GetDispatchStateRequest())
    assert state.exhausted_count == 3, "validate_only changed something"
    assert await audit_records(stubs, rpc="automation.v1.EnforcementService/RetryEnforcements") == []

    none = await stubs.enforcements.RetryEnforcements(
        enforcement_pb2.RetryEnforcementsRequest(all_exhausted=True, rule_ref="demo.nothing")
    )
    assert (list(none.ids), none.matched) == ([], 0)

    done = await stubs.enforcements.RetryEnforcements(
        enforcement_pb2.RetryEnforcementsRequest(all_exhausted=True, rule_ref=RULE)
    )
    assert (list(done.ids), done.matched) == (ids, 3)
    state = await stubs.enforcements.GetDispatchState(enforcement_pb2.GetDispatchStateRequest())
    assert state.exhausted_count == 0 and state.pending == 4
    (record,) = await audit_records(stubs, rpc="automation.v1.EnforcementService/RetryEnforcements")
    assert record.entity_type == "enforcement" and not record.HasField("entity_id")
    assert [int(v) for v in change_of(record)["enforcements"]] == ids
    assert change_of(record)["count"] == 3 and change_of(record)["filter"]["rule_ref"] == RULE
    assert record.principal == "test-operator"
    assert pending not in ids


async def test_bulk_retry_of_named_ids_skips_those_not_exhausted(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await seed(stubs)
    first, second = [await exhausted_enforcement(stubs, conn) for _ in range(2)]
    _, pending = await pushed(stubs)
    done = await stubs.enforcements.RetryEnforcements(
        enforcement_pb2.RetryEnforcementsRequest(ids=[second, pending, first])
    )
    assert (list(done.ids), done.matched) == ([first, second], 2)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "ids"),
        ({"ids": [1, 1]}, "ids"),
        ({"ids": [0]}, "ids[0]"),
        ({"ids": [1], "all_exhausted": True}, "ids"),
        ({"ids": [1], "rule_ref": "demo.x"}, "rule_ref"),
        ({"all_exhausted": True, "rule_ref": "not a ref!"}, "rule_ref"),
    ],
)
async def test_bulk_retry_refuses_malformed_requests(stubs: Stubs, fields: dict[str, Any], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.enforcements.RetryEnforcements(enforcement_pb2.RetryEnforcementsRequest(**fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (refused.value.details() or "") or field in str(refused.value.trailing_metadata())


async def test_bulk_retry_is_for_operators_only(stubs: Stubs, conn: asyncpg.Connection) -> None:
    await seed(stubs)
    id_ = await exhausted_enforcement(stubs, conn)
    async with channel(stubs.target, TOKENS["viewer"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await enforcement_pb2_grpc.EnforcementServiceStub(ch).RetryEnforcements(
                enforcement_pb2.RetryEnforcementsRequest(ids=[id_], validate_only=True)
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---- the console: Dispatch ---------------------------------------------------------------------


async def test_dispatch_tells_no_executor_from_an_idle_one(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    async with console(web, "viewer") as viewer:
        page = await get(viewer, "/dispatch")
        assert 'id="no-executor"' in page and "No executor is connected" in page
        assert 'data-live="/live/dispatch"' in page
        async with watching(stubs.target, "ex-idle", 4):
            page = await get(viewer, "/dispatch")
            assert 'id="no-executor"' not in page
            row = re.search(r'<tr data-executor="ex-idle">.*?</tr>', page, re.S)
            assert row, page
            assert "data-idle" in row.group(0) and "0 / 4" in row.group(0) and "test-executor" in row.group(0)


async def test_dispatch_live_stream_sends_its_parts_then_what_changes(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    async with console(web, "viewer") as viewer, viewer.stream("GET", "/live/dispatch") as response:
        stream = Sse(response)
        first = await stream.next("parts")
        assert set(first.data["parts"]) == {"tiles", "executors", "leases", "exhausted"}
        assert "No executor is connected" in first.data["parts"]["executors"]
        async with watching(stubs.target, "ex-live"):
            changed = await stream.next("parts")
            assert "executors" in changed.data["parts"] and "ex-live" in changed.data["parts"]["executors"]
            assert "tiles" not in changed.data["parts"], "an unchanged part was sent again"


# ---- the console: attempts and retry on an enforcement's page ---------------------------------


async def test_enforcement_page_shows_attempts_last_error_and_retry_for_operators(
    stubs: Stubs, web: str, conn: asyncpg.Connection
) -> None:
    await seed(stubs)
    id_ = await exhausted_enforcement(stubs, conn)
    async with console(web, "viewer") as viewer:
        page = await get(viewer, f"/enforcements/{id_}")
        assert 'id="last-error">backend down<' in page
        assert ">exhausted</span>" in page and 'id="attempts-table"' in page
        assert 'id="retry"' not in page
    async with console(web, "operator") as operator:
        page = await get(operator, f"/enforcements/{id_}")
        assert 'id="retry"' in page
        answer = await submit(
            operator, f"/enforcements/{id_}/retry", {"csrf": hidden(page, "csrf"), "from": "enforcement"}
        )
        assert answer.status_code == 303 and answer.headers["location"] == f"/enforcements/{id_}?notice=retried"
        page = await get(operator, answer.headers["location"])
        assert "Offered again to executors." in page and ">retried</span>" in page and 'id="retry"' not in page


async def test_a_disabled_enforcement_says_why_it_has_no_execution(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    _, id_ = await pushed(stubs)
    async with channel(stubs.target, TOKENS["executor"]) as ch:
        await enforcement_pb2_grpc.EnforcementServiceStub(ch).ResolveEnforcement(
            enforcement_pb2.ResolveEnforcementRequest(id=id_, status=common_pb2.ENFORCEMENT_STATUS_DISABLED)
        )
    async with console(web, "viewer") as viewer:
        page = await get(viewer, f"/enforcements/{id_}")
    assert 'data-status="disabled"' in page
    assert '<span data-when="disabled">No execution: this enforcement was resolved as disabled' in page


# ---- the console: bulk retry -------------------------------------------------------------------


async def test_bulk_retry_of_selected_rows_confirms_the_count_first(
    stubs: Stubs, web: str, conn: asyncpg.Connection
) -> None:
    await seed(stubs)
    ids = [await exhausted_enforcement(stubs, conn) for _ in range(3)]
    async with console(web, "operator") as operator:
        page = await get(operator, "/dispatch")
        csrf = hidden(page, "csrf")
        assert 'form="bulk-retry"' in page and 'id="retry-selected"' in page
        fields = f"csrf={csrf}&id={ids[0]}&id={ids[2]}"
        review = await operator.post(
            "/dispatch/retry", content=fields, headers={"content-type": "application/x-www-form-urlencoded"}
        )
        assert review.status_code == 200 and "2 of the 2 selected are exhausted" in review.text
        assert await _exhausted(stubs) == set(ids), "the review changed something"
        done = await operator.post(
            "/dispatch/retry",
            content=fields + "&confirm=1",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert done.status_code == 303 and done.headers["location"] == "/dispatch?notice=bulk-retried&n=2"
        assert "Offered 2 exhausted enforcements to executors again." in await get(operator, done.headers["location"])
    assert await _exhausted(stubs) == {ids[1]}
    (record,) = await audit_records(stubs, rpc="automation.v1.EnforcementService/RetryEnforcements")
    assert [int(v) for v in change_of(record)["enforcements"]] == [ids[0], ids[2]]


async def test_bulk_retry_of_all_matching_a_filter(stubs: Stubs, web: str, conn: asyncpg.Connection) -> None:
    await seed(stubs)
    ids = [await exhausted_enforcement(stubs, conn) for _ in range(2)]
    async with console(web, "operator") as operator:
        review = await get(operator, f"/dispatch/retry?rule_ref={RULE}")
        assert re.search(r"<b>2</b> exhausted enforcements match · rule <code>demo.on_push</code>", review)
        answer = await submit(
            operator,
            "/dispatch/retry",
            {"csrf": hidden(review, "csrf"), "confirm": "1", "all": "1", "rule_ref": RULE, "trigger_ref": ""},
        )
        assert answer.headers["location"] == "/dispatch?notice=bulk-retried&n=2"
        assert "No exhausted enforcement matches" in await get(operator, f"/dispatch/retry?rule_ref={RULE}")
    assert await _exhausted(stubs) == set()
    (record,) = await audit_records(stubs, rpc="automation.v1.EnforcementService/RetryEnforcements")
    assert sorted(int(v) for v in change_of(record)["enforcements"]) == sorted(ids)


async def test_bulk_retry_refuses_viewers_and_forged_forms(stubs: Stubs, web: str, conn: asyncpg.Connection) -> None:
    await seed(stubs)
    id_ = await exhausted_enforcement(stubs, conn)
    async with console(web, "viewer") as viewer:
        page = await get(viewer, "/dispatch")
        assert 'id="retry-selected"' not in page and 'form="bulk-retry"' not in page and "retry-matching" not in page
        answer = await submit(viewer, "/dispatch/retry", {"csrf": hidden(page, "csrf"), "id": str(id_), "confirm": "1"})
        assert answer.status_code == 403
        assert (await viewer.get(f"/dispatch/retry?rule_ref={RULE}")).status_code == 403
    async with console(web, "operator") as operator:
        forged = await submit(operator, "/dispatch/retry", {"csrf": "forged", "id": str(id_), "confirm": "1"})
        assert forged.status_code == 403
    assert await _exhausted(stubs) == {id_}


async def _exhausted(stubs: Stubs) -> set[int]:
    state = await stubs.enforcements.GetDispatchState(enforcement_pb2.GetDispatchStateRequest())
    return {x.id for x in state.exhausted}


# ---- the console: executions, audit, time ranges ---------------------------------------------


async def test_executions_list_and_detail_link_back_to_the_chain(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    event, enforcement = await pushed(stubs)
    async with channel(stubs.target, TOKENS["executor"]) as ch:
        resolved = await enforcement_pb2_grpc.EnforcementServiceStub(ch).ResolveEnforcement(
            enforcement_pb2.ResolveEnforcementRequest(id=enforcement, status=PROCESSED)
        )
    execution = resolved.execution.id
    async with console(web, "viewer") as viewer:
        listed = await get(viewer, f"/executions?enforcement={enforcement}")
        assert f'<a href="/executions/{execution}">{execution}</a>' in listed
        assert 'data-count="1">1 execution matches' in listed
        detail = await get(viewer, f"/executions/{execution}")
        for link in (f"/enforcements/{enforcement}", f"/rules/{RULE}", "/triggers/demo.hook", f"/events/{event}"):
            assert f'href="{link}"' in detail, link
        assert '"repo": "payments"' in html.unescape(detail) and 'id="history"' in detail
        page = await get(viewer, f"/enforcements/{enforcement}")
        assert f'<a href="/executions/{execution}">{execution}</a>' in page
        assert (await viewer.get("/executions?status=bogus")).status_code == 400


async def test_audit_page_filters_and_shows_each_change(stubs: Stubs, web: str, conn: asyncpg.Connection) -> None:
    await seed(stubs)
    id_ = await exhausted_enforcement(stubs, conn)
    await stubs.enforcements.RetryEnforcement(enforcement_pb2.RetryEnforcementRequest(id=id_))
    async with console(web, "operator") as operator:
        page = await get(operator, "/audit")
        assert 'href="/audit"' in page  # the navigation has it for operators
        assert "RuleService/CreateRule" in page and 'rule <a href="/rules/demo.on_push">' in page
        only = await get(operator, "/audit?rpc=EnforcementService/RetryEnforcement&principal=test-operator")
        assert len(re.findall(r"<tr data-key=", only)) == 1
        assert 'data-count="1">1 record matches' in only
        assert f'enforcement <a href="/enforcements/{id_}">' in only and "backend down" in only
        assert len(re.findall(r"<tr data-key=", await get(operator, "/audit?entity_type=trigger"))) == 2
        assert (
            len(re.findall(r"<tr data-key=", await get(operator, "/audit?from=2000-01-01T00:00&to=2000-01-02T00:00")))
            == 0
        )
        assert "must be before" in await get(operator, "/audit?from=2001-01-01T00:00&to=2000-01-01T00:00", 400)
    async with console(web, "viewer") as viewer:
        assert 'href="/audit"' not in await get(viewer, "/events")
        assert (await viewer.get("/audit")).status_code == 403


async def test_time_range_filters_narrow_lists_and_turn_live_off(stubs: Stubs, web: str) -> None:
    await seed(stubs)
    await pushed(stubs)
    async with console(web, "viewer") as viewer:
        for path in ("/events", "/enforcements", "/executions"):
            past = await get(viewer, f"{path}?from=2000-01-01T00:00&to=2000-01-02T00:00")
            assert "<tr data-key=" not in past, path
            assert "data-live=" not in past, path
            assert 'name="from" value="2000-01-01T00:00"' in past
        recent = await get(viewer, "/enforcements?from=2000-01-01T00:00")
        assert "<tr data-key=" in recent
        assert "from: a time such as" in await get(viewer, "/events?from=yesterday", 400)
