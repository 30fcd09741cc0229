"""``./dev up --ha``: the local cluster on a replicated database, through a Patroni switchover.

``python -m tools.cluster --ha`` runs as a real process: it starts etcd and two PostgreSQL
nodes under Patroni (``tools.chaos.patroni``), points the api at their multi-host DSN, and
prints where each part is. The test reads the banner, runs an event through the pipeline,
moves the primary with a switchover through Patroni's REST API (as an operator would), checks
that the pipeline goes on by itself and that the event is on the new primary, then stops the
cluster with SIGINT and checks that nothing it started is left. Without patroni or etcd it fails
saying how to install them.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest

from shared.gen.automation.v1 import common_pb2, enforcement_pb2, enforcement_pb2_grpc, event_pb2, event_pb2_grpc
from shared.transport import ClientSecurity, open_channel
from tests.e2e.cluster_support import ClusterRun, alive, define_rule
from tests.helpers import eventually, new_event
from tools.chaos.patroni import require_tools
from tools.healthcheck import wait_serving
from tools.postgres import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


async def processed(target: str, name: str, security: ClientSecurity) -> None:
    """An event sent now (again under its request id while the api answers UNAVAILABLE) is
    resolved PROCESSED by the cluster's executor."""
    async with open_channel(target, security) as channel:
        events = event_pb2_grpc.EventServiceStub(channel)
        enforcements = enforcement_pb2_grpc.EnforcementServiceStub(channel)
        request = event_pb2.CreateEventRequest(
            event=new_event("core.webhook", {"kind": "greet", "name": name}, request_id=name)
        )

        async def created() -> event_pb2.CreateEventResponse | None:
            try:
                return await events.CreateEvent(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return None

        (enforcement,) = (await eventually(created, timeout=60, what=f"the event {name!r} stored")).enforcements

        async def resolved() -> bool:
            e = await enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=enforcement.id))
            return e.status == common_pb2.ENFORCEMENT_STATUS_PROCESSED

        await eventually(resolved, timeout=30, what=f"the enforcement of {name!r} to be PROCESSED")


async def leader(http: httpx.AsyncClient, rest: str) -> str | None:
    """The member Patroni names leader, once it runs; None meanwhile."""
    answer = await http.get(f"{rest}/cluster")
    for member in answer.json().get("members", []):
        if member.get("role") == "leader" and member.get("state") == "running":
            return str(member["name"])
    return None


async def stored_on(port: int, name: str) -> int:
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/automation")
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM event WHERE payload->>'name' = $1", name)
        writable = await conn.fetchval("SELECT NOT pg_is_in_recovery()")
    finally:
        await conn.close()
    assert writable, f"the node on {port} is not the primary"
    return count


def left_behind(base: str) -> list[int]:
    """Processes whose command line names the cluster's directory (Patroni, PostgreSQL, etcd)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if base.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # it exited while we looked
            continue
    return found


async def test_dev_up_ha_keeps_the_pipeline_through_a_switchover(tmp_path: Path) -> None:
    require_tools()
    target = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(
        API_ADDR=target,
        API_TARGET=target,
        WEB_ADDR=f"127.0.0.1:{free_port()}",
        CLUSTER_METRICS_PORT="0",
        LOG_LEVEL="INFO",
        LEASE_SECONDS="2",
        HEARTBEAT_SECONDS="0.5",
        DISPATCH_POLL_SECONDS="0.2",
        SHUTDOWN_GRACE_SECONDS="3",
        RECONNECT_BACKOFF_MAX_SECONDS="0.5",
        DEV_DATA_DIR=str(tmp_path / "data"),
    )
    log = tmp_path / "cluster.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tools.cluster", "--ha", "--executors", "1", env=env, cwd=ROOT, stdout=out, stderr=out
        )
    cluster = ClusterRun(proc, log, target)
    base = ""
    try:

        async def banner() -> str | None:
            assert proc.returncode is None, "the cluster exited before its banner"
            return cluster.text() if "Ctrl-C stops everything" in cluster.text() else None

        text = await eventually(banner, timeout=180, what="the banner")
        # The banner says where everything is: the nodes and their roles, etcd, the DSN, Patroni.
        base_match = re.search(r"removed on Ctrl-C \((\S+)\)", text)
        assert base_match is not None, text
        base = base_match[1]
        nodes: dict[str, str] = dict(re.findall(r"(pg\d) 127\.0\.0\.1:(\d+) \((?:primary|standby)\)", text))
        assert len(nodes) == 2 and len(re.findall(r"\(primary\)", text)) == 1, text
        assert re.search(r"synchronous replication", text) and re.search(r"etcd 127\.0\.0\.1:\d+", text)
        dsn = re.search(r"DATABASE_URL=(\S+)", text)
        assert dsn is not None and dsn[1].endswith("/automation?target_session_attrs=read-write"), text
        assert all(f"127.0.0.1:{port}" in dsn[1] for port in nodes.values())
        rests: dict[str, str] = {name: url for url, name in re.findall(r"(http://127\.0\.0\.1:\d+) \((pg\d)\)", text)}
        assert set(rests) == set(nodes), text

        ca = str(tmp_path / "data" / "certs" / "ca.pem")
        operator = (tmp_path / "data" / "tokens" / "operator").read_text().strip()
        security = ClientSecurity(ca=ca, token=operator)
        await wait_serving(target, timeout=30, security=ClientSecurity(ca=ca))
        assert cluster.child("services.executor") is not None
        await define_rule(target, security)
        await processed(target, "before", security)

        async with httpx.AsyncClient(timeout=30) as http:
            old = await eventually(lambda: leader(http, rests["pg0"]), timeout=30, what="Patroni's leader")
            new = next(n for n in nodes if n != old)

            async def switched() -> bool:
                # 412 while the candidate is not yet a healthy synchronous standby: asked again.
                answer = await http.post(f"{rests[old]}/switchover", json={"leader": old, "candidate": new})
                assert answer.status_code in (200, 412, 503), answer.text
                return answer.status_code == 200

            await eventually(switched, timeout=60, what=f"a switchover from {old} to {new}")

            async def leads() -> bool:
                return await leader(http, rests[new]) == new

            await eventually(leads, timeout=60, what=f"{new} to lead")

        # The api follows the primary by itself: the same processes, no restart.
        await processed(target, "after switchover", security)
        assert await stored_on(int(nodes[new]), "after switchover") == 1
        assert await stored_on(int(nodes[new]), "before") == 1
        assert "restarting in" not in cluster.text()

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert "cluster stopped" in cluster.text()
        assert not Path(base).exists(), "the replicated database's directory outlived the cluster"
        assert not left_behind(base), "Patroni, PostgreSQL or etcd outlived the cluster"
        assert not [pid for pid in cluster.seen if alive(pid)], "a child outlived the cluster"
    except BaseException:
        print(cluster.text()[-8000:])
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if base:
            for pid in left_behind(base):
                os.kill(pid, signal.SIGKILL)
