"""Ordinary traffic beside the fuzzer: what a well-behaved sensor sends, at a steady rate.

Its own trigger and rule (with an action, so its enforcements become PROCESSED) are
protected: no generated write may name them. Every one of its calls must be answered OK, and
every enforcement it produced must be resolved by the real executor.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from shared.config import ClientSecurity
from shared.gen.automation.v1 import condition_pb2, event_pb2, event_pb2_grpc, rule_pb2, rule_pb2_grpc
from shared.transport import open_channel
from tools.fuzz.invariants import Protected
from tools.fuzz.runner import Ledger

TRIGGER = "ordinary.tick"
RULE = "ordinary.rule"
ACTION = "core.echo"


@dataclass
class TrafficStats:
    sent: int = 0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    events: set[int] = field(default_factory=set)
    enforcements: set[int] = field(default_factory=set)
    latencies_s: list[float] = field(default_factory=list)

    def latency(self, q: float) -> float:
        """The ``q`` quantile of OK calls' latency (0 when there were none)."""
        values = sorted(self.latencies_s)
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


class Ordinary:
    """CreateEvent at ``rate`` per second on its own channel, each with a deadline."""

    def __init__(self, target: str, ledger: Ledger, protected: Protected, rate: float = 20.0, token: str = "") -> None:
        # With many principals: a token of its own (sensor and operator), whom nobody else's
        # calls may slow or refuse.
        self._channel = (
            open_channel(target, ClientSecurity(token=token)) if token else grpc.aio.insecure_channel(target)
        )
        self._events = event_pb2_grpc.EventServiceStub(self._channel)
        self._rules = rule_pb2_grpc.RuleServiceStub(self._channel)
        self._ledger = ledger
        self._protected = protected
        self.rate = rate
        self.stats = TrafficStats()

    async def close(self) -> None:
        await self._channel.close()

    async def setup(self) -> None:
        """Defines (or finds, on a reused database) the trigger and the rule, and protects them."""
        try:
            trigger = await self._rules.CreateTrigger(
                rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=TRIGGER, label="ordinary traffic")),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            trigger = await self._rules.GetTrigger(rule_pb2.GetTriggerRequest(ref=TRIGGER), timeout=10)
        rule = rule_pb2.Rule(ref=RULE, trigger_ref=TRIGGER, action_ref=ACTION, enabled=True)
        rule.action_params.update({"n": "{{ event.payload.n }}", "event": "{{ event.id }}"})
        rule.conditions.add(field="kind", operator=condition_pb2.CONDITION_OPERATOR_EQUALS).value.string_value = "tick"
        try:
            created = await self._rules.CreateRule(rule_pb2.CreateRuleRequest(rule=rule), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            created = await self._rules.GetRule(rule_pb2.GetRuleRequest(ref=RULE), timeout=10)
        self._protected.add(TRIGGER, trigger.id)
        self._protected.add(RULE, created.id)

    async def run(self, stop: asyncio.Event) -> None:
        began = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        limit = asyncio.Semaphore(32)
        i = 0
        while not stop.is_set():
            due = began + i / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            await limit.acquire()
            task = asyncio.create_task(self._send(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _t: limit.release())
            i += 1
        if tasks:
            await asyncio.gather(*tasks)

    async def _send(self, i: int) -> None:
        event = event_pb2.NewEvent(trigger_ref=TRIGGER, source_ref="ordinary")
        event.payload.update({"kind": "tick", "n": i})
        self.stats.sent += 1
        began = time.monotonic()
        try:
            response = await self._events.CreateEvent(event_pb2.CreateEventRequest(event=event), timeout=10)
        except grpc.aio.AioRpcError as exc:
            self.stats.failures[f"{exc.code().name}: {(exc.details() or '')[:100]}"] += 1
            return
        self.stats.ok += 1
        self.stats.latencies_s.append(time.monotonic() - began)
        self.stats.events.add(response.event.id)
        self.stats.enforcements.update(e.id for e in response.enforcements)
        self._ledger.record_ids(events=[response.event.id], enforcements=[e.id for e in response.enforcements])
