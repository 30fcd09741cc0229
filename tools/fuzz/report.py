"""The closing summary of a fuzz run, and its verdict."""

from __future__ import annotations

from tools.fuzz.harness import Outcome

_CODE_ORDER = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "OUT_OF_RANGE")


def _codes(counts: dict[str, int]) -> str:
    order = {c: i for i, c in enumerate(_CODE_ORDER)}
    items = sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    return ", ".join(f"{code} {n:,}" for code, n in items)


def render(o: Outcome) -> str:
    s, st = o.settings, o.stats
    elapsed = max(st.ended - st.started, 0.0)
    calls = sum(st.calls.values())
    out = [
        "",
        "FUZZ RUN",
        f"fuzzed {elapsed:.0f} s, seed {s.seed}, {s.workers} workers; {calls:,} calls "
        f"({calls / elapsed if elapsed else 0:.0f}/s); by origin: "
        + ", ".join(f"{k} {n:,} ({st.origins_ok[k] * 100 // max(n, 1)}% OK)" for k, n in sorted(st.origins.items()))
        + f"; {st.skipped_protected:,} drawn requests skipped (they named the ordinary trigger or rule)",
        "",
        "calls per RPC and the codes they got:",
    ]
    width = max((len(m) for m in st.calls), default=10)
    for method in sorted(st.calls):
        out.append(f"  {method.ljust(width)} {st.calls[method]:>7,}  {_codes(st.codes[method])}")
    out += ["", "invariants:"]
    out += [f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in o.checks]
    peaks = ", ".join(f"{name} {kb / 1024:.0f} MiB" for name, kb in o.rss_peak_kb.items())
    t = o.traffic
    resolved = sum(n for k, n in o.resolved.items() if k != "created")
    out += [
        "",
        f"peak RSS: {peaks} (limit {s.max_rss_mb:g} MiB); the fuzzer itself {o.own_peak_rss_kb / 1024:.0f} MiB",
        f"ordinary traffic: {t.sent:,} CreateEvent calls, {t.ok:,} OK (latency p50 {t.latency(0.5) * 1000:.0f} ms, "
        f"p99 {t.latency(0.99) * 1000:.0f} ms, max {t.latency(1.0):.2f} s), "
        f"{len(t.events):,} events, {len(t.enforcements):,} enforcements, {resolved:,} resolved "
        f"({', '.join(f'{k} {n:,}' for k, n in sorted(o.resolved.items())) or '-'})",
        f"acknowledged in all: {o.ledger_sizes[0]:,} events, {o.ledger_sizes[1]:,} enforcements; "
        f"fuzz enforcements still pending at the end: {o.fuzz_pending:,}",
    ]
    if st.slowest:
        out.append("slowest fuzz calls:")
        out += [f"  {seconds:6.2f} s  {what}" for seconds, what in st.slowest]
    if o.violations:
        total = sum(v.count for v in o.violations)
        out += ["", f"violations: {len(o.violations)} kinds, {total:,} calls"]
        out += [f"  VIOLATION {v.line()}" for v in o.violations]
    if o.log_dir is not None:
        out.append(f"logs: {o.log_dir}")
    out.append("RESULT: " + ("FAIL" if o.failed else "PASS"))
    return "\n".join(out)
