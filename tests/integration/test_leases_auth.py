"""Leases belong to their holder: another principal's executor can neither release nor resolve
what a stream holds; an operator may force a release (audited); one principal cannot take all
the pending work by opening streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from services.api.auth import new_token
from services.api.server import ApiServer
from services.api.store import Store
from shared import limits
from shared.gen.automation.v1 import (
    analytics_pb2_grpc,
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2_grpc,
    execution_pb2_grpc,
    history_pb2_grpc,
    rule_pb2_grpc,
)
from tests.conftest import Stubs
from tests.helpers import channel, rpc_error, rule
from tests.integration.watching import Watch, pending, setup

PROCESSED = common_pb2.ENFORCEMENT_STATUS_PROCESSED
DISABLED = common_pb2.ENFORCEMENT_STATUS_DISABLED


@pytest.fixture
async def as_role(api: ApiServer, store: Store) -> AsyncIterator[dict[str, Stubs]]:
    """Stubs of two executor principals (alice, bob) and an operator, over their own channels."""
    tokens = {}
    for name, role in (("alice", "executor"), ("bob", "executor"), ("ops", "operator")):
        token, digest = new_token()
        await store.tokens.create(name, [role], digest, None)
        tokens[name] = token
    await api.authenticator.load()
    target = f"127.0.0.1:{api.port}"
    out = {}
    channels = []
    for name, token in tokens.items():
        ch = channel(target, token)
        channels.append(ch)
        out[name] = Stubs(
            channel=ch,
            target=target,
            events=event_pb2_grpc.EventServiceStub(ch),
            enforcements=enforcement_pb2_grpc.EnforcementServiceStub(ch),
            rules=rule_pb2_grpc.RuleServiceStub(ch),
            executions=execution_pb2_grpc.ExecutionServiceStub(ch),
            history=history_pb2_grpc.HistoryServiceStub(ch),
            analytics=analytics_pb2_grpc.AnalyticsServiceStub(ch),
        )
    yield out
    for ch in channels:
        await ch.close()


async def test_another_principal_can_neither_release_nor_resolve_a_held_lease(
    stubs: Stubs, as_role: dict[str, Stubs], conn: asyncpg.Connection
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    (id_,) = await pending(stubs, 1)
    alice = Watch(as_role["alice"], "exec-1")
    try:
        await alice.delivered(1)
        bob = as_role["bob"].enforcements
        # The same executor id does not make bob the holder.
        err = await rpc_error(
            bob.ReleaseEnforcement(enforcement_pb2.ReleaseEnforcementRequest(id=id_, executor_id="exec-1")),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert "another principal" in (err.details() or "")
        err = await rpc_error(
            bob.ResolveEnforcement(enforcement_pb2.ResolveEnforcementRequest(id=id_, status=DISABLED)),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert "leased to another principal" in (err.details() or "")
        batch = await bob.ResolveEnforcements(
            enforcement_pb2.ResolveEnforcementsRequest(
                decisions=[enforcement_pb2.ResolveEnforcementRequest(id=id_, status=DISABLED)]
            )
        )
        assert batch.outcomes[0].error.reason == "LEASED_BY_ANOTHER"
        assert await conn.fetchval("SELECT status FROM enforcement WHERE id = $1", id_) == "created"
        # The holder resolves it.
        done = await as_role["alice"].enforcements.ResolveEnforcement(
            enforcement_pb2.ResolveEnforcementRequest(id=id_, status=PROCESSED)
        )
        assert done.enforcement.status == PROCESSED
    finally:
        await alice.close()


async def test_unleased_work_may_be_resolved_by_any_executor(stubs: Stubs, as_role: dict[str, Stubs]) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    (id_,) = await pending(stubs, 1)
    done = await as_role["bob"].enforcements.ResolveEnforcement(
        enforcement_pb2.ResolveEnforcementRequest(id=id_, status=PROCESSED)
    )
    assert done.enforcement.status == PROCESSED


async def test_an_operator_forces_a_release_and_it_is_audited(
    stubs: Stubs, as_role: dict[str, Stubs], conn: asyncpg.Connection
) -> None:
    await setup(stubs, rule("demo.a", "core.webhook"))
    (id_,) = await pending(stubs, 1)
    alice = Watch(as_role["alice"], "exec-1")
    try:
        await alice.delivered(1)
        # Forcing is for operators only.
        await rpc_error(
            as_role["bob"].enforcements.ReleaseEnforcement(
                enforcement_pb2.ReleaseEnforcementRequest(id=id_, executor_id="exec-1", force=True)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        forced = await as_role["ops"].enforcements.ReleaseEnforcement(
            enforcement_pb2.ReleaseEnforcementRequest(id=id_, executor_id="whoever", error="stuck", force=True)
        )
        assert forced.released
        row = await conn.fetchrow(
            "SELECT principal, rpc, entity_id FROM audit_log WHERE entity_type = 'enforcement' ORDER BY id DESC LIMIT 1"
        )
        assert row is not None
        assert (row["principal"], row["entity_id"]) == ("ops", id_)
        assert row["rpc"].endswith("ReleaseEnforcement")
        # Released: handed out again (attempt 2), with the operator's reason as its last error.
        await alice.delivered(2)
        assert [d.attempt for d in alice.deliveries] == [1, 2]
        assert await conn.fetchval("SELECT last_error FROM enforcement_dispatch WHERE enforcement = $1", id_) == "stuck"
    finally:
        await alice.close()


async def test_one_principal_cannot_open_streams_without_bound(stubs: Stubs, as_role: dict[str, Stubs]) -> None:
    alice = as_role["alice"]
    opened = [Watch(alice, f"exec-{i}", max_in_flight=1) for i in range(limits.MAX_WATCH_STREAMS_PER_PRINCIPAL)]
    try:
        for w in opened:
            await w.beats(1)  # each is open and served
        extra = Watch(alice, "exec-extra", max_in_flight=1)
        opened.append(extra)
        err = await extra.failed()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "watch streams" in (err.details() or "")
        # Another principal is not affected.
        bobs = Watch(as_role["bob"], "exec-b", max_in_flight=1)
        opened.append(bobs)
        await bobs.beats(1)
    finally:
        for w in opened:
            await w.close()


async def test_one_principal_cannot_hold_more_than_its_credit(stubs: Stubs, as_role: dict[str, Stubs]) -> None:
    alice = as_role["alice"]
    per_stream = limits.MAX_IN_FLIGHT
    opened = [Watch(alice, f"exec-{i}", max_in_flight=per_stream) for i in range(2)]
    try:
        for w in opened:
            await w.beats(1)
        extra = Watch(alice, "exec-extra", max_in_flight=1)
        opened.append(extra)
        err = await extra.failed()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "credit" in (err.details() or "")
    finally:
        for w in opened:
            await w.close()
