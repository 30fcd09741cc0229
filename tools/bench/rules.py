"""Scenario ``rules``: ingest against a trigger with 200 rules in the rule language.

The trigger has the most a trigger may hold: 200 enabled rules of 5 condition nodes each
(1,000 nodes). 190 rules start with a top-level ``equals`` on a discriminating field (95 on
``kind``, 95 on ``service``, one value per rule), so the api's index picks them; their other
tests span every operator family (case-folded text, RE2, wildcard, numeric and timestamp
order, timediff, inside/contains and their negations, exists/nexists, nested any/not groups,
searches over a list with an item test). 10 rules have no equality guard at all (an ``all``
without ``equals``, or a top-level ``any``): every event evaluates them, and none matches.

There are 95 distinct events (cycled); event ``i`` has ``kind-i`` and ``svc-i``, so it matches
exactly rule ``i`` (kind) and rule ``95 + i`` (service): 2 enforcements, as in the ingest
scenario. Each response is checked to carry exactly 2 (a wrong matcher fails the bench).

The baseline ("raw" column) is the same scenario with 2 rules: the same events against a
trigger holding 2 rules of the same kind (a guard that every event passes, `exists`, and the
tests of two of the bodies below), both matching every event, in the same run, repetitions
alternating; the ratio is 200 rules / 2 rules. Both sides store the same number of
enforcements with conditions of the same size, so the ratio is what the other 198 rules cost.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.api import convert
from shared.gen.automation.v1 import common_pb2, condition_pb2, event_pb2, event_pb2_grpc, rule_pb2, rule_pb2_grpc

from . import workload
from .fixture import Cluster, channel, services
from .ingest import summary
from .load import ClosedResult, closed_loop
from .report import Row, progress
from .settings import Settings

TRIGGER = "bench.rules"
TWO_TRIGGER = "bench.rules_two"
TWO_RULES = ["bench.rules_two_a", "bench.rules_two_b"]
PAIRS = 95
"""Events (and kind/service values): rule i is guarded by kind, rule PAIRS + i by service."""
UNGUARDED = 10
RULES = 2 * PAIRS + UNGUARDED
CONCURRENCY = 16
Call = Callable[[], Awaitable[int]]
NOTE = "raw = the same events and rules of the same kind, 2 on the trigger (ratio = 200/2 rules, target >= 0.5)"


def test(field: str, operator: str, value: Any = None, item: dict[str, Any] | None = None) -> dict[str, Any]:
    """A test node as stored (operator names as in conditions.py)."""
    node: dict[str, Any] = {"field": field, "operator": operator}
    if value is not None:
        node["value"] = value
    if item is not None:
        node["item"] = item
    return node


# The tests after a guarded rule's equality: 4 nodes each, every one true for every event.
BODIES: list[list[dict[str, Any]]] = [
    [
        test("host", "istartswith", "WEB-"),
        test("path", "regex", r"^/api/orders/\d+$"),
        test("tags", "search", "any", test("item", "istartswith", "EU-")),
    ],
    [
        {
            "any": [
                {"not": test("user.role", "equals", "guest")},
                test("ms", "lessthan", 0),
            ]
        },
    ],
    [
        test("at", "greaterthan_or_equal", "2024-01-01T00:00:00"),
        test("ms", "lessthan_or_equal", 1000),
        test("host", "matchwildcard", "*.prod.example.com"),
        test("user.name", "icontains", "ALI"),
    ],
    [
        test(
            "items",
            "search",
            "all",
            {"all": [test("item.name", "exists"), test("item.qty", "greaterthan", 0)]},
        ),
    ],
    [
        test("status", "inside", [500, 502, 503]),
        test("tags", "ncontains", "staging"),
        test("host", "iendswith", ".COM"),
        test("user.role", "nequals", "guest"),
    ],
    [
        test("user.name", "iequals", "ALICE"),
        test("path", "matchregex", "/api/"),
        test("debug", "nexists"),
        test("at", "timediff_gt", 3600),
    ],
    [
        test("tags", "contains", "prod"),
        test("path", "startswith", "/api"),
        test("host", "iregex", r"^web-\d+\."),
        test("path", "incontains", "ADMIN"),
    ],
    [
        test("host", "endswith", ".com"),
        test("user.role", "ninside", ["guest", "bot"]),
        {"not": test("at", "timediff_lt", 60)},
    ],
]


def _unguarded(u: int) -> tuple[list[dict[str, Any]], str]:
    """Rule u of the rules without an equality guard: 5 nodes, all evaluated before it fails (an
    `all` true until its last test, or an `any` of tests that are all false)."""
    if u % 2 == 0:
        return [
            test("host", "istartswith", "web-"),
            test("path", "regex", "^/api/"),
            test("status", "greaterthan", 499),
            test("tags", "search", "any", test("item", "equals", f"never-{u}")),
        ], "all"
    return [
        test("kind", "equals", f"nope-{u}"),
        test("ms", "lessthan", 0),
        {"all": [test("host", "exists"), test("host", "nexists")]},
    ], "any"


def rule_specs() -> list[dict[str, Any]]:
    """The 200 rules: ref, conditions (stored form), condition."""
    specs = []
    for r in range(2 * PAIRS):
        guard = test("kind", "equals", f"kind-{r}") if r < PAIRS else test("service", "equals", f"svc-{r - PAIRS}")
        body = BODIES[r % len(BODIES)]
        specs.append({"ref": f"bench.rule_{r:03d}", "conditions": [guard, *body], "condition": "all"})
    for u in range(UNGUARDED):
        nodes, how = _unguarded(u)
        specs.append({"ref": f"bench.rule_free_{u}", "conditions": nodes, "condition": how})
    return specs


def payload(i: int) -> dict[str, Any]:
    """Event i: matches exactly rules i and PAIRS + i."""
    return {
        "kind": f"kind-{i}",
        "service": f"svc-{i}",
        "host": f"Web-{i}.prod.example.com",
        "path": f"/api/orders/{i}",
        "status": 500,
        "ms": 812,
        "at": "2024-05-01T12:00:00Z",
        "tags": ["prod", "eu-west", f"tier-{i % 3}"],
        "items": [{"name": "a", "qty": 2}, {"name": "b", "qty": 5}],
        "user": {"name": "Alice", "role": "admin"},
    }


def expected_refs(i: int) -> list[str]:
    return [f"bench.rule_{i:03d}", f"bench.rule_{PAIRS + i:03d}"]


def condition_message(node: dict[str, Any]) -> condition_pb2.RuleCondition:
    """A stored node as the RuleCondition message the api reads back for it."""
    out = condition_pb2.RuleCondition()
    convert.condition_node(out, node)
    return out


def two_rule_specs() -> list[dict[str, Any]]:
    """The baseline's 2 rules: the 200-rule set's kind of rule, each matching every event."""
    return [
        {"ref": TWO_RULES[0], "conditions": [test("kind", "exists"), *BODIES[0]], "condition": "all"},
        {"ref": TWO_RULES[1], "conditions": [test("service", "exists"), *BODIES[2]], "condition": "all"},
    ]


async def define(ch: grpc.aio.Channel, trigger: str, specs: list[dict[str, Any]]) -> None:
    stub: rule_pb2_grpc.RuleServiceAsyncStub = rule_pb2_grpc.RuleServiceStub(ch)
    await stub.CreateTrigger(rule_pb2.CreateTriggerRequest(trigger=rule_pb2.Trigger(ref=trigger)))
    for spec in specs:
        await stub.CreateRule(
            rule_pb2.CreateRuleRequest(
                rule=rule_pb2.Rule(
                    ref=spec["ref"],
                    trigger_ref=trigger,
                    action_ref=workload.ACTION,
                    action_params=workload.struct({"host": "{{ event.payload.host }}", "fixed": 1}),
                    conditions=[condition_message(n) for n in spec["conditions"]],
                    condition=common_pb2.ENFORCEMENT_CONDITION_ANY
                    if spec["condition"] == "any"
                    else common_pb2.ENFORCEMENT_CONDITION_ALL,
                    enabled=True,
                )
            )
        )


def new_event(trigger_ref: str, i: int) -> event_pb2.NewEvent:
    return event_pb2.NewEvent(
        trigger_ref=trigger_ref, payload=workload.struct(payload(i % PAIRS)), source_ref=workload.SOURCE
    )


async def run(cluster: Cluster, s: Settings) -> list[Row]:
    url = await cluster.fresh_database("rules")
    rows: list[Row] = []
    async with services(url) as svc:
        target = await svc.start_api()
        async with channel(target) as ch:
            await define(ch, TWO_TRIGGER, two_rule_specs())
            await define(ch, TRIGGER, rule_specs())
            stub: event_pb2_grpc.EventServiceAsyncStub = event_pb2_grpc.EventServiceStub(ch)

            # Every event once, checking which rules fired (the measured calls check counts).
            for i in range(PAIRS):
                got = await stub.CreateEvent(event_pb2.CreateEventRequest(event=new_event(TRIGGER, i)), timeout=30)
                refs = sorted(e.rule_ref for e in got.enforcements)
                assert refs == expected_refs(i), f"event {i} fired {refs}, expected {expected_refs(i)}"

            def unary(trigger: str) -> Call:
                requests = itertools.cycle(
                    [event_pb2.CreateEventRequest(event=new_event(trigger, i)) for i in range(PAIRS)]
                )

                async def call() -> int:
                    response = await stub.CreateEvent(next(requests), timeout=30)
                    assert len(response.enforcements) == 2, f"{len(response.enforcements)} enforcements"
                    return 1

                return call

            def batch(trigger: str) -> Call:
                request = event_pb2.CreateEventsRequest(events=[new_event(trigger, i) for i in range(s.batch_size)])

                async def call() -> int:
                    response = await stub.CreateEvents(request, timeout=60)
                    assert len(response.receipts) == s.batch_size
                    for receipt in response.receipts:
                        assert len(receipt.enforcement_ids) == 2, f"{len(receipt.enforcement_ids)} enforcements"
                    return s.batch_size

                return call

            two_unary, many_unary = unary(TWO_TRIGGER), unary(TRIGGER)
            two_batch, many_batch = batch(TWO_TRIGGER), batch(TRIGGER)
            await closed_loop(two_unary, 4, 0.3)
            await closed_loop(many_unary, 4, 0.3)
            await closed_loop(two_batch, 1, 0.1, max_calls=1)
            await closed_loop(many_batch, 1, 0.1, max_calls=1)

            reps = s.reps if s.quick else s.reps + 2
            two: list[ClosedResult] = []
            many: list[ClosedResult] = []
            for rep in range(reps):
                progress(f"rules unary c={CONCURRENCY} rep {rep + 1}/{reps}")
                two.append(await closed_loop(two_unary, CONCURRENCY, s.rep_s))
                many.append(await closed_loop(many_unary, CONCURRENCY, s.rep_s))
            row, _ = summary(f"rules: unary c={CONCURRENCY}, {RULES} rules", two, many, items=False)
            row.notes += f"; {NOTE}"
            rows.append(row)

            two_b: list[ClosedResult] = []
            many_b: list[ClosedResult] = []
            for rep in range(reps):
                progress(f"rules batch rep {rep + 1}/{reps}")
                two_b.append(await closed_loop(two_batch, s.batch_concurrency, s.rep_s))
                many_b.append(await closed_loop(many_batch, s.batch_concurrency, s.rep_s))
            row, _ = summary(f"rules: batch {s.batch_size}/call, {RULES} rules", two_b, many_b, items=True)
            row.notes += f"; events/s, {s.batch_concurrency} calls in flight; p50/p99 per call; {NOTE}"
            rows.append(row)
    await cluster.drop(url)
    return rows + worst_cases()


_BIG_TEXT = "ab" * 125_000
"""A 250 KB payload string: about the largest a 256 KiB payload can carry."""
WORST: dict[str, tuple[Callable[[int, int], dict[str, Any]], dict[str, Any]]] = {
    "iregex": (lambda r, k: test("s", "iregex", f"(a|b)*zq{r}_{k}"), {"s": _BIG_TEXT}),
    "matchwildcard": (lambda r, k: test("s", "matchwildcard", f"*a*b*zq{r}_{k}"), {"s": _BIG_TEXT}),
    "icontains": (lambda r, k: test("s", "icontains", f"zq{r}_{k}"), {"s": _BIG_TEXT}),
    "contains": (lambda r, k: test("s", "contains", f"zq{r}_{k}"), {"s": _BIG_TEXT}),
    # Refused once MAX_SEARCH_ITEM_TESTS item tests are spent: the figure is the time to refuse.
    "search": (lambda r, k: test("l", "search", "any", test("item", "equals", -1)), {"l": [None] * 60_000}),
}


def worst_cases() -> list[Row]:
    """The CPU one event costs against the worst triggers the api accepts (200 rules of 5 tests,
    1,000 in all, none true, each reading the whole of a 250 KB string or a 60,000-item list,
    about the longest a payload can hold), measured in-process: ingest runs such matching in a
    thread, so the figure is what one event can take from the api's CPU, not a stall of its
    event loop."""
    from services.api import conditions, matching

    rows = []
    for name, (make, payload) in WORST.items():
        rules = [
            {
                "id": r,
                "ref": f"worst.r{r}",
                "enabled": True,
                "backstop": False,
                "conditions": [make(r, k) for k in range(5)],
                "condition": "any",
            }
            for r in range(RULES)
        ]
        rule_set = conditions.RuleSet.build(rules)
        start = time.process_time()
        try:
            outcome = f"{len(rule_set.matching(matching.Facts(payload)))} rules matched"
        except matching.SearchTooCostly:
            outcome = "refused (INVALID_ARGUMENT)"
        spent = time.process_time() - start
        rows.append(
            Row(
                f"rules: worst trigger, 1,000 x {name}",
                p50=spent,
                notes=f"CPU of one event, in-process, one run; {outcome}",
            )
        )
    return rows
