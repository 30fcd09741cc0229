"""The SQL the store issues for a list call, captured rather than rebuilt.

A repository is given a stand-in pool that records ``fetch(sql, *args)`` and returns no rows,
so the benchmark's raw baseline and the EXPLAIN test run exactly the statement the api runs
(whatever filters and keyset condition the store composes), with the same parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import asyncpg

from services.api.store.enforcements import Enforcements
from services.api.store.events import Events


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.calls.append((sql, args))
        return []

    # A payload search runs in a transaction of its own, with its own statement timeout: the
    # recorder stands in for the connection too, and keeps only the statement.

    def acquire(self, timeout: float | None = None) -> _Recorder:
        return self

    def transaction(self, readonly: bool = False) -> _Recorder:
        return self

    async def execute(self, sql: str, *args: Any) -> str:
        return ""

    async def __aenter__(self) -> _Recorder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def _captured(kind: str, size: int, token: str, filters: dict[str, Any]) -> tuple[str, Sequence[Any]]:
    recorder = _Recorder()
    pool = cast(asyncpg.Pool, recorder)
    if kind == "event":
        await Events(pool).list(size, token, **filters)
    elif kind == "enforcement":
        await Enforcements(pool).list(size, token, **filters)
    else:
        raise ValueError(f"unknown list {kind!r}")
    if len(recorder.calls) != 1:
        raise RuntimeError(f"expected one query from the {kind} list, got {len(recorder.calls)}")
    return recorder.calls[0]


async def list_events_sql(size: int, token: str = "", **filters: Any) -> tuple[str, Sequence[Any]]:
    """The statement and parameters of ``Events.list`` (ListEvents) for these filters."""
    return await _captured("event", size, token, filters)


async def list_enforcements_sql(size: int, token: str = "", **filters: Any) -> tuple[str, Sequence[Any]]:
    """The statement and parameters of ``Enforcements.list`` (ListEnforcements)."""
    return await _captured("enforcement", size, token, filters)
