"""How long and how big each scenario runs: the full run and the ``--quick`` smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    reps: int
    """Repetitions of each measured window (median and spread are over these)."""
    rep_s: float
    """Length of one repetition of the ingest and raw-pipeline windows."""
    unary_concurrency: tuple[int, ...]
    batch_size: int
    batch_concurrency: int
    probe_s: float
    """Length of one probe of the sustained-rate search."""
    sustain_s: float
    """How long the sustained rate must hold (60 s in the full run)."""
    fraction_s: float
    """Length of each latency window at 25/50/90 % of the sustained rate."""
    start_rate: float
    max_probes: int
    """Most short probes of the sustained-rate search (rising, then one bisection)."""
    read_events: int
    steady_events: int
    """Events of the TimescaleDB steady-state fixture (90 days; twice as many enforcements)."""
    backlog_events: int
    """Events of the backlog scenario's 10 days (twice as many enforcements, 9 days of them pending)."""
    read_far_page: int
    """The far page measured (1,000 in the full run)."""
    read_samples: int
    latency_events: int
    latency_rate: float
    memory_minutes: float
    sample_s: float
    """How often RSS and backlog are sampled."""


def full(memory_minutes: float) -> Settings:
    return Settings(
        quick=False,
        reps=3,
        rep_s=4.0,
        unary_concurrency=(1, 16, 64),
        batch_size=1000,
        batch_concurrency=2,
        probe_s=5.0,
        sustain_s=60.0,
        fraction_s=8.0,
        start_rate=300.0,
        max_probes=6,
        read_events=1_000_000,
        steady_events=3_000_000,
        backlog_events=50_000,
        read_far_page=1000,
        read_samples=60,
        latency_events=1000,
        latency_rate=100.0,
        memory_minutes=memory_minutes,
        sample_s=1.0,
    )


def quick() -> Settings:
    return Settings(
        quick=True,
        reps=3,
        rep_s=0.5,
        unary_concurrency=(1, 16, 64),
        batch_size=200,
        batch_concurrency=2,
        probe_s=0.5,
        sustain_s=1.0,
        fraction_s=0.5,
        start_rate=100.0,
        max_probes=2,
        read_events=20_000,
        steady_events=30_000,
        backlog_events=2_000,
        read_far_page=20,
        read_samples=10,
        latency_events=100,
        latency_rate=100.0,
        memory_minutes=0.05,
        sample_s=0.25,
    )
