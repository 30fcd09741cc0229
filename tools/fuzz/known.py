"""Known-nasty requests, replayed first by every fuzz run and by the regression test.

Each case is a short script of calls (setup included) sent through the engine, so every
answer is judged like a fuzzed one. They use their own namespace (``fzk.*``) and never the
ordinary traffic's trigger or rule. Files in ``tests/fuzz_regressions/`` add to them.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import field_mask_pb2, timestamp_pb2

from shared import limits
from shared.gen.automation.v1 import (
    analytics_pb2,
    common_pb2,
    condition_pb2,
    enforcement_pb2,
    event_pb2,
    execution_pb2,
    history_pb2,
    rule_pb2,
)
from tools.fuzz import catalog
from tools.fuzz.runner import Engine, typed
from tools.fuzz.strategies import Call, nest

TRIGGER = "fzk.deep"
RULE = "fzk.deep_rule"

Case = Callable[[Engine], Awaitable[None]]


async def _setup(engine: Engine) -> None:
    """A trigger and a rule that matches every event of it and copies payload values into
    the rendered config, so that a nasty payload travels all the way to the executor."""
    await typed(engine, "CreateTrigger", rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=TRIGGER)))
    rule = rule_pb2.Rule(ref=RULE, trigger_ref=TRIGGER, action_ref="core.echo")
    rule.action_params.update({"x": "{{ event.payload.a }}", "whole": "{{ event.payload }}", "id": "{{ event.id }}"})
    await typed(engine, "CreateRule", rule_pb2.CreateRuleRequest(rule=rule))


def _event(payload: dict[str, Any] | None = None, source_ref: str = "") -> event_pb2.CreateEventRequest:
    event = event_pb2.NewEvent(trigger_ref=TRIGGER, source_ref=source_ref)
    if payload is not None:
        event.payload.update(payload)
    return event_pb2.CreateEventRequest(event=event)


async def deep_payload_matching_a_rule(engine: Engine) -> None:
    # 32 JSON levels: about 96 protobuf levels in the request, which still decodes; the
    # enforcement carrying it on the watch stream would not.
    await _setup(engine)
    await typed(engine, "CreateEvent", _event({"a": nest(31, "leaf", 0, "a")}))
    await typed(engine, "CreateEvent", _event({"a": nest(31, 1, 2**48 - 1, "a")}))
    await typed(engine, "CreateEvent", _event({"a": nest(limits.MAX_JSON_DEPTH, "leaf", 0, "a")}))


async def long_source_ref(engine: Engine) -> None:
    await _setup(engine)
    await typed(engine, "CreateEvent", _event({"a": 1}, source_ref="s" * 5000))
    await typed(engine, "ListEvents", event_pb2.ListEventsRequest(source_ref="s" * 5000))


async def nul_in_refs(engine: Engine) -> None:
    await _setup(engine)
    await typed(engine, "CreateTrigger", rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref="fzk.nul\x00")))
    await typed(engine, "GetRule", rule_pb2.GetRuleRequest(ref=RULE + "\x00"))
    await typed(
        engine, "CreateEvent", event_pb2.CreateEventRequest(event=event_pb2.NewEvent(trigger_ref=TRIGGER + "\x00"))
    )
    await typed(engine, "CreateEvent", _event({"a": "nul\x00inside", "k\x00": 1}))
    await typed(engine, "ListEnforcements", enforcement_pb2.ListEnforcementsRequest(rule_ref="\x00"))


async def non_finite_numbers(engine: Engine) -> None:
    await _setup(engine)
    for value in (math.nan, math.inf, -math.inf):
        await typed(engine, "CreateEvent", _event({"a": value}))
    rule = rule_pb2.Rule(ref="fzk.nan_rule", trigger_ref=TRIGGER)
    rule.conditions.add(field="a", operator=condition_pb2.CONDITION_OPERATOR_EQUALS).value.number_value = math.nan
    await typed(engine, "CreateRule", rule_pb2.CreateRuleRequest(rule=rule))


async def page_token_from_another_list(engine: Engine) -> None:
    await _setup(engine)
    for i in range(3):
        await typed(engine, "CreateEvent", _event({"a": i}))
    first = await typed(engine, "ListEvents", event_pb2.ListEventsRequest(page_size=1))
    token = ""
    if first.answers:
        answer = first.answers[0]
        assert isinstance(answer, event_pb2.ListEventsResponse)
        token = answer.next_page_token
    if not token:
        return  # the list answered an error (judged already) or no token: nothing to feed
    for name, request in (
        ("ListEnforcements", enforcement_pb2.ListEnforcementsRequest(page_token=token)),
        ("ListRules", rule_pb2.ListRulesRequest(page_token=token)),
        ("ListTriggers", rule_pb2.ListTriggersRequest(page_token=token)),
        ("ListExecutions", execution_pb2.ListExecutionsRequest(page_token=token)),
        ("ListHistory", history_pb2.ListHistoryRequest(entity_type="execution", page_token=token)),
        ("ListEvents", event_pb2.ListEventsRequest(page_token=token, trigger_ref=TRIGGER)),
        ("ListEvents", event_pb2.ListEventsRequest(page_token=token[:-1])),
        ("ListEvents", event_pb2.ListEventsRequest(page_token=token + "A")),
    ):
        await typed(engine, name, request)


async def refs_that_almost_match(engine: Engine) -> None:
    await _setup(engine)
    for ref in (TRIGGER + "\n", TRIGGER.upper(), (TRIGGER + "x" * 300)[:300], " " + TRIGGER):
        await typed(engine, "CreateEvent", event_pb2.CreateEventRequest(event=event_pb2.NewEvent(trigger_ref=ref)))
        await typed(engine, "GetTrigger", rule_pb2.GetTriggerRequest(ref=ref))
        await typed(engine, "DeleteRule", rule_pb2.DeleteRuleRequest(ref=ref))


async def open_enums_and_extremes(engine: Engine) -> None:
    await typed(engine, "ListEnforcements", enforcement_pb2.ListEnforcementsRequest(status=99))  # type: ignore[arg-type]
    await typed(
        engine,
        "QueryEnforcementVolume",
        analytics_pb2.QueryEnforcementVolumeRequest(status=-1),  # type: ignore[arg-type]
    )
    await typed(
        engine,
        "ResolveEnforcement",
        enforcement_pb2.ResolveEnforcementRequest(id=2**63 - 1, status=7),  # type: ignore[arg-type]
    )
    await typed(engine, "GetEvent", event_pb2.GetEventRequest(id=-(2**63)))
    await typed(engine, "ListEvents", event_pb2.ListEventsRequest(page_size=-1))
    await typed(engine, "ListEvents", event_pb2.ListEventsRequest(page_size=2**31 - 1))
    far = common_pb2.TimeRange(
        start=timestamp_pb2.Timestamp(seconds=-(2**63)), end=timestamp_pb2.Timestamp(seconds=2**63 - 1, nanos=-1)
    )
    await typed(engine, "ListEvents", event_pb2.ListEventsRequest(created=far))
    await typed(engine, "QueryEventVolume", analytics_pb2.QueryEventVolumeRequest(range=far))
    await typed(
        engine,
        "UpdateRule",
        rule_pb2.UpdateRuleRequest(rule=rule_pb2.Rule(ref=RULE), update_mask=field_mask_pb2.FieldMask(paths=["id"])),
    )


async def batches_at_the_limit(engine: Engine) -> None:
    await _setup(engine)
    await typed(engine, "CreateEvents", event_pb2.CreateEventsRequest())
    one = event_pb2.NewEvent(trigger_ref=TRIGGER)
    one.payload.update({"a": "x"})
    await typed(engine, "CreateEvents", event_pb2.CreateEventsRequest(events=[one] * (limits.MAX_BATCH + 1)))
    decisions = [
        enforcement_pb2.ResolveEnforcementRequest(id=i + 1, status=common_pb2.ENFORCEMENT_STATUS_DISABLED)
        for i in range(limits.MAX_BATCH + 1)
    ]
    await typed(engine, "ResolveEnforcements", enforcement_pb2.ResolveEnforcementsRequest(decisions=decisions))


async def corrupt_bytes(engine: Engine) -> None:
    """Undecodable requests to every method: random bytes and a truncated encoding."""
    valid = _event({"a": "x" * 64}).SerializeToString()
    for method in catalog.methods():
        await engine.send(Call(method, b"\xff\xff\xff\xff", "known:raw"))
        await engine.send(Call(method, valid[: len(valid) // 2], "known:raw-truncated"))


KNOWN: dict[str, Case] = {
    "deep_payload_matching_a_rule": deep_payload_matching_a_rule,
    "long_source_ref": long_source_ref,
    "nul_in_refs": nul_in_refs,
    "non_finite_numbers": non_finite_numbers,
    "page_token_from_another_list": page_token_from_another_list,
    "refs_that_almost_match": refs_that_almost_match,
    "open_enums_and_extremes": open_enums_and_extremes,
    "batches_at_the_limit": batches_at_the_limit,
    "corrupt_bytes": corrupt_bytes,
}


# --- recorded failures -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Recorded:
    """One file of tests/fuzz_regressions/."""

    path: Path
    method: str
    payload: bytes
    observed: str


def load_recorded(directory: Path) -> list[Recorded]:
    out = []
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        observed = data.get("observed", {})
        out.append(
            Recorded(
                path=path,
                method=str(data["method"]),
                payload=base64.b64decode(data["request_b64"]),
                observed=f"{observed.get('code', '?')} {str(observed.get('message', ''))[:120]!r}",
            )
        )
    return out


async def replay_recorded(engine: Engine, recorded: Recorded) -> None:
    method = catalog.by_path(recorded.method)
    try:
        message = method.request.FromString(recorded.payload)
    except Exception:  # noqa: BLE001 - undecodable bytes are replayed as raw bytes
        await engine.send(Call(method, recorded.payload, f"replay:{recorded.path.name}"))
        return
    await engine.send(Call(method, recorded.payload, f"replay:{recorded.path.name}", message))
