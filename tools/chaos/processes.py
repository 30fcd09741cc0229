"""PostgreSQL and the child processes of a run: start, kill, restart, stall, and the end.

Every child writes its log to its own file under the run's log directory. ``close`` kills
whatever is still running (continuing stopped ones first), so nothing outlives the harness,
even when the run fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.transport import client_security, open_channel
from tools.chaos.patroni import PatroniCluster, unavailable_for
from tools.chaos.settings import Settings
from tools.postgres import LocalPostgres, free_port

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("chaos")


def snapshot_code(into: Path) -> Path:
    """Copies the code the children run (services, shared, migrations) into ``into``.

    Every process of the run, restarted or not, then runs the same code, even if the working
    tree is edited meanwhile (an api refuses to serve when an applied migration file changed).
    """
    for name in ("services", "shared", "migrations"):
        shutil.copytree(ROOT / name, into / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return into


def with_hosts(url: str, hosts: list[str], read_write: bool) -> str:
    """``url`` with its host list replaced by ``hosts`` (``host:port``), asking for the node
    that takes writes when there may be several."""
    parts = urllib.parse.urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{','.join(hosts)}" if user else ",".join(hosts)
    query = dict(urllib.parse.parse_qsl(parts.query))
    if read_write:
        query["target_session_attrs"] = "read-write"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=urllib.parse.urlencode(query)))


class Database:
    """The run's PostgreSQL: its own durable server, a Patroni cluster of two nodes
    (``--replication``), or a fresh database on ``DATABASE_URL``'s server."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.local: LocalPostgres | None = None
        self.cluster: PatroniCluster | None = None
        self.url = ""
        """The run's database, reached directly (the harness's own view: no fault proxy)."""
        self._admin_url = ""
        self._created_db = ""

    async def start(self) -> None:
        s = self._settings
        if s.replicated:
            self.cluster = PatroniCluster(synchronous=s.replication == "sync")
            await self.cluster.start()
            self._admin_url = self.cluster.dsn()
        elif s.database_url is None:
            # fsync on: a restart must not be survivable only thanks to luck. The commit
            # timestamps let the checks tell exactly when a rule's disable committed.
            self.local = LocalPostgres(durable=True, settings={"track_commit_timestamp": "on"})
            await asyncio.to_thread(self.local.start)
            self._admin_url = self.local.url
        else:
            self._admin_url = s.database_url
        # A database of its own, so that the checks see nothing but this run's rows.
        name = f"chaos_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(self._admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self._created_db = name
        head, sep, query = self._admin_url.partition("?")
        base, _, _ = head.rpartition("/")
        self.url = f"{base}/{name}{sep}{query}"

    def describe(self) -> str:
        if self.cluster is not None:
            return f"Patroni: 2 nodes, {self.cluster.mode} replication"
        return "one PostgreSQL (durable)" if self.local is not None else "DATABASE_URL's server"

    def upstreams(self) -> list[tuple[str, int]]:
        """The server addresses the apis reach (each gets a fault proxy of its own)."""
        if self.cluster is not None:
            return [("127.0.0.1", n.pg_port) for n in self.cluster.nodes]
        parts = urllib.parse.urlsplit(self.url)
        out = []
        for host in parts.netloc.rpartition("@")[2].split(","):
            name, _, port = host.rpartition(":")
            out.append((name or "127.0.0.1", int(port or 5432)))
        return out

    def url_through(self, addresses: list[str]) -> str:
        """The run's database through ``addresses`` (the proxies), for the apis."""
        return with_hosts(self.url, addresses, read_write=len(addresses) > 1)

    async def restart(self) -> float:
        """A fast restart of the primary on the same port and data; returns the seconds it took
        (with Patroni: its REST restart of the leader)."""
        began = time.monotonic()
        if self.cluster is not None:
            leader = await self.cluster.leader()
            if leader is None:
                raise RuntimeError("no primary to restart")
            await self.cluster.restart(leader)
            down = time.monotonic() - began
            # A restarted primary has no synchronous standby until the standby reconnects, and
            # Patroni promotes only a synchronous one: the next fault waits for it.
            await self.cluster.wait_ready(120)
            return down
        assert self.local is not None, "cannot restart a database given by DATABASE_URL"
        await asyncio.to_thread(self.local.stop, "fast")
        await asyncio.sleep(0.5)  # down long enough for clients to notice
        await asyncio.to_thread(self.local.start)
        return time.monotonic() - began

    async def crash(self, how: str) -> float:
        """A crash of the primary's PostgreSQL, ``kill`` (kill -9 of the postmaster) or
        ``immediate`` (shutdown without a checkpoint): the next start replays WAL. Returns the
        seconds until it took writes again (with Patroni, Patroni starts it again itself)."""
        began = time.monotonic()
        if self.cluster is not None:
            leader = await self.cluster.leader()
            if leader is None:
                raise RuntimeError("no primary to crash")
            pid = leader.postmaster_pid()
            if how == "kill":
                await self.cluster.kill_postmaster(leader)
            else:
                await self.cluster.stop_immediately(leader)
            await self.cluster.until_down(leader, pid)
            await unavailable_for(self.cluster)
            down = time.monotonic() - began
            # Patroni may still be finishing (a promotion after the crash recovery): the next
            # fault needs a cluster that can take it.
            await self.cluster.wait_ready(120)
            return down
        local = self.local
        assert local is not None, "cannot crash a database given by DATABASE_URL"
        if how == "kill":
            pid = int((local.datadir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        else:
            await asyncio.to_thread(local.stop, "immediate")
        # The backends of a killed postmaster leave by themselves, soon; until they have, a
        # new postmaster refuses to start on their shared memory.
        deadline = time.monotonic() + 30
        while True:
            try:
                await asyncio.to_thread(local.start)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)  # poll interval of a condition wait
        return time.monotonic() - began

    async def failover(self, promotion_timeout: float = 45.0) -> tuple[float, float, bool]:
        """kill -9 of the whole primary node (Patroni too); Patroni promotes the standby. Then
        the old primary is started again and rejoins as a standby (pg_rewind). Returns the
        seconds without a writable primary, those until the old one streamed again, and whether
        the standby was promoted at all: Patroni promotes only a standby that is synchronous
        (in synchronous mode) or close enough (asynchronous), and otherwise waits for the old
        primary, which then takes writes again once started."""
        cluster = self.cluster
        assert cluster is not None, "a failover needs --replication"
        leader = await cluster.leader()
        if leader is None:
            raise RuntimeError("no primary to fail over from")
        began = time.monotonic()
        pid = leader.postmaster_pid()
        await cluster.kill_node(leader)
        await cluster.until_down(leader, pid)
        promoted = True
        try:
            await unavailable_for(cluster, promotion_timeout)
        except TimeoutError:
            promoted = False
            log.warning("failover: the standby was not promoted in %.0fs; starting the old primary", promotion_timeout)
        if promoted:
            down = time.monotonic() - began
            await cluster.start_node(leader)
        else:
            await cluster.start_node(leader)
            await unavailable_for(cluster, 120)
            down = time.monotonic() - began
        await cluster.wait_ready(120)
        return down, time.monotonic() - began - down, promoted

    async def switchover(self) -> float:
        """A planned switchover; returns the seconds it took (until the new primary took writes)."""
        assert self.cluster is not None, "a switchover needs --replication"
        began = time.monotonic()
        await self.cluster.switchover()
        # The old primary follows the new one as its standby: wait, so that the next fault
        # finds a cluster that can take it.
        await self.cluster.wait_ready(120)
        return time.monotonic() - began

    async def close(self) -> None:
        if self.cluster is not None:
            self.cluster.keep_logs(self._settings.log_dir / "patroni")
            await self.cluster.close()
            return
        if self.local is not None:
            await asyncio.to_thread(self.local.destroy)
            return
        if self._created_db:
            with contextlib.suppress(Exception):
                conn = await asyncpg.connect(self._admin_url)
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{self._created_db}" WITH (FORCE)')
                finally:
                    await conn.close()


DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, TimeoutError)
"""What a query may raise while the database restarts (InternalClientError: asyncpg#1069)."""


class Sql:
    """A small pool of harness connections to the run's database (reconnects by itself)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._pool: asyncpg.Pool | None = None

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(self._url, min_size=0, max_size=4, timeout=5)
        async with self._pool.acquire(timeout=10) as conn:
            return list(await conn.fetch(sql, *args, timeout=30))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def close(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)
            self._pool = None


@dataclass
class Child:
    """One child process and what the harness expects of it."""

    name: str
    kind: str
    slot: int
    process: asyncio.subprocess.Process
    executor_id: str = ""
    expected_exit: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None


async def wait_serving(target: str, timeout: float = 30.0) -> None:
    """Waits quietly until ``target`` answers SERVING to a gRPC health check (over TLS when
    ``API_TLS_CA`` is set; health needs no token)."""
    deadline = time.monotonic() + timeout
    security = dataclasses.replace(client_security(), token="")
    async with open_channel(target, security) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"api {target} not SERVING after {timeout:.0f}s")
            await asyncio.sleep(0.05)


@dataclass
class Supervisor:
    """The api and executor processes of a run, by slot."""

    settings: Settings
    database_url: str
    log_dir: Path
    code_dir: Path = ROOT
    """Where the children's code is (a snapshot; see ``snapshot_code``)."""
    api_ports: list[int] = field(default_factory=list)
    apis: dict[int, Child] = field(default_factory=dict)
    executors: dict[int, Child] = field(default_factory=dict)
    everything: list[Child] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    executor_targets: dict[int, str] = field(default_factory=dict)
    """Where each executor slot reaches its api, when not directly (a fault proxy)."""
    _serial: int = 0
    _executor_serial: int = 0

    def __post_init__(self) -> None:
        if not self.api_ports:
            self.api_ports = [free_port() for _ in range(self.settings.apis)]

    def api_target(self, slot: int) -> str:
        return f"127.0.0.1:{self.api_ports[slot]}"

    @property
    def api_targets(self) -> list[str]:
        return [self.api_target(i) for i in range(len(self.api_ports))]

    def _env(self, **extra: str) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            LOG_LEVEL="WARNING",
            LEASE_SECONDS=str(s.lease_s),
            HEARTBEAT_SECONDS=str(s.heartbeat_s),
            DISPATCH_POLL_SECONDS=str(s.poll_s),
            MAX_ATTEMPTS=str(s.max_attempts),
            SHUTDOWN_GRACE_SECONDS="2",
            DB_POOL_MIN="2",
            # The services' default. It was 8: over the latency fault's 400 ms round trip that
            # many connections could not carry dispatch and ingest together (CreateEvent waited
            # 2-7 s for one), and sensors' retries went unanswered for the whole minute.
            DB_POOL_MAX="16",
            DB_STATEMENT_TIMEOUT=f"{s.statement_timeout_s:g}",
            RPC_TIMEOUT_SECONDS="5",
            RECONNECT_BACKOFF_INITIAL_SECONDS="0.05",
            RECONNECT_BACKOFF_MAX_SECONDS="1",
            RULE_CACHE_SECONDS="0.5",
            PYTHONUNBUFFERED="1",
            # A dead connection (a blackhole) is found within seconds, not gRPC's 30 (the api allows a ping every 10 s).
            EXECUTOR_KEEPALIVE_SECONDS="10",
            # The faults here are processes and the database going away; who may call is tested
            # elsewhere (tests/integration/test_auth.py), so the harness runs without tokens.
            API_INSECURE="true",
        )
        env.update(extra)
        return env

    async def _spawn(self, kind: str, slot: int, name: str, module: str, **extra: str) -> Child:
        self._serial += 1
        path = self.log_dir / f"{self._serial:03d}-{name}.log"
        with path.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                env=self._env(**extra),
                cwd=self.code_dir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        child = Child(name=name, kind=kind, slot=slot, process=process, executor_id=extra.get("EXECUTOR_ID", ""))
        self.everything.append(child)
        return child

    async def migrate(self) -> None:
        """``python -m services.api migrate`` with the snapshot's migrations."""
        path = self.log_dir / "000-migrate.log"
        with path.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.api",
                "migrate",
                env=self._env(),
                cwd=self.code_dir,
                stdout=out,
                stderr=out,
            )
            code = await process.wait()
        if code != 0:
            raise RuntimeError(f"migrations failed (exit {code}); see {path}")

    async def start_api(self, slot: int) -> Child:
        child = await self._spawn("api", slot, f"api{slot}", "services.api", API_ADDR=self.api_target(slot))
        self.apis[slot] = child
        await wait_serving(self.api_target(slot), timeout=60)
        return child

    async def start_executor(self, slot: int) -> Child:
        self._executor_serial += 1
        executor_id = f"chaos-ex{slot}-{self._executor_serial}"
        target = self.executor_targets.get(slot) or self.api_target(slot % len(self.api_ports))
        child = await self._spawn(
            "executor", slot, executor_id, "services.executor", API_TARGET=target, EXECUTOR_ID=executor_id
        )
        self.executors[slot] = child
        return child

    async def start_all(self) -> None:
        await asyncio.gather(*(self.start_api(i) for i in range(self.settings.apis)))
        for i in range(self.settings.executors):
            await self.start_executor(i)

    async def kill(self, child: Child, sig: signal.Signals = signal.SIGKILL, timeout: float = 15.0) -> None:
        """Sends ``sig`` (SIGKILL after ``timeout`` if it is still alive) and reaps the child."""
        child.expected_exit = True
        if not child.running:
            return
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(sig)
        try:
            await asyncio.wait_for(child.process.wait(), timeout)
        except TimeoutError:
            log.warning("%s ignored %s for %.0fs; killing it", child.name, sig.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            await child.process.wait()

    def signal(self, child: Child, sig: signal.Signals) -> None:
        if child.running:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(sig)

    def check_unexpected_exits(self) -> list[Child]:
        """Children that ended without being told to; recorded once each."""
        dead = [c for c in [*self.apis.values(), *self.executors.values()] if not c.running and not c.expected_exit]
        for c in dead:
            c.expected_exit = True
            self.unexpected.append(f"{c.name} (pid {c.pid}) exited by itself with code {c.process.returncode}")
        return dead

    async def close(self) -> None:
        """Ends every child still running: SIGCONT (in case it is stopped), then SIGKILL."""
        for child in self.everything:
            child.expected_exit = True
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGCONT)
                    child.process.kill()
        for child in self.everything:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.process.wait(), 10)

    async def stop_gracefully(self) -> None:
        """SIGTERM to everyone (executors first), SIGKILL to whoever lingers."""
        await asyncio.gather(*(self.kill(c, signal.SIGTERM, 10) for c in self.executors.values()))
        await asyncio.gather(*(self.kill(c, signal.SIGTERM, 10) for c in self.apis.values()))
