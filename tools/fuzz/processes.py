"""PostgreSQL, the api and the executor of a fuzz run, and their memory.

The children run a snapshot of the code (``tools.chaos.processes.snapshot_code``): other
people edit the tree while a run goes on, and every child must run what was migrated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from services.api.migrate import migrate_url
from tools.chaos.processes import snapshot_code
from tools.healthcheck import wait_serving
from tools.postgres import LocalPostgres, free_port


class Database:
    """The run's database: a throwaway server of its own, or the one given (left in place)."""

    def __init__(self, url: str | None) -> None:
        self._given = url
        self.local: LocalPostgres | None = None
        self.url = url or ""

    async def start(self, migrations: Path) -> None:
        if self._given is None:
            self.local = LocalPostgres()
            await asyncio.to_thread(self.local.start)
            name = f"fuzz_{uuid.uuid4().hex[:8]}"
            conn = await asyncpg.connect(self.local.url)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()
            self.url = self.local.url.rsplit("/", 1)[0] + f"/{name}"
        await migrate_url(self.url, migrations)

    async def close(self) -> None:
        if self.local is not None:
            await asyncio.to_thread(self.local.destroy)


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    log: Path
    peak_rss_kb: int = 0
    last_rss_kb: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Cluster:
    """The api and one executor, as ``python -m services.*`` subprocesses."""

    database_url: str
    log_dir: Path
    code_dir: Path
    port: int = field(default_factory=free_port)
    api: Child | None = None
    executor: Child | None = None
    own_peak_rss_kb: int = 0
    """This process's (the fuzzer's) peak, for the record: it builds big requests too."""
    executor_token: str = ""
    """With many principals: the api authenticates, and the executor uses this token."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            API_ADDR=self.target,
            API_TARGET=self.target,
            LOG_LEVEL="INFO",
            # The fuzzer's watch streams take enforcements and drop them at once; each such
            # hand-out counts an attempt, and the ordinary traffic's must not run out of them.
            MAX_ATTEMPTS="1000",
            LEASE_SECONDS="5",
            HEARTBEAT_SECONDS="1",
            DISPATCH_POLL_SECONDS="0.5",
            SHUTDOWN_GRACE_SECONDS="3",
            RECONNECT_BACKOFF_MAX_SECONDS="1",
            PYTHONUNBUFFERED="1",
            # The fuzzer tests what the api does with what it is sent, on every method: no
            # credentials, so that no call stops at the door (an api without authentication
            # ignores the variable).
            API_INSECURE="false" if self.executor_token else "true",
        )
        env.update(extra)
        return env

    async def _spawn(self, name: str, module: str, **extra: str) -> Child:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
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
        return Child(name, process, log)

    async def start(self) -> None:
        self.api = await self._spawn("api", "services.api")
        await wait_serving(self.target, timeout=60)
        token = {"API_TOKEN": self.executor_token} if self.executor_token else {}
        self.executor = await self._spawn("executor", "services.executor", EXECUTOR_ID="fuzz-executor", **token)

    @property
    def children(self) -> list[Child]:
        return [c for c in (self.api, self.executor) if c is not None]

    async def sample_rss(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        """Peak VmRSS of each child, sampled every second until ``stop``."""
        while not stop.is_set():
            for child in self.children:
                kb = rss_kb(child.pid) if child.running else None
                if kb is not None:
                    child.last_rss_kb = kb
                    child.peak_rss_kb = max(child.peak_rss_kb, kb)
            self.own_peak_rss_kb = max(self.own_peak_rss_kb, rss_kb(os.getpid()) or 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    async def close(self) -> None:
        """SIGTERM, then SIGKILL to whoever lingers; executor first (it talks to the api)."""
        for child in reversed(self.children):
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(child.process.wait(), 10)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
                    await child.process.wait()


def snapshot(into: Path) -> Path:
    return snapshot_code(into)
