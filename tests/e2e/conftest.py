"""Real processes: the api and executors started as ``python -m services.*`` subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from shared.gen.automation.v1 import enforcement_pb2_grpc, event_pb2_grpc, rule_pb2_grpc
from shared.transport import ClientSecurity
from tests.helpers import TOKENS
from tests.helpers import channel as operator_channel
from tools import certs
from tools.healthcheck import wait_serving
from tools.postgres import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    """Processes of one test, all stopped at teardown."""

    database_url: str
    log_dir: Path
    port: int = field(default_factory=free_port)
    api: asyncio.subprocess.Process | None = None
    executors: list[asyncio.subprocess.Process] = field(default_factory=list)
    tls: bool = False
    """The api speaks TLS with a certificate from a CA made here (``ca``); its clients trust it."""
    _n: int = 0

    @property
    def ca(self) -> Path:
        return self.log_dir / "certs" / "ca.pem"

    def _tls_env(self) -> dict[str, str]:
        if not self.tls:
            return {}
        certs.ensure(self.log_dir / "certs", ("localhost", "127.0.0.1"), ())
        return {
            "API_TLS_CERT": str(self.log_dir / "certs" / "api.pem"),
            "API_TLS_KEY": str(self.log_dir / "certs" / "api-key.pem"),
            "API_TLS_CA": str(self.ca),
        }

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
            LEASE_SECONDS="2",
            HEARTBEAT_SECONDS="0.5",
            DISPATCH_POLL_SECONDS="0.2",
            SHUTDOWN_GRACE_SECONDS="3",
            RECONNECT_BACKOFF_MAX_SECONDS="0.5",
        )
        env.update(self._tls_env())
        env.update(extra)
        return env

    async def _spawn(self, module: str, name: str, **extra: str) -> asyncio.subprocess.Process:
        self._n += 1
        # The child keeps its own descriptor of the log; ours is closed right away.
        with (self.log_dir / f"{self._n:02d}-{name}.log").open("wb") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, env=self._env(**extra), cwd=ROOT, stdout=log, stderr=log
            )

    async def start_api(self) -> None:
        self.api = await self._spawn("services.api", "api")
        await wait_serving(self.target, timeout=30, security=ClientSecurity(ca=str(self.ca)) if self.tls else None)

    async def stop_api(self) -> None:
        if self.api is not None and self.api.returncode is None:
            self.api.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.api.wait(), 20)

    async def start_executor(self, executor_id: str = "", **env: str) -> asyncio.subprocess.Process:
        # Executors authenticate as a test database's executor principal (tests/helpers.py).
        extra = {"API_TOKEN": TOKENS["executor"], **({"EXECUTOR_ID": executor_id} if executor_id else {})}
        proc = await self._spawn("services.executor", executor_id or "executor", **extra, **env)
        self.executors.append(proc)
        return proc

    async def stop_executor(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)

    async def close(self) -> None:
        for proc in [*self.executors, *([self.api] if self.api else [])]:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture
async def cluster(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    c = Cluster(db_url, tmp_path)
    try:
        yield c
    finally:
        await c.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(c.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    setattr(item, f"rep_{report.when}", report)  # type: ignore[attr-defined]
    return report


@dataclass
class Client:
    events: event_pb2_grpc.EventServiceAsyncStub
    enforcements: enforcement_pb2_grpc.EnforcementServiceAsyncStub
    rules: rule_pb2_grpc.RuleServiceAsyncStub


@pytest.fixture
async def client_factory() -> AsyncIterator[Callable[[str], Client]]:
    channels: list[grpc.aio.Channel] = []

    def make(target: str) -> Client:
        channel = operator_channel(target)
        channels.append(channel)
        return Client(
            events=event_pb2_grpc.EventServiceStub(channel),
            enforcements=enforcement_pb2_grpc.EnforcementServiceStub(channel),
            rules=rule_pb2_grpc.RuleServiceStub(channel),
        )

    yield make
    for channel in channels:
        await channel.close()
