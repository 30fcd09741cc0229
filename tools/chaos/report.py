"""The closing table of a run, and its verdict."""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass, field

from tools.chaos.checks import LOSSES, Findings
from tools.chaos.faults import FaultLog, Window
from tools.chaos.load import LoadStats
from tools.chaos.settings import Settings


@dataclass
class Outcome:
    settings: Settings
    load: LoadStats
    findings: Findings
    faults: FaultLog
    drain_s: float | None
    unexpected_exits: list[str]
    rule_changes: int
    backlog: list[tuple[float, int]] = field(default_factory=list)
    """Pending enforcements (monotonic time, count), sampled twice a second during the load."""
    internal_errors: int = 0
    """'unexpected error' lines in the api logs (each answered INTERNAL to someone)."""
    database: str = ""
    loop_lag_s: float = 0.0
    """The harness's own event loop's worst delay (its faults' timing is only as good)."""

    @property
    def losses_expected(self) -> bool:
        """Asynchronous replication promises nothing about a failover: what it lost is measured
        and reported, not a violation."""
        return self.settings.replication == "async"

    def recovery_s(self, w: Window) -> float | None:
        """From the end of fault ``w`` until the backlog was back to its level before it (with
        some slack for the load's own variation); None if it never was."""
        counts = [n for _, n in self.backlog]
        times = [t for t, _ in self.backlog]
        before = counts[max(bisect.bisect_left(times, w.began) - 1, 0)] if counts else 0
        usual = statistics.median(counts) if counts else 0
        threshold = max(before, usual) * 1.5 + 10
        for t, n in self.backlog[bisect.bisect_left(times, w.ended) :]:
            if n <= threshold:
                return t - w.ended
        return None

    def ack_gap_s(self, w: Window) -> float:
        """The longest time without any acknowledged event across fault ``w``: what a sensor
        saw of it."""
        times = self.load.ack_times
        if not times:
            return 0.0
        i = max(bisect.bisect_left(times, w.began) - 1, 0)
        worst = 0.0
        while i + 1 < len(times) and times[i] <= w.ended:
            worst = max(worst, times[i + 1] - times[i])
            i += 1
        return worst

    @property
    def warnings(self) -> list[str]:
        """Breaches of the error contract (DESIGN: UNAVAILABLE when the database is down, never
        INTERNAL/UNKNOWN); fatal only with --strict, since no invariant of the data broke."""
        out = [f"unexpected status {status} x{n}" for status, n in self.load.unexpected.items()]
        if self.internal_errors:
            out.append(f"{self.internal_errors} RPC(s) failed with an unexpected error (INTERNAL) in the api logs")
        if self.losses_expected:
            lost = [f"{name} {self.findings.count(name)}" for name in LOSSES if self.findings.count(name)]
            if lost:
                out.append(f"acknowledged writes lost under asynchronous replication: {', '.join(lost)}")
        return out

    @property
    def problems(self) -> list[str]:
        out = [
            f"{name}: {n} ({meaning}); e.g. {', '.join(examples)}"
            for name, (meaning, n, examples) in self.findings.violations.items()
            if n and not (self.losses_expected and name in LOSSES)
        ]
        if self.drain_s is None:
            out.append(f"drain: backlog not empty after {self.settings.drain_timeout_s:.0f}s")
        if self.load.gave_up:
            out.append(f"load: {self.load.gave_up} event(s) never acknowledged within {self.settings.give_up_s:.0f}s")
        if self.settings.strict:
            out += self.warnings
        out += [f"process: {e}" for e in self.unexpected_exits]
        out += [f"fault: {e}" for e in self.faults.errors]
        return out


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    return f"{v[0]:.1f}/{v[len(v) // 2]:.1f}/{v[-1]:.1f} s"


def _median(values: list[int]) -> int:
    return sorted(values)[len(values) // 2] if values else 0


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    return f"{v[0]:.1f}/{v[len(v) // 2]:.1f}/{v[-1]:.1f}"


def per_kind(o: Outcome) -> str:
    """One row per fault kind: how often, what it measured of itself, what the clients saw."""
    header = ("kind", "n", "measured min/med/max s", "longest ack gap s", "backlog back after s (max)")
    rows = [header]
    for kind in o.faults.counts:
        ws = [w for w in o.faults.windows if w.kind == kind]
        measured = [w.seconds for w in ws if w.seconds is not None]
        recoveries = [o.recovery_s(w) for w in ws]
        done = [r for r in recoveries if r is not None]
        worst = f"{max(done):.1f}" if done else "-"
        if len(done) < len(recoveries):
            worst += f" ({len(recoveries) - len(done)} only at the drain)"
        gaps = [o.ack_gap_s(w) for w in ws]
        rows.append((kind, str(len(ws)), _spread(measured), _spread(gaps), worst))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    return "\n".join([rule, lines[0], rule, *lines[1:], rule])


def table(o: Outcome) -> str:
    s, ld, c, f = o.settings, o.load, o.findings.counts, o.faults
    v = o.findings.count
    rows: list[tuple[str, str]] = [
        ("run", f"{s.minutes:g} min load at {s.rate:g} ev/s, seed {s.seed}, fault every {s.interval_s:.1f} s"),
        ("database", o.database or "-"),
        (
            "settings",
            f"lease {s.lease_s:g}s, heartbeat {s.heartbeat_s:g}s, poll {s.poll_s:g}s, "
            f"MAX_ATTEMPTS {s.max_attempts}, {s.apis} apis, {s.executors} executors",
        ),
        ("events sent (distinct request_id)", str(ld.sent)),
        ("CreateEvents batches among the sends", str(ld.batches)),
        ("CreateEvent calls (retries)", f"{ld.attempts} ({ld.retries}: {dict(ld.retried_codes) or '-'})"),
        ("events acknowledged (replayed)", f"{ld.acked} ({ld.replayed})"),
        ("events never acknowledged", str(ld.gave_up)),
        ("events stored (unacked but stored)", f"{c.get('events', 0)} ({c.get('events_unacked', 0)})"),
        ("enforcements created", str(c.get("enforcements", 0))),
        (
            "enforcements resolved",
            f"{c.get('processed', 0) + c.get('disabled', 0)} "
            f"(processed {c.get('processed', 0)}, disabled {c.get('disabled', 0)})",
        ),
        ("enforcements left created", str(c.get("pending", 0))),
        ("executions", str(c.get("executions", 0))),
        ("rule changes (disabled-rule enforcements)", f"{o.rule_changes} ({c.get('doomed_disabled', 0)})"),
        ("duplicates: events per request_id", str(v("duplicate_event"))),
        ("duplicates: enforcements per (rule, event)", str(v("duplicate_enforcement"))),
        ("duplicates: executions per enforcement", str(v("duplicate_execution"))),
        (
            "losses: acked events missing" + (" (async: measured)" if o.losses_expected else ""),
            str(v("acked_event_missing")),
        ),
        ("losses: acked enforcements missing", str(v("acked_enforcement_missing") + v("always_rule_missing"))),
        ("executions after rule disabled", f"{v('execution_after_disable')} ({o.findings.disable_clock})"),
        (
            "other violations",
            str(
                sum(n for _, n, _ in o.findings.violations.values())
                - sum(
                    v(k)
                    for k in (
                        "duplicate_event",
                        "duplicate_enforcement",
                        "duplicate_execution",
                        "acked_event_missing",
                        "acked_enforcement_missing",
                        "always_rule_missing",
                        "execution_after_disable",
                    )
                )
            ),
        ),
        ("faults: kill -9 executor", str(f.counts["kill_executor"])),
        ("faults: restart api (of which kill -9)", f"{f.counts['restart_api']} ({f.api_sigkills})"),
        ("faults: restart PostgreSQL (fast)", str(f.counts["restart_postgres"]) if s.can_restart_db else "skipped"),
        (f"faults: stall executor (SIGSTOP {s.stall_s:g}s)", str(f.counts["stall_executor"])),
        ("api down min/median/max", _ms(f.api_down_s)),
        ("PostgreSQL down min/median/max", _ms(f.db_down_s)),
        (
            "stalled executors' leases taken over",
            f"{sum(x.taken_over for x in f.stalls)} of {sum(x.held for x in f.stalls)} held during stalls",
        ),
        (
            "pending backlog during load median/max",
            f"{_median([n for _, n in o.backlog])}/{max((n for _, n in o.backlog), default=0)}",
        ),
        ("drain time", "timeout" if o.drain_s is None else f"{o.drain_s:.2f} s"),
        ("redelivery after kill -9", f.redelivery_summary()),
        ("failover: old primary rejoined after (s)", _spread(f.rejoin_s)),
        ("failovers without a promotion (old primary back)", str(f.unpromoted)),
        ("connections reset by network faults", str(f.connections_reset)),
        ("statuses off contract (INTERNAL in api logs)", f"{sum(o.load.unexpected.values())} ({o.internal_errors})"),
        ("harness event loop worst lag", f"{o.loop_lag_s:.2f} s"),
        ("violations", str(len(o.problems))),
    ]
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 60
    body = [f"| {k.ljust(width)} | {val}" for k, val in rows]
    return "\n".join([line, *body, line])


def render(o: Outcome) -> str:
    parts = ["", "CHAOS RUN", table(o), "", "PER FAULT KIND", per_kind(o)]
    if o.faults.skipped:
        parts += [f"note: {x}" for x in o.faults.skipped]
    problems = o.problems
    if not o.settings.strict:
        parts += [f"WARNING {w}" for w in o.warnings]
    parts += [f"VIOLATION {p}" for p in problems]
    parts.append("RESULT: " + ("FAIL" if problems else "PASS"))
    return "\n".join(parts)
