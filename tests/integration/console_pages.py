"""What the console's browser tests share besides the browser itself (that is
``tests.integration.browser``'s): the demo triggers and rules they seed, events sent to them,
the real executor in this process, and an enforcement marked out of attempts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from services.executor import Executor
from shared.config import ClientSecurity, ExecutorConfig
from shared.gen.automation.v1 import condition_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import TOKENS, new_event, rule

EQUALS = condition_pb2.CONDITION_OPERATOR_EQUALS


async def seed(stubs: Stubs) -> None:
    """Two triggers (one with a webhook) and three rules."""
    for ref, hook in (("demo.alert", False), ("demo.push", True)):
        await stubs.rules.CreateTrigger(
            rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=ref, label=ref, webhook_enabled=hook))
        )
    await stubs.rules.CreateRule(
        rule_pb2.CreateRuleRequest(
            rule=rule(
                "demo.page_oncall",
                "demo.alert",
                conditions=[("severity", EQUALS, "critical")],
                params={"message": "{{ event.payload.host }} is down"},
            )
        )
    )
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.log_all", "demo.alert")))
    await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule("demo.on_push", "demo.push")))


async def emit(stubs: Stubs, trigger_ref: str, **payload: Any) -> event_pb2.CreateEventResponse:
    return await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(trigger_ref, payload)))


@asynccontextmanager
async def executor(target: str) -> AsyncIterator[None]:
    """The real executor, in this process, with the executor role."""
    ex = Executor(
        ExecutorConfig(
            target=target,
            executor_id="browser-test",
            rpc_timeout_s=5.0,
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
            security=ClientSecurity(token=TOKENS["executor"]),
        )
    )
    task = asyncio.create_task(ex.run())
    try:
        yield
    finally:
        ex.stop()
        await asyncio.wait_for(task, 15)


async def exhaust(conn: asyncpg.Connection, enforcement: int, error: str = "backend down") -> None:
    """Marks a pending enforcement out of attempts, as the api's maintenance does (with a lease
    that ran out first, so that its attempts page has something to show)."""
    await conn.execute(
        "UPDATE enforcement_dispatch SET leased_by = 'worker-7', lease_token = 'worker-7/x', attempts = 5, "
        "lease_expires_at = now() - interval '1 second' WHERE enforcement = $1",
        enforcement,
    )
    await conn.execute(
        "UPDATE enforcement_dispatch SET exhausted_at = now(), leased_by = NULL, lease_token = NULL, "
        "lease_expires_at = NULL, last_error = $2 WHERE enforcement = $1",
        enforcement,
        error,
    )
