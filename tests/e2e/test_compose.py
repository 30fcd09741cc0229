"""The compose cluster, end to end: the project's docker-compose.yml, unchanged, on a real engine.

``up --wait`` from nothing; the file's header commands exactly as written (CA out, a token,
grpcurl list); the README walkthrough against it (PROCESSED with resolved_at, the execution's
config); a signed webhook on the web service; both Prometheus targets up; ``restart api`` and a
kill -9 of the executor's process, after which the pipeline still resolves; ``down -v`` leaving
no container, network or volume of the project.

Runs only with ``TEST_COMPOSE=1`` (``.ci/run`` sets it; it needs the images compose names, which
``./dev images`` provides); there it fails, never skips, when something is missing. The project
gets a name of its own (COMPOSE_PROJECT_NAME), so a cluster of yours is left alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.readme_support import section, shell_blocks
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DATABASE = "postgresql://automation:automation@127.0.0.1:5433/automation"

pytestmark = [
    pytest.mark.compose,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        os.environ.get("TEST_COMPOSE") != "1",
        reason="the compose cluster test runs with TEST_COMPOSE=1 on a Docker engine (.ci/run does)",
    ),
]


@dataclass
class Project:
    env: dict[str, str]
    cwd: Path
    name: str

    async def sh(self, script: str, timeout: float = 300) -> str:
        """Runs ``script`` with bash (errexit, pipefail) in the project's environment; its stdout."""
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"{script}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    async def compose(self, *args: str, timeout: float = 300) -> str:
        return await self.sh(" ".join(["docker", "compose", *args]), timeout)


@pytest.fixture
async def project(tmp_path: Path) -> AsyncIterator[Project]:
    assert shutil.which("docker"), "no docker client"
    name = f"automation-e2e-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "COMPOSE_FILE": str(COMPOSE_FILE),
        "COMPOSE_PROJECT_NAME": name,
        # grpcurl and the project's python, as the README has them on PATH.
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    p = Project(env, tmp_path, name)
    await p.compose("version")
    try:
        yield p
    finally:
        logs = await asyncio.to_thread(
            subprocess.run,
            ["docker", "compose", "logs", "--no-color", "--tail", "40"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr)
        # The images compose built for this throwaway project name go too: every run builds its own.
        await p.compose("down", "-v", "--rmi", "local", "--remove-orphans", "--timeout", "20")


def header_commands() -> list[str]:
    """The shell lines of the compose file's header, from `docker compose cp` to grpcurl."""
    lines = [line[4:] for line in COMPOSE_FILE.read_text().splitlines() if line.startswith("#   ")]
    text = "\n".join(lines).replace("\\\n", " ")
    commands = [c.strip() for c in text.splitlines()]
    start = next(i for i, c in enumerate(commands) if c.startswith("docker compose cp"))
    end = next(i for i, c in enumerate(commands) if c.startswith("grpcurl"))
    return commands[start : end + 1]


def walkthrough_block() -> list[list[str]]:
    """The grpcurl commands of the README walkthrough's first block."""
    return next(b for b in shell_blocks() if b)


async def pending(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM enforcement WHERE status = 'created'"))


async def nothing_pending(db: asyncpg.Connection) -> bool | None:
    return True if await pending(db) == 0 else None


async def grpcurl_lines(p: Project, block: list[list[str]]) -> list[str]:
    """The README's grpcurl commands as shell lines, with the CA the header took out."""
    token = p.env["AUTOMATION_TOKEN"]
    ours = [
        [a.replace(".data/certs/ca.pem", "ca.pem").replace("$AUTOMATION_TOKEN", token) for a in args] for args in block
    ]
    return [shlex.join(["grpcurl", *args]) for args in ours]


async def test_the_compose_cluster_end_to_end(project: Project) -> None:
    p = project
    await p.compose("up", "--wait", "--quiet-pull", timeout=900)

    # The header, exactly as written, in one shell: the token works at once.
    header = header_commands()
    assert header[0].startswith("docker compose cp ") and header[-1].startswith("grpcurl ")
    listed, _, token = (await p.sh("\n".join([*header, 'echo "TOKEN=$AUTOMATION_TOKEN"']))).rpartition("TOKEN=")
    assert "automation.v1.EventService" in listed and "grpc.health.v1.Health" in listed
    token = token.strip()
    assert token and "\n" not in token
    p.env["AUTOMATION_TOKEN"] = token

    # migrate finds its migrations from any working directory.
    await p.compose("run", "--rm", "-T", "-w", "/tmp", "migrate", "python", "-m", "services.api", "migrate")

    db = await asyncpg.connect(DATABASE)
    try:
        await walkthrough(p, db)
        await webhook(p, db)
        await prometheus_targets_up()
        await survives_restarts(p, db)
    finally:
        await db.close()

    await p.compose("down", "-v", "--timeout", "20")
    left = await p.sh(
        f"docker ps -aq --filter label=com.docker.compose.project={p.name}; "
        f"docker network ls -q --filter label=com.docker.compose.project={p.name}; "
        f"docker volume ls -q --filter label=com.docker.compose.project={p.name}"
    )
    assert left.strip() == "", left


async def walkthrough(p: Project, db: asyncpg.Connection) -> None:
    """The README walkthrough's main block: PROCESSED with resolved_at, the execution's config."""
    main = walkthrough_block()
    outputs = []
    for line in await grpcurl_lines(p, main):
        outputs.append(await p.sh(line))
        if "/CreateEvent" in line:
            await eventually(lambda: nothing_pending(db), timeout=60, what="the executor to resolve the event")
    enforcements = json.loads(outputs[-2])["enforcements"]
    assert enforcements[0]["status"] == "ENFORCEMENT_STATUS_PROCESSED" and "resolved_at" in enforcements[0]
    execution = json.loads(outputs[-1])["executions"][0]
    assert execution["config"] == {"message": "hello Ada", "count": 3}


async def webhook(p: Project, db: asyncpg.Connection) -> None:
    """The Webhooks section: UpdateTrigger by grpcurl, then its signed curl delivery to the web service."""
    # The Webhooks section's UpdateTrigger is the README's first (the Schemas section has one too).
    block = next(b for b in shell_blocks() if any(a.endswith("/UpdateTrigger") for args in b for a in args))
    (line,) = await grpcurl_lines(p, block)
    trigger = json.loads(await p.sh(line))
    (script,) = [b for b in re.findall(r"```sh\n(.*?)```", section("Webhooks"), flags=re.S) if "\ncurl " in b]
    answer = json.loads(await p.sh(script.replace("KEY=wh_...", f"KEY={trigger['webhook_key']}")))
    assert answer["hmac_verified"] is True and answer["trigger_ref"] == "core.webhook"
    payload = await db.fetchval("SELECT payload FROM event WHERE id = $1", int(answer["event_id"]))
    assert json.loads(payload) == {"action": "greet", "name": "Hook"}


async def prometheus_targets_up() -> None:
    def targets() -> dict[str, str]:
        with urllib.request.urlopen("http://127.0.0.1:9090/api/v1/targets", timeout=5) as r:
            data = json.load(r)["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in data}

    async def all_up() -> dict[str, str] | None:
        found = await asyncio.to_thread(targets)
        return found if len(found) >= 2 and set(found.values()) == {"up"} else None

    up = await eventually(all_up, timeout=60, what="both Prometheus targets up")
    assert len(up) == 2, up


async def survives_restarts(p: Project, db: asyncpg.Connection) -> None:
    """`restart api`, then kill -9 of the executor's process: new events still resolve."""
    create = next(line for line in await grpcurl_lines(p, walkthrough_block()) if "/CreateEvent" in line)
    await p.compose("restart", "api")
    await p.compose("up", "--wait", "--no-recreate", timeout=300)
    await p.sh(create)
    await eventually(lambda: nothing_pending(db), timeout=90, what="resolution after the api restarted")

    container = (await p.compose("ps", "-q", "executor")).strip()
    pid = (await p.sh(f"docker inspect -f '{{{{.State.Pid}}}}' {container}")).strip()
    await p.sh(f"kill -9 {pid}")
    await eventually(lambda: _restarted(p, container), timeout=60, what="the executor restarted by its restart policy")
    await p.sh(create)
    await eventually(lambda: nothing_pending(db), timeout=90, what="resolution after the executor was killed")
    assert await db.fetchval("SELECT count(*) FROM enforcement WHERE status = 'processed'") >= 3


async def _restarted(p: Project, container: str) -> bool | None:
    state = json.loads(await p.sh(f"docker inspect -f '{{{{json .State}}}}' {container}"))
    count = int((await p.sh(f"docker inspect -f '{{{{.RestartCount}}}}' {container}")).strip())
    return True if state["Running"] and count >= 1 else None
