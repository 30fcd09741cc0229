"""What the tests of WatchEnforcements and dispatch share: a ``Watch`` reads one stream in a
background task and keeps every message in arrival order; ``pending``, ``setup`` and ``state``
make the work it is handed and read the api's dispatch state.

Where a test must show that something is *not* delivered, it waits for further heartbeats
(``Watch.beats``): the server sends one only after a round of its loop in which it had nothing
(more) to hand out, so two more heartbeats mean two rounds that delivered nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from shared.gen.automation.v1 import enforcement_pb2, event_pb2, rule_pb2
from tests.conftest import Stubs
from tests.helpers import eventually, new_event, rule


class Watch:
    """One WatchEnforcements stream, read in the background."""

    def __init__(self, stubs: Stubs, executor_id: str, max_in_flight: int = 0, **kw: Any) -> None:
        self.executor_id = executor_id
        self.call = stubs.enforcements.WatchEnforcements(
            enforcement_pb2.WatchEnforcementsRequest(executor_id=executor_id, max_in_flight=max_in_flight, **kw)
        )
        self.messages: list[enforcement_pb2.WatchEnforcementsResponse] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.call:
                self.messages.append(msg)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        except asyncio.CancelledError:
            pass
        finally:
            self.ended.set()

    @property
    def deliveries(self) -> list[enforcement_pb2.Delivery]:
        return [m.delivery for m in self.messages if m.WhichOneof("kind") == "delivery"]

    @property
    def heartbeats(self) -> list[enforcement_pb2.Heartbeat]:
        return [m.heartbeat for m in self.messages if m.WhichOneof("kind") == "heartbeat"]

    @property
    def ids(self) -> list[int]:
        return [d.enforcement.id for d in self.deliveries]

    async def delivered(self, n: int) -> list[enforcement_pb2.Delivery]:
        """Waits until at least ``n`` deliveries arrived; returns them all."""

        async def check() -> bool:
            return len(self.deliveries) >= n

        await eventually(check, what=f"{n} deliveries to {self.executor_id}")
        return self.deliveries

    async def beats(self, n: int = 2) -> None:
        """Waits for ``n`` more heartbeats: rounds of the server loop with nothing more to deliver."""
        target = len(self.heartbeats) + n

        async def check() -> bool:
            return len(self.heartbeats) >= target

        await eventually(check, what=f"{n} more heartbeats to {self.executor_id}")

    async def failed(self) -> grpc.aio.AioRpcError:
        await asyncio.wait_for(self.ended.wait(), 15)
        assert self.error is not None
        return self.error

    async def close(self) -> None:
        self.call.cancel()
        await self._task


async def pending(stubs: Stubs, n: int, trigger_ref: str = "core.webhook") -> list[int]:
    """Creates ``n`` events of ``trigger_ref`` one after the other; returns their enforcement ids."""
    ids: list[int] = []
    for i in range(n):
        resp = await stubs.events.CreateEvent(event_pb2.CreateEventRequest(event=new_event(trigger_ref, {"i": i})))
        ids.extend(e.id for e in resp.enforcements)
    return ids


async def setup(stubs: Stubs, *rules: rule_pb2.Rule) -> None:
    rules = rules or (rule("demo.a", "core.webhook"),)
    for trigger in sorted({r.trigger_ref for r in rules}):
        await stubs.rules.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=trigger)))
    for r in rules:
        await stubs.rules.CreateRule(rule_pb2.CreateRuleRequest(rule=r))


async def state(stubs: Stubs, **kw: Any) -> enforcement_pb2.GetDispatchStateResponse:
    return await stubs.enforcements.GetDispatchState(enforcement_pb2.GetDispatchStateRequest(**kw))
