"""What the tests of ``python -m tools.cluster`` share (``test_cluster_supervisor``,
``test_cluster_ha``): the cluster's children found in /proc, one cluster process and its log,
and the trigger and rule their pipeline checks use."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from shared.gen.automation.v1 import condition_pb2, rule_pb2, rule_pb2_grpc
from shared.transport import ClientSecurity, open_channel
from tests.helpers import eventually, rule


def children(pid: int) -> dict[int, str]:
    """The live children of ``pid`` as {pid: module run with -m}.

    Found by scanning /proc for their parent pid: /proc/<pid>/task/*/children is missing on
    kernels built without CONFIG_PROC_CHILDREN, and psutil is not a dependency.
    """
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            args = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:  # it exited while we looked
            continue
        # The command name in parentheses may itself hold spaces: the fields follow the last ')'.
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        if int(ppid) == pid and state != "Z" and b"-m" in args:
            found[int(stat.parent.name)] = args[args.index(b"-m") + 1].decode()
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs one of our services (a reused pid running something else does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        args = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z" and b"services." in args


class ClusterRun:
    """One ``python -m tools.cluster`` process and what it wrote."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, target: str) -> None:
        self.proc = proc
        self.log = log
        self.target = target
        self.seen: set[int] = set()  # every child pid ever seen, to prove none outlives the cluster

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def child(self, module: str) -> int | None:
        kids = children(self.proc.pid)
        # A child caught between fork and exec still shows the cluster's own command line.
        self.seen.update(pid for pid, m in kids.items() if m.startswith("services."))
        return next((pid for pid, m in kids.items() if m == module), None)

    async def wait_log(self, pattern: str, what: str) -> re.Match[str]:
        async def found() -> re.Match[str] | None:
            return re.search(pattern, self.text())

        return await eventually(found, timeout=30, what=what)

    async def wait_child(self, module: str, other_than: int = 0) -> int:
        async def found() -> int | None:
            pid = self.child(module)
            return pid if pid not in (None, other_than) else None

        return await eventually(found, timeout=30, what=f"a running {module} child")


async def define_rule(target: str, security: ClientSecurity) -> str:
    """The trigger (its webhook enabled) and rule the checks use; returns the webhook key."""
    async with open_channel(target, security) as channel:
        rules = rule_pb2_grpc.RuleServiceStub(channel)
        trigger = await rules.CreateTrigger(
            rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="core.webhook", webhook_enabled=True))
        )
        await rules.CreateRule(
            rule_pb2.CreateRuleRequest(
                rule=rule(
                    "demo.greet",
                    "core.webhook",
                    "core.echo",
                    params={"greeting": "hello {{ event.payload.name }}"},
                    conditions=[("kind", condition_pb2.CONDITION_OPERATOR_EQUALS, "greet")],
                )
            )
        )
    return trigger.webhook_key
