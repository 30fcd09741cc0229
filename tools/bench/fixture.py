"""PostgreSQL and the real processes the benchmarks drive.

``Cluster`` is one PostgreSQL server (a durable ``LocalPostgres``, fsync on, unless
``DATABASE_URL`` names one) on which each scenario gets a fresh, migrated database. With
``store="timescale"`` the server must have TimescaleDB preloaded: the local one is started with
it (and kept between runs under the cache directory, with the 90-day fixture of ``steady.py``),
or ``DATABASE_URL`` names such a server (the compose ``db`` service, a local build, any other).
``Proc`` is an api or executor subprocess, with its resident memory read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc

from services.api.migrate import migrate_url
from shared.transport import ClientSecurity, open_channel
from tools.healthcheck import wait_serving
from tools.postgres import LocalPostgres, free_port

from .report import progress

ROOT = Path(__file__).resolve().parents[2]
# The services log each resolution at INFO; at thousands per second that is a measurable cost
# that has nothing to do with the pipeline, so the benchmark runs them at WARNING.
SERVICE_LOG_LEVEL = "WARNING"


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


STORES = ("plain", "timescale")
TIMESCALE_SETTINGS = {"shared_preload_libraries": "'timescaledb'", "timescaledb.telemetry_level": "off"}


def cache_dir() -> Path:
    """Where the bench keeps what is slow to build (``BENCH_CACHE_DIR``, else under /var/tmp)."""
    # Not under ~/.cache: as root, the server runs as the postgres user, who cannot enter /root.
    return Path(os.environ.get("BENCH_CACHE_DIR") or f"/var/tmp/automation-bench-{os.getuid()}")


class StoreUnavailable(RuntimeError):
    """The store asked for cannot be had here; the message says how to get one."""


async def timescaledb_version(url: str) -> str | None:
    """The TimescaleDB a server can load for a new database, or None (not installed or not
    preloaded, in which case the migrations make plain tables)."""
    conn = await asyncpg.connect(url)
    try:
        preloaded = await conn.fetchval("SELECT current_setting('timescaledb.disable_load', true) IS NOT NULL")
        version = await conn.fetchval("SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'")
    finally:
        await conn.close()
    return str(version) if preloaded and version else None


def _local_timescaledb() -> bool:
    from tools.postgres import find_bindir

    libdir = find_bindir().parent / "lib"
    if not (libdir / "timescaledb.so").exists():
        # Debian keeps the server's libraries under /usr/lib/postgresql/<major>/lib.
        return any(Path("/usr/lib/postgresql").glob("*/lib/timescaledb.so"))
    return True


@dataclass
class Cluster:
    """The PostgreSQL server of the run and the databases made on it."""

    admin_url: str
    server: LocalPostgres | None = None
    databases: list[str] = field(default_factory=list)
    store: str = "plain"
    keep_server: bool = False
    """A server whose data directory outlives the run (the TimescaleDB cache): stopped, not removed."""

    @classmethod
    async def start(cls, store: str = "plain") -> Cluster:
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES}")
        if url := os.environ.get("DATABASE_URL"):
            progress("using DATABASE_URL")
            if store == "timescale" and await timescaledb_version(url) is None:
                raise StoreUnavailable(
                    "DATABASE_URL names a server without TimescaleDB preloaded "
                    "(shared_preload_libraries = 'timescaledb')"
                )
            return cls(url, store=store)
        if store == "plain":
            server = LocalPostgres(durable=True)
            await asyncio.to_thread(server.start)
            progress(f"started durable PostgreSQL (fsync on) on port {server.port}")
            return cls(server.url, server)
        if not _local_timescaledb():
            raise StoreUnavailable(
                "TimescaleDB is not installed for the local PostgreSQL: set DATABASE_URL to a "
                "superuser URL of a server that preloads it (e.g. `docker compose up db`, the "
                "timescale/timescaledb image, or a build of your own)"
            )
        base = cache_dir() / "timescaledb-server"
        base.mkdir(parents=True, exist_ok=True)
        server = LocalPostgres(durable=True, settings=TIMESCALE_SETTINGS, base=base)
        await asyncio.to_thread(server.start)
        progress(f"started durable PostgreSQL with TimescaleDB (fsync on) on port {server.port}, data in {base}")
        return cls(server.url, server, store=store, keep_server=True)

    async def describe(self) -> str:
        conn = await asyncpg.connect(self.admin_url)
        try:
            version = await conn.fetchval("SHOW server_version")
            fsync = await conn.fetchval("SHOW fsync")
            sync = await conn.fetchval("SHOW synchronous_commit")
        finally:
            await conn.close()
        about = f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync}"
        if self.store == "timescale":
            about += f", TimescaleDB {await timescaledb_version(self.admin_url)}"
        return about

    async def fresh_database(self, purpose: str, code_dir: Path = ROOT) -> str:
        """A new database with the schema of ``code_dir``'s migrations; returns its URL."""
        name = f"bench_{purpose}_{uuid.uuid4().hex[:6]}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.databases.append(name)
        url = with_database(self.admin_url, name)
        await migrate_url(url, code_dir / "migrations")
        return url

    async def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        if name in self.databases:
            self.databases.remove(name)

    async def close(self) -> None:
        for name in list(self.databases):
            with contextlib.suppress(Exception):
                await self.drop(with_database(self.admin_url, name))
        if self.server is not None:
            await asyncio.to_thread(self.server.stop if self.keep_server else self.server.destroy)


def _status_kb(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, in kB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


@dataclass
class Proc:
    """One service subprocess."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        return _status_kb(self.pid, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        return _status_kb(self.pid, "VmHWM") / 1024

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self, grace: float = 15.0) -> None:
        if self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def spawn(name: str, module: str, env: dict[str, str], logdir: Path, code_dir: Path = ROOT) -> Proc:
    """Starts ``python -m module`` from ``code_dir`` (this tree, or another one the compare
    scenario measures against) with its output in ``logdir``/``name``.log."""
    log_path = logdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            env={**os.environ, "LOG_LEVEL": SERVICE_LOG_LEVEL, **env},
            cwd=code_dir,
            stdout=log,
            stderr=log,
        )
    return Proc(name, process, log_path)


@dataclass
class Services:
    """The api and its executors for one scenario."""

    database_url: str
    logdir: Path
    code_dir: Path = ROOT
    """The tree the services run from."""
    api: Proc | None = None
    target: str = ""
    executors: list[Proc] = field(default_factory=list)
    spawned: int = 0

    async def start_api(self, health: ClientSecurity | None = None, **env: str) -> str:
        """Starts the api; ``health`` says how to reach it when it speaks TLS."""
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.api = await spawn(
            "api",
            "services.api",
            # Without TLS and tokens unless a scenario asks for them (the security scenario
            # measures what they cost against this).
            {"DATABASE_URL": self.database_url, "API_ADDR": self.target, "API_INSECURE": "true", **env},
            self.logdir,
            self.code_dir,
        )
        try:
            await wait_serving(self.target, timeout=60, security=health)
        except TimeoutError:
            raise RuntimeError(f"the api did not become SERVING:\n{self.api.log_tail()}") from None
        return self.target

    async def start_executors(self, count: int, **env: str) -> None:
        for _ in range(count):
            self.spawned += 1
            self.executors.append(
                await spawn(
                    f"executor{self.spawned}",
                    "services.executor",
                    {"API_TARGET": self.target, "EXECUTOR_ID": f"bench-{self.spawned}", **env},
                    self.logdir,
                    self.code_dir,
                )
            )

    async def stop_executors(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.executors))
        self.executors.clear()

    async def stop(self) -> None:
        await self.stop_executors()
        if self.api is not None:
            await self.api.stop()
            self.api = None


@asynccontextmanager
async def services(database_url: str, code_dir: Path = ROOT) -> AsyncIterator[Services]:
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as logdir:
        s = Services(database_url, Path(logdir), code_dir)
        try:
            yield s
        finally:
            await s.stop()


@asynccontextmanager
async def channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the api, secured as the environment says (API_TLS_CA, API_TOKEN)."""
    async with open_channel(target) as ch:
        yield ch
