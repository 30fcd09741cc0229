"""Statistics and the final table: ``scenario | raw rate | our rate | ratio | p50 | p99 | notes``."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

HEADER = ("scenario", "raw rate", "our rate", "ratio", "p50", "p99", "notes")
footer: list[str] = []
"""Lines the scenarios add below the table (the fixture's chunk counts)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def spread(values: Sequence[float]) -> str:
    """Half the range of repeated measurements relative to their median, e.g. '±4%'."""
    if len(values) < 2:
        return "n=1"
    mid = median(values)
    if not mid:
        return "±?"
    return f"±{(max(values) - min(values)) / 2 / mid * 100:.0f}%"


def fmt_rate(value: float | None, unit: str = "/s") -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.0f}{unit}" if value >= 10 else f"{value:.1f}{unit}"


def fmt_ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"


@dataclass
class Row:
    """One line of the table. Latencies in seconds; rates per second."""

    scenario: str
    raw_rate: float | None = None
    our_rate: float | None = None
    p50: float | None = None
    p99: float | None = None
    notes: str = ""
    unit: str = "/s"

    @property
    def ratio(self) -> float | None:
        if not self.raw_rate or self.our_rate is None or math.isnan(self.raw_rate) or math.isnan(self.our_rate):
            return None
        return self.our_rate / self.raw_rate

    def cells(self) -> tuple[str, ...]:
        ratio = self.ratio
        return (
            self.scenario,
            fmt_rate(self.raw_rate, self.unit),
            fmt_rate(self.our_rate, self.unit),
            "-" if ratio is None else f"{ratio:.2f}",
            fmt_ms(self.p50),
            fmt_ms(self.p99),
            self.notes.replace("|", "/"),
        )


def table(rows: Sequence[Row]) -> str:
    """The table, one line per row, columns separated by ' | ' and padded to align."""
    lines = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER) - 1)]
    out = []
    for line in lines:
        cells = [c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)]
        out.append(" | ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
