"""The executor's metrics: its gRPC calls as ``grpc_client_*`` (recorded around each call, not
by an interceptor: see ``shared.metrics``), its decisions, batches, reconnects and in-flight."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.gen.automation.v1 import enforcement_pb2, rule_pb2
from shared.metrics import SERVER_STREAM, UNARY, MethodMetrics, RpcMetrics

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)


def _path(module: object, service: str, method: str) -> str:
    descriptor = module.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
    return f"/{descriptor.full_name}/{method}"


class ExecutorMetrics:
    def __init__(self, registry: CollectorRegistry, in_flight: Callable[[], int]) -> None:
        rpc = RpcMetrics("client", registry)
        self.get_rule: MethodMetrics = rpc.method(UNARY, _path(rule_pb2, "RuleService", "GetRule"))
        self.resolve: MethodMetrics = rpc.method(
            UNARY, _path(enforcement_pb2, "EnforcementService", "ResolveEnforcements")
        )
        self.release: MethodMetrics = rpc.method(
            UNARY, _path(enforcement_pb2, "EnforcementService", "ReleaseEnforcement")
        )
        self.watch: MethodMetrics = rpc.method(
            SERVER_STREAM, _path(enforcement_pb2, "EnforcementService", "WatchEnforcements")
        )
        for m in (self.get_rule, self.resolve, self.release, self.watch):
            m.initialize()
        self.decisions = Counter(
            "automation_executor_decisions_total",
            "Enforcements this executor finished with: resolved (processed, disabled) or released.",
            ["outcome"],
            registry=registry,
        )
        self.outcomes = {o: self.decisions.labels(o) for o in ("processed", "disabled", "released")}
        self.batch_size = Histogram(
            "automation_executor_resolve_batch_size",
            "Decisions per ResolveEnforcements call.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.reconnects = Counter(
            "automation_executor_reconnects_total", "Watch streams opened again after one ended.", registry=registry
        )
        self.in_flight = Gauge(
            "automation_executor_in_flight", "Enforcements being decided or resolved now.", registry=registry
        )
        self.in_flight.set_function(in_flight)
