"""The data-access layer: the only place that holds SQL (besides migrations/).

``Store`` bundles one repository per aggregate over one asyncpg pool. Repositories return
typed rows (``types``) and raise the domain errors of ``shared.errors``.
"""

from __future__ import annotations

import asyncio

import asyncpg

from ._db import alive, connect, create_pool, expire_all, set_deadline, translate, writable
from ._derive import derive
from ._paging import Scope, Signer, page_size
from ._replica import Reads
from ._secret import SharedKey
from .analytics import Analytics
from .audit import Audit
from .dispatch import Dispatch
from .enforcements import Enforcements
from .events import Events
from .executions import Executions
from .history import History
from .rules import Rules
from .secrets import SchemaVersions
from .tails import Tails
from .tokens import TokenRow, Tokens
from .types import (
    Actor,
    AuditRecord,
    CreatedEvent,
    Delivery,
    DispatchState,
    Enforcement,
    EnforcementVolume,
    Event,
    EventVolume,
    Execution,
    HistoryRecord,
    Lease,
    NewEvent,
    Page,
    Resolution,
    Rule,
    Trigger,
    Webhook,
)

__all__ = [
    "Actor",
    "AuditRecord",
    "CreatedEvent",
    "Delivery",
    "DispatchState",
    "Enforcement",
    "EnforcementVolume",
    "Event",
    "EventVolume",
    "Execution",
    "HistoryRecord",
    "Lease",
    "NewEvent",
    "Page",
    "Reads",
    "Resolution",
    "Rule",
    "Scope",
    "Signer",
    "Store",
    "TokenRow",
    "Trigger",
    "Webhook",
    "alive",
    "connect",
    "create_pool",
    "derive",
    "expire_all",
    "page_size",
    "set_deadline",
    "translate",
    "writable",
]


CLOSE_TIMEOUT_S = 10.0
"""How long closing the pool may wait for its connections before it terminates them."""


class Store:
    """Every repository, sharing one pool; the reads that may lag on ``reads``.

    Which reads those are (the README's "Read replicas" table): list pages, Get by id and
    analytics of events, enforcements and executions, history and audit lists. Triggers and
    rules stay on the primary (small, and an operator who edits a rule must see the edit on
    the next page), as do tails, dispatch and leases, tokens, idempotency keys and every read
    inside a write (ingest's one read, resolutions, replays' scans, the page-token key).
    """

    def __init__(self, pool: asyncpg.Pool, reads: Reads | None = None) -> None:
        self.pool = pool
        self.reads = reads or Reads(pool)
        # One key signs the page tokens of every list; it is read from the database, where
        # every replica finds the same one, on the first list call.
        keys = SharedKey(pool)
        self.rules = Rules(pool, keys)
        self.events = Events(pool, keys, self.reads)
        self.enforcements = Enforcements(pool, keys, self.reads)
        self.dispatch = Dispatch(pool)
        self.executions = Executions(pool, keys, self.reads)
        self.history = History(pool, keys, self.reads)
        self.analytics = Analytics(pool, self.reads)
        self.tokens = Tokens(pool)
        # The secret paths of every schema version, for the reads that mask them.
        self.schema_versions = SchemaVersions(pool)
        self.audit = Audit(pool, keys, self.reads)
        # The live tails sign their cursors with the same key.
        self.tails = Tails(pool, keys)

    async def ping(self) -> None:
        """Raises when the database cannot answer a trivial query."""
        await self.pool.fetchval("SELECT 1")

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Closes the pool gracefully, or terminates it after ``timeout``: a connection whose
        release never completes (a call cancelled mid-statement on a path that went silent)
        must not hold the api's shutdown for ever."""
        await self.reads.close()
        try:
            await asyncio.wait_for(self.pool.close(), timeout)
        except TimeoutError:
            self.pool.terminate()
