"""The pipeline end to end, with the api and executors as real processes on a real database."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from google.protobuf import field_mask_pb2

from shared.gen.automation.v1 import common_pb2, condition_pb2, event_pb2, rule_pb2
from tests.e2e.conftest import Client, Cluster
from tests.helpers import eventually, new_event, rule
from tools.healthcheck import file_fresh

pytestmark = pytest.mark.e2e


async def _define(client: Client, action_ref: str = "core.echo") -> None:
    await client.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="core.webhook")))
    await client.rules.CreateRule(
        rule_pb2.CreateRuleRequest(
            rule=rule(
                "demo.greet",
                "core.webhook",
                action_ref,
                params={"greeting": "hello {{ event.payload.name }}", "count": "{{ event.payload.n }}"},
                conditions=[("kind", condition_pb2.CONDITION_OPERATOR_EQUALS, "greet")],
            )
        )
    )


async def _send(client: Client, n: int, start: int = 0) -> list[int]:
    ids = []
    for i in range(start, start + n):
        resp = await client.events.CreateEvent(
            event_pb2.CreateEventRequest(event=new_event("core.webhook", {"kind": "greet", "name": f"n{i}", "n": i}))
        )
        assert len(resp.enforcements) == 1
        ids.append(resp.enforcements[0].id)
    return ids


async def _all_resolved(conn: asyncpg.Connection, expected: int) -> bool:
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE status <> 'created') AS done, count(*) AS total FROM enforcement"
    )
    assert row is not None
    return bool(row["done"] == expected and row["total"] == expected)


async def _assert_exactly_once(conn: asyncpg.Connection, expected_processed: int) -> None:
    """Every enforcement resolved once: PROCESSED ones with one execution, others with none."""
    stats = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE e.status = 'processed') AS processed,
               count(*) FILTER (WHERE e.status = 'created') AS pending,
               count(*) FILTER (WHERE e.resolved_at IS NULL) AS unresolved,
               (SELECT count(*) FROM execution) AS executions,
               (SELECT count(*) FROM (SELECT enforcement FROM execution GROUP BY 1 HAVING count(*) > 1) d) AS dup,
               (SELECT count(*) FROM execution x JOIN enforcement e2 ON e2.id = x.enforcement
                 WHERE e2.status <> 'processed') AS stray
          FROM enforcement e
        """
    )
    assert stats is not None
    assert dict(stats) == {
        "processed": expected_processed,
        "pending": 0,
        "unresolved": 0,
        "executions": expected_processed,
        "dup": 0,
        "stray": 0,
    }


async def test_event_flows_to_processed_enforcement_with_execution(
    cluster: Cluster, client_factory: Callable[[str], Client], conn: asyncpg.Connection, tmp_path: Path
) -> None:
    await cluster.start_api()
    health_file = tmp_path / "executor.alive"
    await cluster.start_executor(EXECUTOR_HEALTH_FILE=str(health_file))
    client = client_factory(cluster.target)
    await _define(client)
    (enf_id,) = await _send(client, 1)

    async def resolved() -> common_pb2.Enforcement | None:
        from shared.gen.automation.v1 import enforcement_pb2

        e = await client.enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=enf_id))
        return e if e.HasField("resolved_at") else None

    enforcement = await eventually(resolved, what="the enforcement to be resolved")
    assert enforcement.status == common_pb2.ENFORCEMENT_STATUS_PROCESSED
    row = await conn.fetchrow("SELECT action_ref, config, status::text FROM execution WHERE enforcement = $1", enf_id)
    assert row is not None
    assert (row["action_ref"], row["status"]) == ("core.echo", "requested")
    assert row["config"] == '{"count": 0, "greeting": "hello n0"}'

    async def health_file_fresh() -> bool:
        return file_fresh(str(health_file), max_age=30)

    await eventually(health_file_fresh, what="the executor to touch its health file")


async def test_rule_disabled_before_resolution_yields_disabled(
    cluster: Cluster, client_factory: Callable[[str], Client], conn: asyncpg.Connection
) -> None:
    await cluster.start_api()
    client = client_factory(cluster.target)
    await _define(client)
    ids = await _send(client, 5)
    await client.rules.UpdateRule(
        rule_pb2.UpdateRuleRequest(
            rule=rule_pb2.Rule(ref="demo.greet", enabled=False), update_mask=field_mask_pb2.FieldMask(paths=["enabled"])
        )
    )
    await cluster.start_executor()
    await eventually(lambda: _all_resolved(conn, 5), what="the backlog to resolve")
    statuses = await conn.fetch("SELECT status::text FROM enforcement WHERE id = ANY($1)", ids)
    assert {r["status"] for r in statuses} == {"disabled"}
    await _assert_exactly_once(conn, 0)


async def test_executor_started_later_resolves_the_backlog(
    cluster: Cluster, client_factory: Callable[[str], Client], conn: asyncpg.Connection
) -> None:
    await cluster.start_api()
    client = client_factory(cluster.target)
    await _define(client)
    await _send(client, 60)
    assert await conn.fetchval("SELECT count(*) FROM enforcement WHERE status = 'created'") == 60
    await cluster.start_executor()
    await eventually(lambda: _all_resolved(conn, 60), what="the backlog to resolve")
    await _assert_exactly_once(conn, 60)


async def test_api_restart_under_a_running_executor_loses_nothing(
    cluster: Cluster, client_factory: Callable[[str], Client], conn: asyncpg.Connection
) -> None:
    await cluster.start_api()
    executor = await cluster.start_executor()
    client = client_factory(cluster.target)
    await _define(client)
    await _send(client, 20)
    await cluster.stop_api()
    # Work created while the api is down must wait for it, not vanish.
    await conn.execute(
        """INSERT INTO enforcement (rule, rule_ref, trigger_ref, config, payload)
           SELECT id, ref, trigger_ref, '{}', '{}' FROM rule WHERE ref = 'demo.greet'"""
    )
    await cluster.start_api()
    await _send(client, 20, start=20)
    await eventually(lambda: _all_resolved(conn, 41), what="every enforcement to resolve after the restart")
    await _assert_exactly_once(conn, 41)
    assert executor.returncode is None, "the executor must survive an api restart"


async def test_two_executors_never_resolve_one_enforcement_twice(
    cluster: Cluster, client_factory: Callable[[str], Client], conn: asyncpg.Connection
) -> None:
    await cluster.start_api()
    client = client_factory(cluster.target)
    await _define(client)
    await _send(client, 150)
    await asyncio.gather(cluster.start_executor("exec-a"), cluster.start_executor("exec-b"))
    await _send(client, 150, start=150)
    await eventually(lambda: _all_resolved(conn, 300), timeout=60, what="300 enforcements to resolve")
    await _assert_exactly_once(conn, 300)
