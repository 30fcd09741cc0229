"""The api's pipeline metrics (Prometheus), beside the RPC metrics of ``shared.metrics``.

``current`` is what the code records into: ``OFF`` (every method does nothing) until the
api starts with ``METRICS_ADDR`` set, then one ``ApiMetrics``. Counters and histograms are
recorded where things happen (ingest, resolution, dispatch, the store's failures); gauges
that describe the database (pending, oldest pending, leased, exhausted) are read by the api
every ``REFRESH_S`` from ``enforcement_dispatch``, the small table of pending work, never
by a COUNT over a hypertable, and never at scrape time (a scrape runs on another thread).
Every replica exports those; aggregate them with ``max``, not ``sum``.

Labels are bounded: a status, a two-character SQLSTATE class, and trigger and rule
references capped at ``MAX_REFS`` values each (later ones are counted as ``other``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.metrics import Capped

REFRESH_S = 2.0
"""How often the database gauges are read (only while metrics are on)."""
MAX_REFS = 100
"""Distinct trigger_ref / rule_ref label values per process; later ones are "other"."""

# Creation to resolution: milliseconds when executors keep up, hours when they do not.
RESOLUTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
MATCHING_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1)


class Off:
    """Metrics off: every record is a no-op."""

    enabled = False

    def events_created(self, trigger_refs: Sequence[str]) -> None: ...

    def enforcements_created(self, rule_refs: Sequence[str]) -> None: ...

    def resolved(self, status: str, created: datetime, resolved_at: datetime | None) -> None: ...

    def matched(self, seconds: float) -> None: ...

    def handed_off(self, n: int) -> None: ...

    def claimed(self, n: int) -> None: ...

    def announced(self, n: int) -> None: ...

    def db_error(self, sqlstate: str) -> None: ...

    def read_served(self, by: str) -> None: ...

    def replica_fallback(self, reason: str) -> None: ...

    def replica_state(self, usable: bool, lag_s: float | None) -> None: ...

    def nonconforming(self, trigger_refs: Sequence[str]) -> None: ...


class ApiMetrics(Off):
    enabled = True

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.events = Counter("automation_events_created_total", "Events stored.", ["trigger_ref"], registry=r)
        self.enforcements = Counter(
            "automation_enforcements_created_total", "Enforcements stored.", ["rule_ref"], registry=r
        )
        self.resolutions = Counter(
            "automation_enforcements_resolved_total", "Enforcements resolved, by outcome.", ["status"], registry=r
        )
        self.resolution_seconds = Histogram(
            "automation_enforcement_resolution_seconds",
            "Time from an enforcement's creation to its resolution.",
            ["status"],
            buckets=RESOLUTION_BUCKETS,
            registry=r,
        )
        self.matching_seconds = Histogram(
            "automation_matching_seconds",
            "Time to match one event against its trigger's rules.",
            buckets=MATCHING_BUCKETS,
            registry=r,
        )
        self.pending = Gauge("automation_enforcements_pending", "Enforcements not yet resolved.", registry=r)
        self.oldest = Gauge(
            "automation_enforcement_oldest_pending_seconds",
            "Age of the oldest unresolved enforcement (0 when none).",
            registry=r,
        )
        self.leased = Gauge("automation_enforcements_leased", "Pending enforcements under a live lease.", registry=r)
        self.exhausted = Gauge(
            "automation_enforcements_exhausted", "Enforcements that used up their attempts.", registry=r
        )
        self.streams = Gauge("automation_watch_streams", "Executor watch streams open on this api.", registry=r)
        self.free_credit = Gauge(
            "automation_watch_free_credit", "Enforcements the open watch streams can still take.", registry=r
        )
        self.handoffs = Counter(
            "automation_dispatch_handoffs_total", "Enforcements handed to a watch stream by their insert.", registry=r
        )
        self.claims = Counter(
            "automation_dispatch_claimed_total", "Enforcements claimed from the dispatch table.", registry=r
        )
        self.announcements = Counter(
            "automation_notify_announcements_total", "NOTIFY payloads this api sent after its commits.", registry=r
        )
        self.pool = Gauge("automation_db_pool_connections", "Database connections, by state.", ["state"], registry=r)
        self.pool_waiting = Gauge(
            "automation_db_pool_waiting", "Callers waiting for a database connection.", registry=r
        )
        self.pool_max = Gauge("automation_db_pool_max", "Largest size of the connection pool.", registry=r)
        self.db_errors = Counter(
            "automation_db_errors_total", "Failed statements, by SQLSTATE class.", ["sqlstate_class"], registry=r
        )
        self.reads = Counter(
            "automation_db_reads_total",
            "Reads that may lag (lists, Get, history, audit, analytics), by the server that answered.",
            ["served_by"],
            registry=r,
        )
        self.replica_fallbacks = Counter(
            "automation_db_replica_fallbacks_total",
            "Reads sent to the primary instead of the standby, by cause (lag, down, not_standby: "
            "counted once per change; missing: a row not yet on the standby, every time).",
            ["reason"],
            registry=r,
        )
        self.replica_usable = Gauge(
            "automation_db_replica_usable", "1 while reads that may lag go to the standby.", registry=r
        )
        self.replica_lag = Gauge(
            "automation_db_replica_lag_seconds",
            "The standby's staleness at the last probe, an upper bound (NaN when unknown).",
            registry=r,
        )
        self.nonconforming_events = Counter(
            "automation_events_nonconforming_total",
            "Events stored in 'warn' mode though their payload fails their trigger's schema.",
            ["trigger_ref"],
            registry=r,
        )
        self._nonconforming_children: dict[str, Any] = {}
        self._triggers = Capped(MAX_REFS)
        self._rules = Capped(MAX_REFS)
        self._event_children: dict[str, Any] = {}
        self._enforcement_children: dict[str, Any] = {}
        self._statuses = {s: (self.resolutions.labels(s), self.resolution_seconds.labels(s)) for s in _STATUSES}

    def events_created(self, trigger_refs: Sequence[str]) -> None:
        for ref in trigger_refs:
            self._child(self._event_children, self._triggers, self.events, ref).inc()

    def nonconforming(self, trigger_refs: Sequence[str]) -> None:
        for ref in trigger_refs:
            self._child(self._nonconforming_children, self._triggers, self.nonconforming_events, ref).inc()

    def enforcements_created(self, rule_refs: Sequence[str]) -> None:
        for ref in rule_refs:
            self._child(self._enforcement_children, self._rules, self.enforcements, ref).inc()

    @staticmethod
    def _child(cache: dict[str, Any], capped: Capped, metric: Counter, ref: str) -> Any:
        """The labelled child for ``ref``, looked up once (``labels()`` costs microseconds);
        the cache stops growing past twice the cap, so a flood of refs costs lookups, not memory."""
        child = cache.get(ref)
        if child is None:
            child = metric.labels(capped(ref))
            if len(cache) < 2 * MAX_REFS:
                cache[ref] = child
        return child

    def resolved(self, status: str, created: datetime, resolved_at: datetime | None) -> None:
        counter, seconds = self._statuses.get(status) or self._statuses["disabled"]
        counter.inc()
        if resolved_at is not None:
            seconds.observe(max((resolved_at - created).total_seconds(), 0.0))

    def matched(self, seconds: float) -> None:
        self.matching_seconds.observe(seconds)

    def handed_off(self, n: int) -> None:
        self.handoffs.inc(n)

    def claimed(self, n: int) -> None:
        self.claims.inc(n)

    def announced(self, n: int) -> None:
        self.announcements.inc(n)

    def db_error(self, sqlstate: str) -> None:
        self.db_errors.labels(sqlstate[:2] or "unknown").inc()

    def read_served(self, by: str) -> None:
        self.reads.labels(by).inc()

    def replica_fallback(self, reason: str) -> None:
        self.replica_fallbacks.labels(reason).inc()

    def replica_state(self, usable: bool, lag_s: float | None) -> None:
        self.replica_usable.set(1 if usable else 0)
        self.replica_lag.set(float("nan") if lag_s is None else lag_s)

    def dispatch_state(self, pending: int, oldest_s: float, leased: int, exhausted: int) -> None:
        self.pending.set(pending)
        self.oldest.set(oldest_s)
        self.leased.set(leased)
        self.exhausted.set(exhausted)

    def watch(self, streams: int, free_credit: int) -> None:
        self.streams.set(streams)
        self.free_credit.set(free_credit)

    def pool_state(self, pool: Any) -> None:
        size, idle = pool.get_size(), pool.get_idle_size()
        self.pool.labels("in_use").set(size - idle)
        self.pool.labels("idle").set(idle)
        self.pool_max.set(pool.get_max_size())
        self.pool_waiting.set(pool_waiters(pool))


_STATUSES = ("processed", "disabled")


def pool_waiters(pool: Any) -> int:
    """Callers waiting in asyncpg's pool for a connection: the getters of its internal queue
    (asyncpg has no public count; a test checks that this still reads it)."""
    queue = getattr(pool, "_queue", None)
    getters = getattr(queue, "_getters", None)
    return sum(1 for g in getters if not g.done()) if getters is not None else 0


OFF = Off()
current: Off = OFF
"""What the api records into (``ApiMetrics`` while metrics are on)."""


def enable(registry: CollectorRegistry) -> ApiMetrics:
    global current
    metrics = ApiMetrics(registry)
    current = metrics
    return metrics


def disable() -> None:
    global current
    current = OFF
