"""History of executions and workers, written by database triggers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.api.store import HistoryRecord, Store
from shared.errors import InvalidArgument

WORKER_FIELDS = ["name", "status", "host", "port", "capabilities", "meta"]
EXECUTION_FIELDS = ["status", "result", "executor", "parent", "config"]


async def history(store: Store, entity_type: str, **filters: Any) -> list[HistoryRecord]:
    """Every record, oldest first."""
    return list(reversed((await store.history.list(entity_type, 1000, "", **filters)).items))


async def new_worker(conn: asyncpg.Connection, name: str = "w1") -> int:
    value = await conn.fetchval(
        "INSERT INTO worker (name, host, port, capabilities) VALUES ($1, 'h1', 7000, '{\"cpu\": 2}') RETURNING id", name
    )
    assert isinstance(value, int)
    return value


async def new_execution(conn: asyncpg.Connection, action_ref: str = "core.echo") -> int:
    value = await conn.fetchval(
        "INSERT INTO execution (action_ref, config, enforcement) VALUES ($1, '{\"a\": 1}', 10) RETURNING id", action_ref
    )
    assert isinstance(value, int)
    return value


async def test_worker_insert_update_delete_write_history(store: Store, conn: asyncpg.Connection) -> None:
    wid = await new_worker(conn)
    await conn.execute("UPDATE worker SET status = 'busy', port = 7001 WHERE id = $1", wid)
    await conn.execute("DELETE FROM worker WHERE id = $1", wid)
    inserted, updated, deleted = await history(store, "worker", entity_id=wid)

    assert (inserted.operation, inserted.entity_id, inserted.entity_ref) == ("INSERT", wid, "w1")
    assert inserted.changed_fields == WORKER_FIELDS
    assert inserted.old_values is None
    assert inserted.new_values == {
        "name": "w1",
        "status": "active",
        "host": "h1",
        "port": 7000,
        "capabilities": {"cpu": 2},
        "meta": {},
    }

    assert (updated.operation, updated.changed_fields) == ("UPDATE", ["status", "port"])
    assert updated.old_values == {"status": "active", "port": 7000}
    assert updated.new_values == {"status": "busy", "port": 7001}

    assert (deleted.operation, deleted.changed_fields, deleted.new_values) == ("DELETE", WORKER_FIELDS, None)
    assert deleted.old_values is not None and deleted.old_values["status"] == "busy"
    assert deleted.old_values["port"] == 7001


async def test_update_of_untracked_fields_writes_no_history(store: Store, conn: asyncpg.Connection) -> None:
    wid = await new_worker(conn)
    await conn.execute("UPDATE worker SET last_heartbeat = now() WHERE id = $1", wid)
    await conn.execute("UPDATE worker SET status = status, worker_type = 'remote' WHERE id = $1", wid)
    records = await history(store, "worker", entity_id=wid)
    assert [r.operation for r in records] == ["INSERT"]


async def test_execution_changes_write_history(store: Store, conn: asyncpg.Connection) -> None:
    xid = await new_execution(conn)
    await conn.execute("UPDATE execution SET status = 'running' WHERE id = $1", xid)
    await conn.execute("UPDATE execution SET status = 'completed', result = '{\"ok\": true}' WHERE id = $1", xid)
    await conn.execute("UPDATE execution SET updated = now() - interval '1 day' WHERE id = $1", xid)
    await conn.execute("DELETE FROM execution WHERE id = $1", xid)
    records = await history(store, "execution", entity_id=xid)
    assert [r.operation for r in records] == ["INSERT", "UPDATE", "UPDATE", "DELETE"]
    inserted, running, completed, deleted = records
    assert inserted.changed_fields == EXECUTION_FIELDS and inserted.entity_ref == "core.echo"
    assert inserted.new_values == {
        "status": "requested",
        "result": None,
        "executor": None,
        "parent": None,
        "config": {"a": 1},
    }
    assert (running.changed_fields, running.old_values, running.new_values) == (
        ["status"],
        {"status": "requested"},
        {"status": "running"},
    )
    assert (completed.changed_fields, completed.old_values, completed.new_values) == (
        ["status", "result"],
        {"status": "running", "result": None},
        {"status": "completed", "result": {"ok": True}},
    )
    assert deleted.old_values is not None and deleted.old_values["status"] == "completed"


async def test_resolving_an_enforcement_records_the_execution_insert(store: Store, conn: asyncpg.Connection) -> None:
    await store.rules.create_trigger("core.webhook", "", "", None, None)
    await store.rules.create_rule(
        ref="demo.r",
        label="",
        description="",
        trigger_ref="core.webhook",
        action_ref="core.echo",
        action_params={"p": 1},
        conditions=[],
        condition="all",
        enabled=True,
    )
    enf, _ = await store.enforcements.create(rule_ref="demo.r", event=None, payload={}, config=None, request_id=None)
    resolution = await store.enforcements.resolve(enf.id, "processed")
    assert resolution.execution is not None
    [record] = await history(store, "execution")
    assert (record.operation, record.entity_id, record.entity_ref) == ("INSERT", resolution.execution.id, "core.echo")
    assert record.new_values is not None and record.new_values["config"] == {"p": 1}


async def test_history_filters(store: Store, conn: asyncpg.Connection) -> None:
    w1 = await new_worker(conn, "w1")
    w2 = await new_worker(conn, "w2")
    await conn.execute("UPDATE worker SET status = 'busy' WHERE id = $1", w1)
    await conn.execute("UPDATE worker SET host = 'h2' WHERE id = $1", w1)
    await conn.execute("UPDATE worker SET status = 'error' WHERE id = $1", w2)

    async def ops(**filters: Any) -> list[tuple[int, str, list[str]]]:
        return [(r.entity_id, r.operation, r.changed_fields) for r in await history(store, "worker", **filters)]

    assert await ops(entity_id=w2) == [(w2, "INSERT", WORKER_FIELDS), (w2, "UPDATE", ["status"])]
    assert await ops(operation="UPDATE") == [
        (w1, "UPDATE", ["status"]),
        (w1, "UPDATE", ["host"]),
        (w2, "UPDATE", ["status"]),
    ]
    assert await ops(changed_field="host", operation="UPDATE") == [(w1, "UPDATE", ["host"])]
    assert await ops(entity_id=w1, changed_field="status") == [
        (w1, "INSERT", WORKER_FIELDS),
        (w1, "UPDATE", ["status"]),
    ]
    assert await ops(operation="DELETE") == []


async def test_history_time_range_and_paging(store: Store, conn: asyncpg.Connection) -> None:
    t0 = datetime(2024, 6, 1, tzinfo=UTC)
    for i in range(5):
        await conn.execute(
            "INSERT INTO worker_history (time, operation, entity_id, entity_ref, changed_fields, new_values) "
            "VALUES ($1, 'UPDATE', 99, 'w', '{status}', '{}')",
            t0 + timedelta(hours=i),
        )
    in_range = await store.history.list(
        "worker", 10, "", time_from=t0 + timedelta(hours=1), time_to=t0 + timedelta(hours=3)
    )
    assert [r.time for r in in_range.items] == [t0 + timedelta(hours=2), t0 + timedelta(hours=1)]
    seen: list[datetime] = []
    token = ""
    pages = 0
    while True:
        page = await store.history.list("worker", 2, token, entity_id=99)
        seen.extend(r.time for r in page.items)
        pages += 1
        token = page.next_token
        if not token:
            break
    assert pages == 3
    assert seen == [t0 + timedelta(hours=i) for i in reversed(range(5))]


@pytest.mark.parametrize("entity_type", ["event", "enforcement", "rule", ""])
async def test_history_of_other_entities_is_invalid(store: Store, entity_type: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await store.history.list(entity_type, 10, "")
    [(field, description)] = info.value.violations
    assert field == "entity_type"
    assert "only execution and worker have history" in description
    assert repr(entity_type) in description


async def test_history_bad_page_token_is_invalid(store: Store) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        await store.history.list("worker", 10, "nonsense")
