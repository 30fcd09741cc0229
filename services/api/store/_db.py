"""The connection pool and the translation of database failures into domain errors."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import asyncpg

from services.api import metrics
from shared.errors import Aborted, AlreadyExists, DomainError, InvalidArgument, NotFound, Unavailable

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
"""A connection of our own or one borrowed from the pool."""

log = logging.getLogger(__name__)

# SQLSTATE classes that mean "the database is not there right now": connection exceptions,
# operator intervention (shutdown, statement timeout), insufficient resources.
_UNAVAILABLE_CLASSES = ("08", "57", "53")
READ_ONLY = "25006"
"""read_only_sql_transaction: this connection reached a server that no longer takes writes (a
demoted primary, a standby). Nothing was written; the primary is elsewhere now."""

CONNECT_TIMEOUT_S = 5.0
"""One connection attempt, every host of a multi-host DATABASE_URL included. asyncpg's default
(60 s) would hold a call that long on a host that accepts and never answers (a blackhole)."""
CLIENT_MARGIN_S = 2.0
"""How long past statement_timeout the client waits for an answer. The server ends a slow
statement at statement_timeout and says so; silence for longer means the connection is dead
(half-open), and the call fails as UNAVAILABLE instead of waiting forever."""
# TCP keepalive on every database socket, both ends: a peer that vanished (host lost, network
# partition) is found in about IDLE + INTERVAL * COUNT seconds even when the connection is idle
# (a pool connection, the LISTEN connection); TCP_USER_TIMEOUT does the same while data we sent
# waits unacknowledged, where keepalive probes are not sent.
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 15_000


def is_row(row: asyncpg.Record | None) -> bool:
    """Whether a read found its row (``found`` of a read route: a miss asks the primary)."""
    return row is not None


_pools: set[asyncpg.Pool] = set()
"""Every open pool of this process: a read-only answer on one means all may point at a demoted
primary. (Pools take no weak references; closed ones are dropped as new ones are made.)"""


def _keepalive(sock: socket.socket | None) -> None:
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    except (OSError, AttributeError):  # not Linux: keepalive with the system's timings
        pass


FIRST_USER_OID = 16384
"""PostgreSQL's FirstNormalObjectId: every OID below it is fixed by PostgreSQL itself (its
built-in types), the same on every server; OIDs from here on are assigned per cluster."""


class _Known:
    """What ``_introspect_types`` answers beside the types when it ran no statement: a name, so
    that asyncpg does not prepare the caller's statement again."""

    name = "known-types"


_KNOWN = _Known()
KnownTypes = dict[int, list[Any]]
"""asyncpg's description of each type OID asked for: the rows of the introspection that asked
(the type and what it is made of, dependencies first)."""
_builtin_types: KnownTypes = {}
"""The built-in types' descriptions (e.g. ``bigint[]``), shared by every connection of the
process: see ``DbConnection._introspect_types``."""


def _reusable(types: list[Any]) -> bool:
    """Whether a type description stays true for every connection of one database: built-in
    types, and enums (asyncpg reads an enum as text, whatever its labels; a type dropped and
    made again has a new OID). A composite's or a domain's description can change in place."""
    return all(t["oid"] < FIRST_USER_OID or t["kind"] == b"e" for t in types)


def _known(cache: KnownTypes, oids: frozenset[int]) -> list[Any] | None:
    """The rows describing ``oids`` if every one was described before, dependencies first."""
    if not all(oid in cache for oid in oids):
        return None
    rows: dict[int, Any] = {}
    for oid in oids:
        for row in cache[oid]:
            rows.setdefault(row["oid"], row)
    return list(rows.values())


class DbConnection(asyncpg.Connection):
    """A database connection with TCP keepalive that is discarded, not cancelled, when a call on
    it timed out or was cancelled, and that asks the server to describe a type only once per
    pool (built-in types once per process).

    asyncpg answers a timeout by sending a CancelRequest over a second connection and waiting for
    the first one to say the statement ended: over a half-open path neither ever arrives, so the
    call (or the pool's release of the connection) waits once more for as long. A connection
    that went silent is not worth saving: it is closed at once, and the server's
    statement_timeout (shorter than our wait) ends whatever it was running.
    """

    interrupted = False
    known_types: KnownTypes | None = None
    """The descriptions its pool's connections share (one database: the primary, or after a
    failover its promoted standby, has the same OIDs), set by the pool's ``init``; None for a
    connection of its own, which shares only the built-in ones."""

    def __init__(self, protocol: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(protocol, transport, *args, **kwargs)
        _keepalive(transport.get_extra_info("socket") if transport is not None else None)

    # asyncpg's private hook, called when a statement uses a type it has no codec for yet (every
    # array type and enum counts, bigint[] too). asyncpg asks the server per connection, in two
    # or three statements of its own: on a fresh connection the api's first insert paid ~13
    # round trips instead of 2 (about 5 s over a 400 ms link), past a caller's deadline, and a pool
    # whose connections were all just replaced (a reset, a failover) answered little for that
    # long, its connections busy describing types. Asked once, a description is reused.
    async def _introspect_types(self, typeoids: Any, timeout: Any) -> Any:
        oids = frozenset(typeoids)
        cache = _builtin_types if all(oid < FIRST_USER_OID for oid in oids) else self.known_types
        known = _known(cache, oids) if cache is not None else None
        if known is not None:
            return known, _KNOWN
        types, statement = await super()._introspect_types(typeoids, timeout)  # type: ignore[misc]
        if cache is not None and _reusable(types):
            rows = list(types)
            for oid in oids:
                cache[oid] = rows
        return types, statement

    # asyncpg's private hook, called (as a task) for every timed-out or cancelled command.
    async def _cancel(self, waiter: asyncio.Future[None], cancel_waiter: Any = None) -> None:
        self.interrupted = True
        try:
            if not waiter.done():
                waiter.set_result(None)
        finally:
            getattr(self, "_cancellations", set()).discard(asyncio.current_task())
            self.terminate()


_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def set_deadline(seconds: float | None) -> None:
    """The current call must be answered within ``seconds`` (None: no deadline); for the rest
    of this context (one RPC)."""
    _deadline.set(None if seconds is None else time.monotonic() + seconds)


CUSTOM_PLAN = "SET LOCAL plan_cache_mode = force_custom_plan"
"""Run first in a transaction whose statements are to be planned with their values."""


def until_deadline() -> float | None:
    """How long the current call may still wait for a connection, or None for as long as it
    takes. A write that would start after its caller stopped waiting is not started: waited
    for behind others on a slow link, it would only delay the calls still there."""
    deadline = _deadline.get()
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


async def connect(url: str, **kwargs: Any) -> DbConnection:
    """One connection of our kind (keepalive, discarded when interrupted), bounded to connect."""
    conn: DbConnection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S, connection_class=DbConnection, **kwargs)
    return conn


async def alive(conn: asyncpg.Connection, timeout: float) -> bool:
    """Whether ``conn`` answers a trivial query within ``timeout`` (a LISTEN connection's probe)."""
    try:
        await conn.fetchval("SELECT 1", timeout=timeout)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError):
        return False
    return True


async def writable(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> bool:
    """Whether ``conn`` reaches a primary that takes writes (health: SERVING only then)."""
    return bool(
        await conn.fetchval("SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'")
    )


async def expire_all() -> None:
    """Every pool of this process replaces its connections as they come back: the primary moved."""
    for pool in list(_pools):
        if not pool.is_closing():
            await pool.expire_connections()


PLANNER_SETTINGS = {
    # Every statement the api runs is short and prepared (asyncpg caches them per connection).
    # On a TimescaleDB hypertable a custom plan is planned anew on every execution, and with
    # 90 one-day chunks planning (10-20 ms) costs ten times the execution; PostgreSQL's own
    # heuristic keeps choosing custom plans there. A generic plan is made once per connection,
    # and TimescaleDB's ChunkAppend still excludes chunks at run time from the bound values.
    # The EXPLAIN tests check every list query's generic plan on both stores.
    "plan_cache_mode": "force_generic_plan",
    # A generic plan over 90 chunks is estimated at millions of rows, above jit_above_cost:
    # JIT then compiles for 30-40 ms to run a statement that takes one.
    "jit": "off",
}
"""Session settings of every api connection; the benchmarks' raw baselines use them too."""


_DECODER = json.JSONDecoder()


def json_loads(text: str) -> Any:
    """``json.loads(text)``, in about half its time on the short values most columns hold.

    json.loads wraps the C scanner in Python (a BOM check, two regular expression matches for
    whitespace) that costs more than scanning a small object; raw_decode calls the scanner
    alone. Text it does not take whole from its first character (leading or trailing
    whitespace, a BOM, anything invalid) goes to json.loads, which answers or raises as ever.
    """
    try:
        value, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError:
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    return value


def json_loads_all(texts: list[str | None]) -> list[Any]:
    """The JSON values of ``texts`` (None for SQL NULL), decoded in one pass of the C scanner
    (a list page's JSON columns: see ``_paging.json_as_text``)."""
    return json.loads("[" + ",".join([t if t is not None else "null" for t in texts]) + "]") if texts else []


async def _init_connection(conn: asyncpg.Connection, known_types: KnownTypes | None = None) -> None:
    if isinstance(conn, DbConnection) and known_types is not None:
        conn.known_types = known_types
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, encoder=json.dumps, decoder=json_loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Returns a connection to the pool as it is.

    asyncpg's default reset is one more round trip per acquire (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL: four statements), about a third of the api's queries. Nothing here
    leaves session state behind: advisory locks are transaction-scoped, LISTEN has its own
    connection, settings are startup parameters; asyncpg still rolls back an open transaction.
    A connection whose call timed out or was cancelled is already closed (``DbConnection``) and
    never comes back to the pool.
    """


async def create_pool(
    url: str,
    min_size: int = 2,
    max_size: int = 16,
    statement_timeout_s: float = 30.0,
    notify_triggers: bool = True,
    application_name: str = "automation-api",
) -> asyncpg.Pool:
    """A pool whose connections decode JSON to Python values and bound every statement.

    With ``notify_triggers=False`` its sessions skip the NOTIFY triggers (migration 0004):
    the caller then announces its writes itself, outside its write transactions.
    """
    settings = {
        "statement_timeout": str(int(statement_timeout_s * 1000)),
        "application_name": application_name,
        # The server's side of keepalive: a vanished api's backend (and its locks) goes too.
        "tcp_keepalives_idle": str(KEEPALIVE_IDLE_S),
        "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL_S),
        "tcp_keepalives_count": str(KEEPALIVE_COUNT),
        **PLANNER_SETTINGS,
    }
    if not notify_triggers:
        settings["automation.notify"] = "off"
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            init=functools.partial(_init_connection, known_types={}),
            reset=_keep_session,
            server_settings=settings,
            # Kept however long idle (asyncpg closes them after 5 minutes by default): a new
            # connection plans every statement again, and on TimescaleDB its first statement
            # also reads the catalog entries of every chunk (70-100 ms on 90 days).
            max_inactive_connection_lifetime=0,
            connection_class=DbConnection,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=statement_timeout_s + CLIENT_MARGIN_S,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unavailable(f"cannot connect to the database: {exc}") from exc
    assert pool is not None
    _pools.difference_update([p for p in _pools if p.is_closing()])
    _pools.add(pool)
    return pool


def _stored_field(exc: asyncpg.PostgresError) -> str:
    """The stored field an error names, as ``table.column`` where PostgreSQL says which."""
    table = getattr(exc, "table_name", None) or ""
    column = getattr(exc, "column_name", None) or ""
    return ".".join(p for p in (table, column) if p) or "value"


def translate(exc: BaseException) -> DomainError | None:
    """The domain error for a database failure, or None when it is a bug to report as such.

    Messages never carry PostgreSQL's own text: it can quote the caller's data (NUL, NaN,
    thousands of characters) and SQL. Validation in the servicers should leave data and limit
    errors (SQLSTATE classes 22 and 54) nothing to catch; these mappings are the safety net.
    """
    if isinstance(exc, DomainError):
        return exc
    # asyncpg refuses a parameter it cannot encode before sending it: bad input, not an outage.
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        return InvalidArgument.one("value", "cannot be stored: a value has a type or range the database refuses")
    # InternalClientError: asyncpg's protocol state can trip when the server goes away
    # mid-operation (a restart); it means "connection unusable", not a bug of ours.
    if isinstance(exc, (OSError, asyncpg.InterfaceError, ConnectionError, asyncpg.InternalClientError)):
        return Unavailable(f"the database is unavailable: {exc.__class__.__name__}")
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state == READ_ONLY:
            return Unavailable("the database is read-only here: the primary has moved; retry")
        if state.startswith(_UNAVAILABLE_CLASSES):
            return Unavailable(f"the database is unavailable (SQLSTATE {state})")
        if state in ("40P01", "40001"):
            # A deadlock or serialization failure: the statement was rolled back whole.
            return Aborted(f"conflicted with a concurrent change and changed nothing; retry (SQLSTATE {state})")
        if isinstance(exc, asyncpg.UniqueViolationError):
            return AlreadyExists(f"already exists ({exc.constraint_name or 'unique key'})")
        if isinstance(exc, asyncpg.ForeignKeyViolationError):
            return NotFound(f"a referenced record does not exist ({exc.constraint_name or 'foreign key'})")
        if isinstance(exc, asyncpg.CheckViolationError):
            return InvalidArgument.one(_stored_field(exc), f"violates {exc.constraint_name or 'a check'}")
        if state.startswith("54"):
            return InvalidArgument.one(_stored_field(exc), f"is too large to store (SQLSTATE {state})")
        if state.startswith("22"):
            return InvalidArgument.one(_stored_field(exc), f"cannot be stored (SQLSTATE {state})")
    return None


@asynccontextmanager
async def guarded() -> AsyncIterator[None]:
    """Re-raises database failures as domain errors (unexpected ones pass through)."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, asyncpg.PostgresError):
            state = getattr(exc, "sqlstate", "") or ""
            metrics.current.db_error(state)
            if state == READ_ONLY:
                log.warning("the database refused a write as read-only: reconnecting to the primary")
                await expire_all()
        elif isinstance(exc, (OSError, asyncpg.InterfaceError, ConnectionError, asyncpg.InternalClientError)):
            metrics.current.db_error("08")  # connection exception
        mapped = translate(exc)
        if mapped is None or mapped is exc:
            raise
        raise mapped from exc


T = TypeVar("T")


class ReadRoute(Protocol):
    """Where the reads that may lag run (``_replica.Reads``: a standby while it keeps up)."""

    async def run(
        self, read: Callable[[asyncpg.Pool], Awaitable[T]], found: Callable[[T], bool] | None = None
    ) -> T: ...


class Primary:
    """Every read on the primary: the route without DATABASE_READ_URL, and of the repositories
    whose reads must not lag."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.primary = pool

    async def run(self, read: Callable[[asyncpg.Pool], Awaitable[T]], found: Callable[[T], bool] | None = None) -> T:
        return await read(self.primary)


class Repo:
    """Base of the per-aggregate repositories: a pool and helpers that translate failures.

    ``reads``: where the reads that may lag go (``_read*``); the primary unless the Store gives
    this repository the standby's route. Everything else uses ``_pool``, the primary.
    """

    def __init__(self, pool: asyncpg.Pool, reads: ReadRoute | None = None) -> None:
        self._pool = pool
        self._reads: ReadRoute = reads or Primary(pool)

    async def _read_fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """``_fetch`` on the read route (a list page, an aggregate)."""
        async with guarded():
            return await self._reads.run(lambda pool: pool.fetch(sql, *args))

    async def _read_fetch_planned(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """``_read_fetch`` under a custom plan, made with the values: the session plans generic
        ones, in which a bound compared with an expression of a column (a continuous
        aggregate's ``time_bucket(created)``) excludes no chunk and uses no index."""

        async def read(pool: asyncpg.Pool) -> list[asyncpg.Record]:
            async with pool.acquire(timeout=until_deadline()) as conn, conn.transaction(readonly=True):
                await conn.execute(CUSTOM_PLAN)
                return list(await conn.fetch(sql, *args))

        async with guarded():
            return await self._reads.run(read)

    async def _read_fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        """``_fetchrow`` on the read route; a row the standby does not have yet is asked of the
        primary (a Get right after a Create finds it)."""
        async with guarded():
            return await self._reads.run(lambda pool: pool.fetchrow(sql, *args), found=is_row)

    # One statement each, on its own (autocommit): one refused as read-only wrote nothing, so it
    # is sent once more, on a connection the expired pool opens to wherever the primary is now.
    # Transactions (elsewhere in the store) are answered UNAVAILABLE instead: the caller
    # retries them, with its request id where it has one.

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with guarded():
            try:
                return await self._pool.fetch(sql, *args)
            except asyncpg.ReadOnlySQLTransactionError:
                await expire_all()
                return await self._pool.fetch(sql, *args)

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with guarded():
            try:
                return await self._pool.fetchrow(sql, *args)
            except asyncpg.ReadOnlySQLTransactionError:
                await expire_all()
                return await self._pool.fetchrow(sql, *args)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with guarded():
            try:
                return await self._pool.fetchval(sql, *args)
            except asyncpg.ReadOnlySQLTransactionError:
                await expire_all()
                return await self._pool.fetchval(sql, *args)

    async def _execute(self, sql: str, *args: Any) -> str:
        async with guarded():
            try:
                return await self._pool.execute(sql, *args)
            except asyncpg.ReadOnlySQLTransactionError:
                await expire_all()
                return await self._pool.execute(sql, *args)
