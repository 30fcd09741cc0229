"""The load: rules, a bounded stream of events, and rule changes made while it flows.

Every event carries a ``request_id`` (also stored in its payload as ``rid``, so that SQL can
count events per key). When a call fails with a status that may hide a commit (UNAVAILABLE,
DEADLINE_EXCEEDED, CANCELLED, ...) the driver sends the same request again, to the other api
first: that is what idempotency keys are for. An event counts as acknowledged only when a
CreateEvent answered OK, and the answer (event id, enforcement ids) is kept for the checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, struct_pb2

from shared.gen.automation.v1 import common_pb2, condition_pb2, event_pb2, event_pb2_grpc, rule_pb2, rule_pb2_grpc
from shared.transport import client_security, open_channel
from tools.chaos.settings import Settings

log = logging.getLogger("chaos")

TRIGGER = "chaos.tick"
ALWAYS = "chaos.always"
"""No conditions, never disabled: every untargeted event must have its enforcement, PROCESSED."""
KIND_A = "chaos.kind_a"
"""kind == a, never disabled."""
TOGGLE = "chaos.toggle"
"""kind == b, disabled and re-enabled every few seconds."""
TARGET = "chaos.target"
"""kind == t, never disabled: the rule targeted events name (rule_ref)."""
DOOMED = tuple(f"chaos.doomed_{i}" for i in range(1, 5))
"""kind == a, each disabled once during the run and never re-enabled."""
STEADY = (ALWAYS, KIND_A, TARGET)

# Statuses after which the request may or may not have committed: send it again, same key.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True, slots=True)
class Ack:
    """What an OK CreateEvent (or one receipt of an OK CreateEvents) answered."""

    request_id: str
    event_id: int
    enforcements: tuple[int, ...]
    target: str
    kind: str
    replayed: bool


@dataclass
class LoadStats:
    sent: int = 0
    attempts: int = 0
    retries: int = 0
    acked: int = 0
    replayed: int = 0
    gave_up: int = 0
    retried_codes: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    """Statuses the api should never answer here (bad input is impossible: we build it)."""
    started: float = 0.0
    ended: float = 0.0
    max_ack_latency_s: float = 0.0
    batches: int = 0
    """CreateEvents calls among the sends (the rest are CreateEvent)."""
    ack_times: list[float] = field(default_factory=list)
    """When each acknowledgement arrived (monotonic): the gaps are what a sensor saw of a fault."""


@dataclass
class RuleChange:
    ref: str
    enabled: bool
    at: datetime


def _value(v: str) -> struct_pb2.Value:
    return struct_pb2.Value(string_value=v)


def _rule(ref: str, kind: str | None) -> rule_pb2.Rule:
    rule = rule_pb2.Rule(
        ref=ref,
        trigger_ref=TRIGGER,
        action_ref="core.echo",
        condition=common_pb2.ENFORCEMENT_CONDITION_ALL,
        enabled=True,
    )
    rule.action_params.update({"event": "{{ event.payload.rid }}", "rule": ref})
    if kind is not None:
        rule.conditions.add(field="kind", operator=condition_pb2.CONDITION_OPERATOR_EQUALS, value=_value(kind))
    return rule


class Clients:
    """One channel per api; calls that fail retryably move on to the next api."""

    def __init__(self, targets: list[str]) -> None:
        security = client_security()  # TLS and API_TOKEN from the environment, like every client
        self.channels = [open_channel(t, security, CHANNEL_OPTIONS) for t in targets]
        self.events = [event_pb2_grpc.EventServiceStub(c) for c in self.channels]
        self.rules = [rule_pb2_grpc.RuleServiceStub(c) for c in self.channels]

    async def close(self) -> None:
        for c in self.channels:
            await c.close()

    async def rule_call(self, method: str, request: Any, give_up_s: float = 60.0) -> Any:
        """A RuleService call, retried on the apis in turn while they are unavailable."""
        deadline = time.monotonic() + give_up_s
        attempt = 0
        while True:
            stub = self.rules[attempt % len(self.rules)]
            attempt += 1
            try:
                return await getattr(stub, method)(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(min(0.05 * attempt, 0.5))


async def define_rules(clients: Clients) -> None:
    await clients.rule_call("CreateTrigger", rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=TRIGGER)))
    for ref, kind in [(ALWAYS, None), (KIND_A, "a"), (TOGGLE, "b"), (TARGET, "t"), *((d, "a") for d in DOOMED)]:
        await clients.rule_call("CreateRule", rule_pb2.CreateRuleRequest(rule=_rule(ref, kind)))


class LoadDriver:
    """Sends ``settings.total_events`` events at ``settings.rate`` per second, each until acked.

    Every ``settings.batch_every``-th send is a CreateEvents batch of ``settings.batch_size``
    events (the rest are CreateEvent calls), so that faults also land in the middle of batches.
    """

    def __init__(self, settings: Settings, clients: Clients, run_tag: str) -> None:
        self._settings = settings
        self._clients = clients
        self._tag = run_tag
        self._rng = random.Random(settings.seed)
        self.stats = LoadStats()
        self.acks: dict[str, Ack] = {}

    def _units(self) -> list[range]:
        """The sends, as ranges of event numbers: one event, or a batch."""
        s = self._settings
        units: list[range] = []
        i = 0
        while i < s.total_events:
            size = s.batch_size if s.batch_every and len(units) % s.batch_every == s.batch_every - 1 else 1
            units.append(range(i, min(i + size, s.total_events)))
            i += size
        return units

    async def run(self) -> None:
        s = self._settings
        self.stats.started = time.monotonic()
        limit = asyncio.Semaphore(s.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        for unit in self._units():
            due = self.stats.started + unit.start / s.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await limit.acquire()
            task = asyncio.create_task(self._send(unit))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _t: limit.release())
        if tasks:
            await asyncio.gather(*tasks)
        self.stats.ended = time.monotonic()

    def _event(self, i: int) -> tuple[event_pb2.NewEvent, str, str]:
        r = self._rng.random()
        kind, target = ("t", TARGET) if r < 0.2 else ("a", "") if r < 0.6 else ("b", "")
        request_id = f"{self._tag}-{i}"
        event = event_pb2.NewEvent(trigger_ref=TRIGGER, rule_ref=target, request_id=request_id, source_ref="chaos")
        event.payload.update({"rid": request_id, "kind": kind, "n": i})
        return event, kind, target

    async def _call(self, i: int, events: list[event_pb2.NewEvent]) -> list[event_pb2.EventReceipt] | None:
        """Sends ``events`` (one: CreateEvent; more: CreateEvents) until an OK answer, on the
        apis in turn; their receipts, or None after ``give_up_s``."""
        stats = self.stats
        deadline = time.monotonic() + self._settings.give_up_s
        attempt = 0
        while True:
            stub = self._clients.events[(i + attempt) % len(self._clients.events)]
            attempt += 1
            stats.attempts += 1
            try:
                if len(events) == 1:
                    one: event_pb2.CreateEventResponse = await stub.CreateEvent(
                        event_pb2.CreateEventRequest(event=events[0]), timeout=5
                    )
                    return [
                        event_pb2.EventReceipt(
                            event_id=one.event.id,
                            enforcement_ids=[e.id for e in one.enforcements],
                            replayed=one.replayed,
                        )
                    ]
                many: event_pb2.CreateEventsResponse = await stub.CreateEvents(
                    event_pb2.CreateEventsRequest(events=events), timeout=5
                )
                return list(many.receipts)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in RETRYABLE:
                    stats.retried_codes[code.name] += 1
                else:
                    stats.unexpected[f"{code.name}: {exc.details()}"[:160]] += 1
                if time.monotonic() > deadline:
                    return None
                stats.retries += 1
                await asyncio.sleep(min(0.05 * attempt, 0.5) * (0.5 + self._rng.random()))

    async def _send(self, unit: range) -> None:
        made = [self._event(i) for i in unit]
        stats = self.stats
        stats.sent += len(made)
        stats.batches += int(len(made) > 1)
        began = time.monotonic()
        receipts = await self._call(unit.start, [event for event, _, _ in made])
        if receipts is None:
            stats.gave_up += len(made)
            log.error(
                "events %s..%s: no OK answer after %.0fs; giving up",
                made[0][0].request_id,
                made[-1][0].request_id,
                self._settings.give_up_s,
            )
            return
        now = time.monotonic()
        stats.max_ack_latency_s = max(stats.max_ack_latency_s, now - began)
        for (event, kind, target), receipt in zip(made, receipts, strict=True):
            stats.acked += 1
            stats.replayed += int(receipt.replayed)
            stats.ack_times.append(now)
            self.acks[event.request_id] = Ack(
                request_id=event.request_id,
                event_id=receipt.event_id,
                enforcements=tuple(receipt.enforcement_ids),
                target=target,
                kind=kind,
                replayed=receipt.replayed,
            )


class RuleDriver:
    """Disables each doomed rule once (never re-enabled) and toggles one rule on and off."""

    def __init__(self, settings: Settings, clients: Clients) -> None:
        self._settings = settings
        self._clients = clients
        self.changes: list[RuleChange] = []
        self.toggle_period_s = 2.5

    async def _set(self, ref: str, enabled: bool) -> None:
        request = rule_pb2.UpdateRuleRequest(
            rule=rule_pb2.Rule(ref=ref, enabled=enabled), update_mask=field_mask_pb2.FieldMask(paths=["enabled"])
        )
        try:
            await self._clients.rule_call("UpdateRule", request)
        except grpc.aio.AioRpcError as exc:
            log.error("UpdateRule %s enabled=%s failed: %s %s", ref, enabled, exc.code().name, exc.details())
            return
        self.changes.append(RuleChange(ref, enabled, datetime.now(UTC)))

    async def run(self, stop: asyncio.Event) -> None:
        duration = self._settings.duration_s
        began = time.monotonic()
        doom_at = [(k + 1) / (len(DOOMED) + 1) * duration for k in range(len(DOOMED))]
        doomed = list(DOOMED)
        enabled = True
        next_toggle = self.toggle_period_s
        while not stop.is_set():
            now = time.monotonic() - began
            if doomed and now >= doom_at[0]:
                doom_at.pop(0)
                await self._set(doomed.pop(0), False)
                continue
            if now >= next_toggle:
                enabled = not enabled
                await self._set(TOGGLE, enabled)
                next_toggle += self.toggle_period_s
                continue
            wake = min([next_toggle, *doom_at[:1]]) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(wake, 0.01))
        for ref in doomed:  # a run that ended early still disables every doomed rule once
            await self._set(ref, False)
