"""Metric names, types and labels (what dashboards and alerts rely on) and bounded labels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.api.metrics import MAX_REFS, OFF, ApiMetrics
from services.executor._metrics import ExecutorMetrics
from shared.metrics import GRPC_CODES, OTHER, Capped, RpcMetrics, grpc_type, split_method

GRPC_LABELS = {"grpc_type", "grpc_service", "grpc_method"}

# name -> (type, labels): the contract documented in the README's Metrics section.
API = {
    "automation_events_created": ("counter", {"trigger_ref"}),
    "automation_enforcements_created": ("counter", {"rule_ref"}),
    "automation_enforcements_resolved": ("counter", {"status"}),
    "automation_enforcement_resolution_seconds": ("histogram", {"status"}),
    "automation_matching_seconds": ("histogram", set()),
    "automation_enforcements_pending": ("gauge", set()),
    "automation_enforcement_oldest_pending_seconds": ("gauge", set()),
    "automation_enforcements_leased": ("gauge", set()),
    "automation_enforcements_exhausted": ("gauge", set()),
    "automation_watch_streams": ("gauge", set()),
    "automation_watch_free_credit": ("gauge", set()),
    "automation_dispatch_handoffs": ("counter", set()),
    "automation_dispatch_claimed": ("counter", set()),
    "automation_notify_announcements": ("counter", set()),
    "automation_db_pool_connections": ("gauge", {"state"}),
    "automation_db_pool_waiting": ("gauge", set()),
    "automation_db_pool_max": ("gauge", set()),
    "automation_db_errors": ("counter", {"sqlstate_class"}),
    "automation_db_reads": ("counter", {"served_by"}),
    "automation_db_replica_fallbacks": ("counter", {"reason"}),
    "automation_db_replica_usable": ("gauge", set()),
    "automation_db_replica_lag_seconds": ("gauge", set()),
    "automation_events_nonconforming": ("counter", {"trigger_ref"}),
}
EXECUTOR = {
    "automation_executor_decisions": ("counter", {"outcome"}),
    "automation_executor_resolve_batch_size": ("histogram", set()),
    "automation_executor_reconnects": ("counter", set()),
    "automation_executor_in_flight": ("gauge", set()),
}


def rpc(side: str) -> dict[str, tuple[str, set[str]]]:
    return {
        f"grpc_{side}_started": ("counter", GRPC_LABELS),
        f"grpc_{side}_handled": ("counter", GRPC_LABELS | {"grpc_code"}),
        f"grpc_{side}_msg_received": ("counter", GRPC_LABELS),
        f"grpc_{side}_msg_sent": ("counter", GRPC_LABELS),
        f"grpc_{side}_handling_seconds": ("histogram", GRPC_LABELS),
    }


def families(registry: CollectorRegistry) -> dict[str, tuple[str, set[str]]]:
    """Every family's type and label names (bucket's ``le`` aside)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for family in registry.collect():
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        out[family.name] = (family.type, labels)
    return out


def touched_api() -> tuple[CollectorRegistry, ApiMetrics]:
    registry = CollectorRegistry()
    m = ApiMetrics(registry)
    now = datetime.now(UTC)
    m.events_created(["demo.a"])
    m.nonconforming(["demo.a"])
    m.enforcements_created(["demo.r"])
    m.resolved("processed", now - timedelta(seconds=1), now)
    m.matched(0.001)
    m.handed_off(1)
    m.claimed(1)
    m.announced(1)
    m.db_error("40P01")
    m.read_served("replica")
    m.replica_fallback("lag")
    m.replica_state(True, 0.1)
    m.dispatch_state(1, 2.0, 1, 0)
    m.watch(1, 31)
    return registry, m


def test_the_api_exports_exactly_the_documented_metrics() -> None:
    registry, m = touched_api()

    class Pool:
        def get_size(self) -> int:
            return 4

        def get_idle_size(self) -> int:
            return 1

        def get_max_size(self) -> int:
            return 16

    m.pool_state(Pool())
    assert families(registry) == API


def test_the_executor_exports_exactly_the_documented_metrics() -> None:
    registry = CollectorRegistry()
    m = ExecutorMetrics(registry, lambda: 3)
    m.outcomes["processed"].inc()
    m.batch_size.observe(4)
    m.reconnects.inc()
    m.resolve.handled(grpc.StatusCode.OK, 0.0)  # a method's histogram comes with its first call
    assert families(registry) == EXECUTOR | rpc("client")
    # Every method it calls has its series from the start (a rate needs the zero).
    (family,) = (f for f in registry.collect() if f.name == "grpc_client_started")
    started = {s.labels["grpc_method"] for s in family.samples}
    assert started == {"GetRule", "ResolveEnforcements", "ReleaseEnforcement", "WatchEnforcements"}


def test_rpc_metrics_have_the_grpc_ecosystem_names() -> None:
    registry = CollectorRegistry()
    m = RpcMetrics("server", registry).method("unary", "/automation.v1.EventService/CreateEvent")
    m.started.inc()
    m.handled(grpc.StatusCode.INVALID_ARGUMENT, 0.0)
    assert families(registry) == rpc("server")
    (handled,) = (f for f in registry.collect() if f.name == "grpc_server_handled")
    (sample,) = (s for s in handled.samples if s.name.endswith("_total"))
    assert sample.labels == {
        "grpc_type": "unary",
        "grpc_service": "automation.v1.EventService",
        "grpc_method": "CreateEvent",
        "grpc_code": "InvalidArgument",
    }


def test_codes_are_spelled_as_go_grpc_prometheus_spells_them() -> None:
    assert GRPC_CODES[grpc.StatusCode.OK] == "OK"
    assert GRPC_CODES[grpc.StatusCode.CANCELLED] == "Canceled"
    assert GRPC_CODES[grpc.StatusCode.DEADLINE_EXCEEDED] == "DeadlineExceeded"
    assert GRPC_CODES[grpc.StatusCode.UNAUTHENTICATED] == "Unauthenticated"
    assert len(set(GRPC_CODES.values())) == len(grpc.StatusCode) == 17


@pytest.mark.parametrize(
    ("request_streaming", "response_streaming", "kind"),
    [
        (False, False, "unary"),
        (False, True, "server_stream"),
        (True, False, "client_stream"),
        (True, True, "bidi_stream"),
    ],
)
def test_grpc_type(request_streaming: bool, response_streaming: bool, kind: str) -> None:
    assert grpc_type(request_streaming, response_streaming) == kind


def test_split_method() -> None:
    assert split_method("/automation.v1.EventService/CreateEvent") == ("automation.v1.EventService", "CreateEvent")


def test_reference_labels_are_capped() -> None:
    capped = Capped(3)
    assert [capped(v) for v in ("a", "b", "a", "c", "d", "e", "b")] == ["a", "b", "a", "c", OTHER, OTHER, "b"]


def test_a_flood_of_references_keeps_the_series_bounded() -> None:
    registry = CollectorRegistry()
    m = ApiMetrics(registry)
    m.events_created([f"pack.trigger_{i}" for i in range(MAX_REFS * 3)])
    m.enforcements_created([f"pack.rule_{i}" for i in range(MAX_REFS * 3)])
    for name, label in (("automation_events_created", "trigger_ref"), ("automation_enforcements_created", "rule_ref")):
        (family,) = (f for f in registry.collect() if f.name == name)
        values = {s.labels[label] for s in family.samples if s.name.endswith("_total")}
        assert len(values) == MAX_REFS + 1 and OTHER in values
        other = next(s.value for s in family.samples if s.labels[label] == OTHER and s.name.endswith("_total"))
        assert other == MAX_REFS * 2


def test_sqlstate_labels_are_classes() -> None:
    registry = CollectorRegistry()
    m = ApiMetrics(registry)
    for state in ("40P01", "40001", "23505", "08006", ""):
        m.db_error(state)
    (family,) = (f for f in registry.collect() if f.name == "automation_db_errors")
    got = {s.labels["sqlstate_class"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert got == {"40": 2, "23": 1, "08": 1, "unknown": 1}


def test_off_records_nothing_and_says_so() -> None:
    assert OFF.enabled is False
    now = datetime.now(UTC)
    OFF.events_created(["a"])
    OFF.resolved("processed", now, now)
    OFF.db_error("40001")
