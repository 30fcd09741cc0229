"""The README's grpcurl walkthrough, replayed literally against real processes.

Every ``grpcurl`` line of the README's shell blocks runs through tools.grpcjson (grpcurl's
arguments, over server reflection), so a README that drifts from the api fails here.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.conftest import Cluster
from tests.helpers import eventually
from tools import grpcjson

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


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


async def run(cluster: Cluster, args: list[str]) -> tuple[int, str]:
    lines: list[str] = []
    args = [cluster.target if a == "localhost:50051" else a for a in args]
    code = await asyncio.to_thread(grpcjson.run, args, lines.append)
    return code, "\n".join(lines)


async def pending(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM enforcement WHERE status = 'created'"))


async def nothing_pending(conn: asyncpg.Connection) -> bool:
    return await pending(conn) == 0


async def test_readme_walkthrough_works_as_written(cluster: Cluster, conn: asyncpg.Connection) -> None:
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
    assert enforcements[0]["status"] == "ENFORCEMENT_STATUS_PROCESSED" and "resolvedAt" in enforcements[0]
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
    assert [e["status"] for e in disabled] == ["ENFORCEMENT_STATUS_DISABLED"] and "resolvedAt" in disabled[0]
    assert [x["config"]["message"] for x in json.loads(executions)["executions"]] == ["hello Ada"]

    ((code, out),) = [await run(cluster, args) for args in bad]
    assert code == 64 + 3, out  # grpcurl's convention: 64 + INVALID_ARGUMENT
    assert '"field": "event.trigger_ref"' in out
    assert await conn.fetchval("SELECT count(*) FROM event") == 2
