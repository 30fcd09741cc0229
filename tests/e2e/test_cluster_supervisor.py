"""``./dev up`` survives its children: ``python -m tools.cluster`` restarts a killed executor or api.

The first test runs the cluster as a real process on a fresh test database (so no embedded
PostgreSQL), with its output in a log file: it kills the children with SIGKILL, reads what the
cluster says about them, checks that the pipeline still works, and stops it with SIGINT as
Ctrl-C would. The others drive the Supervisor in this process with small backoffs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest

from shared.gen.automation.v1 import (
    common_pb2,
    enforcement_pb2,
    enforcement_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
)
from shared.transport import ClientSecurity, open_channel
from tests.e2e.cluster_support import ClusterRun, alive, children, define_rule
from tests.helpers import eventually, holds, new_event
from tools.cluster import ChildFailed, Supervisor
from tools.healthcheck import check, wait_serving
from tools.postgres import free_port, free_ports

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


async def enforcement_processed(target: str, name: str, security: ClientSecurity) -> None:
    """An event sent now is resolved PROCESSED by the cluster's executor (a fresh channel each
    time: one that saw the api die may still be waiting out its reconnect backoff)."""
    async with open_channel(target, security) as channel:
        events = event_pb2_grpc.EventServiceStub(channel)
        enforcements = enforcement_pb2_grpc.EnforcementServiceStub(channel)
        resp = await events.CreateEvent(
            event_pb2.CreateEventRequest(event=new_event("core.webhook", {"kind": "greet", "name": name}))
        )
        (enforcement,) = resp.enforcements

        async def processed() -> bool:
            e = await enforcements.GetEnforcement(enforcement_pb2.GetEnforcementRequest(id=enforcement.id))
            return e.status == common_pb2.ENFORCEMENT_STATUS_PROCESSED

        await eventually(processed, timeout=20, what=f"the enforcement of {name!r} to be PROCESSED")


async def test_cluster_restarts_killed_children_and_stops_cleanly(db_url: str, tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    web = f"127.0.0.1:{free_port()}"
    metrics = free_ports(2)  # the api's; the executor takes the next one
    env = dict(os.environ)
    env.update(
        DATABASE_URL=db_url,
        API_ADDR=target,
        API_TARGET=target,
        WEB_ADDR=web,
        CLUSTER_METRICS_PORT=str(metrics),
        LOG_LEVEL="INFO",
        LEASE_SECONDS="2",
        HEARTBEAT_SECONDS="0.5",
        DISPATCH_POLL_SECONDS="0.2",
        SHUTDOWN_GRACE_SECONDS="3",
        RECONNECT_BACKOFF_MAX_SECONDS="0.5",
        # Certificates and tokens go here, not into the repository's .data.
        DEV_DATA_DIR=str(tmp_path / "data"),
    )
    log = tmp_path / "cluster.log"
    # The cluster and its children keep their own descriptors of the log; ours is closed at once.
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tools.cluster", "--executors", "1", env=env, cwd=ROOT, stdout=out, stderr=out
        )
    cluster = ClusterRun(proc, log, target)
    try:
        banner = await cluster.wait_log(r"executors 1 \((\d+)\)", "the banner")
        # The cluster made a CA and an operator token on its first start, and printed how to use them.
        ca = str(tmp_path / "data" / "certs" / "ca.pem")
        operator = (tmp_path / "data" / "tokens" / "operator").read_text().strip()
        assert f"export AUTOMATION_TOKEN={operator}" in cluster.text()
        security = ClientSecurity(ca=ca, token=operator)
        await wait_serving(target, timeout=30, security=ClientSecurity(ca=ca))
        executor = int(banner[1])
        assert await cluster.wait_child("services.executor") == executor
        key = await define_rule(target, security)
        await enforcement_processed(target, "before", security)
        # Both serve /metrics where the banner says.
        assert f"metrics   http://127.0.0.1:{metrics}/metrics (api); executor on {metrics + 1}" in cluster.text()
        async with httpx.AsyncClient(timeout=30) as http:
            for port in (metrics, metrics + 1):
                scraped = await http.get(f"http://127.0.0.1:{port}/metrics")
                assert scraped.status_code == 200 and "grpc_" in scraped.text
        # The web service runs too, and hands deliveries to the api with its own webhook token.
        async with httpx.AsyncClient(timeout=30) as http:
            answer = await http.post(f"http://{web}/webhooks/{key}", json={"kind": "greet", "name": "hook"})
        assert answer.status_code == 202, answer.text
        assert len(answer.json()["enforcement_ids"]) == 1

        # An executor killed outright (a poison message, say) is restarted; the rest keeps running.
        os.kill(executor, signal.SIGKILL)
        restarted = await cluster.wait_log(r"executor-1 restarted \(pid (\d+)\)", "the executor's restart")
        assert "executor-1 exited with code -9 (signal SIGKILL); restarting in 0.5s (restart #1)" in cluster.text()
        assert int(restarted[1]) != executor
        executor = await cluster.wait_child("services.executor", other_than=executor)
        assert executor == int(restarted[1])
        await enforcement_processed(target, "after executor restart", security)

        # The api too; "restarted" is said only once it is SERVING again.
        api = await cluster.wait_child("services.api")
        os.kill(api, signal.SIGKILL)
        restarted = await cluster.wait_log(r"api restarted \(pid (\d+)\)", "the api's restart")
        assert "api exited with code -9 (signal SIGKILL); restarting in 0.5s (restart #1)" in cluster.text()
        assert int(restarted[1]) != api
        assert await check(target, quiet=True, security=ClientSecurity(ca=ca))
        assert await cluster.wait_child("services.api", other_than=api) == int(restarted[1])
        # The executor lived through it and reconnects by itself.
        await enforcement_processed(target, "after api restart", security)
        assert cluster.child("services.executor") == executor
        # So does the web service: its webhooks are stored again (a sender retries a 503, as
        # told), and the console signs in and reads through the new api.
        async with httpx.AsyncClient(timeout=30, base_url=f"http://{web}") as http:

            async def delivered() -> httpx.Response | None:
                answer = await http.post(f"/webhooks/{key}", json={"kind": "greet", "name": "again"})
                assert answer.status_code in (202, 503), answer.text
                return answer if answer.status_code == 202 else None

            again = await eventually(delivered, what="a webhook stored through the restarted api")
            (enforcement_id,) = again.json()["enforcement_ids"]
            form = await http.get("/signin")  # the sign-in form's CSRF value, and its cookie
            csrf = re.search(r'name="csrf" value="([^"]*)"', form.text)
            assert csrf is not None
            signin = await http.post(
                "/signin", data={"token": operator, "next": "/enforcements", "csrf": csrf.group(1)}
            )
            assert signin.status_code == 303 and signin.headers["location"] == "/enforcements"
            page = await http.get("/enforcements")
            assert page.status_code == 200 and f'data-key="{enforcement_id}"' in page.text
        assert cluster.child("services.web") is not None

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        text = cluster.text()
        assert text.count("restarting in") == 2, "no restart during shutdown"
        assert "cluster stopped" in text
        assert len(cluster.seen) == 5  # two apis, two executors, the web service
        assert not [pid for pid in cluster.seen if alive(pid)], "a child outlived the cluster"
    except BaseException:
        print(cluster.text()[-6000:])
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in cluster.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


class Restarts:
    """The supervisor's restart lines, as the test's log capture holds them."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="cluster")
        self.caplog = caplog

    def delays(self) -> list[str]:
        return re.findall(r"restarting in ([\d.]+)s \(restart #\d+\)", "\n".join(self.caplog.messages))

    async def wait_pid(self, n: int) -> int:
        """The pid of the n-th restart, once it is logged."""

        async def restarted() -> int | None:
            pids = re.findall(r"restarted \(pid (\d+)\)", "\n".join(self.caplog.messages))
            return int(pids[n - 1]) if len(pids) >= n else None

        return await eventually(restarted, timeout=20, what=f"restart #{n}")


def executors_of_this_process() -> list[int]:
    return [pid for pid, module in children(os.getpid()).items() if module == "services.executor"]


async def test_supervisor_backoff_doubles_up_to_its_cap_and_close_ends_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    restarts = Restarts(caplog)
    # A configuration error: the executor exits with code 2 as soon as it starts, every time.
    supervisor = Supervisor({**os.environ, "EXECUTOR_MAX_IN_FLIGHT": "0"}, backoff_initial=0.1, backoff_max=0.4)
    try:
        await supervisor.start("executor-1", "services.executor")
        await restarts.wait_pid(4)
    finally:
        await supervisor.close()
    assert restarts.delays()[:4] == ["0.1", "0.2", "0.4", "0.4"]
    assert "executor-1 exited with code 2; restarting in 0.1s (restart #1)" in caplog.messages
    assert executors_of_this_process() == []


async def test_supervisor_backoff_starts_over_once_a_child_stayed_up(caplog: pytest.LogCaptureFixture) -> None:
    restarts = Restarts(caplog)
    # Nothing listens on this target: the executor lives on, reconnecting, until it is killed.
    env = {**os.environ, "API_TARGET": f"127.0.0.1:{free_port()}", "RECONNECT_BACKOFF_MAX_SECONDS": "0.5"}
    stable_after = 1.0
    supervisor = Supervisor(env, backoff_initial=0.1, backoff_max=10, stable_after=stable_after)
    try:
        pid = await supervisor.start("executor-1", "services.executor")
        for n in (1, 2):  # killed right after each start: the delay doubles
            os.kill(pid, signal.SIGKILL)
            pid = await restarts.wait_pid(n)
        assert restarts.delays() == ["0.1", "0.2"]
        # The supervisor took the child's start on its loop's clock before the restart line was
        # logged: once this clock is stable_after past now, the child has stayed up that long.
        loop = asyncio.get_running_loop()
        up_since = loop.time()
        await eventually(
            holds(lambda: loop.time() - up_since >= stable_after),
            timeout=stable_after + 10,
            what="the child to stay up stable_after",
        )
        os.kill(pid, signal.SIGKILL)
        await restarts.wait_pid(3)
        assert restarts.delays() == ["0.1", "0.2", "0.1"]
    finally:
        await supervisor.close()
    assert executors_of_this_process() == []


async def test_supervisor_first_start_fails_when_the_child_never_gets_ready() -> None:
    crashing = Supervisor({**os.environ, "EXECUTOR_MAX_IN_FLIGHT": "0"})
    with pytest.raises(ChildFailed, match=r"executor-1 did not start: exited with code 2"):
        await crashing.start("executor-1", "services.executor", ready=asyncio.Event().wait)
    await crashing.close()

    # Running but never SERVING: the check's own timeout decides, and close() still stops it.
    env = {**os.environ, "API_TARGET": f"127.0.0.1:{free_port()}"}
    never_ready = Supervisor(env)
    try:
        with pytest.raises(ChildFailed, match=r"executor-1 did not start: .* not SERVING after 0.5s"):
            await never_ready.start(
                "executor-1", "services.executor", ready=functools.partial(wait_serving, env["API_TARGET"], 0.5)
            )
        assert len(executors_of_this_process()) == 1
    finally:
        await never_ready.close()
    assert executors_of_this_process() == []
