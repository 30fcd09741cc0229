"""The knobs of one chaos run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FAULT_KINDS = ("kill_executor", "restart_api", "restart_postgres", "stall_executor")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run needs to know; the defaults are the ones the issue asks for."""

    minutes: float
    rate: float
    seed: int
    log_dir: Path
    database_url: str | None = None
    fault_interval_s: float = 0.0
    """Seconds between two faults; 0 picks one (about 11 s, or 8 faults in a short run)."""
    apis: int = 2
    executors: int = 3
    lease_s: float = 2.0
    heartbeat_s: float = 0.5
    poll_s: float = 0.2
    max_attempts: int = 1000
    drain_timeout_s: float = 120.0
    give_up_s: float = 60.0
    """How long the load driver retries one event before it counts it as never acknowledged."""
    strict: bool = False
    """Also fail on answers off the error contract (INTERNAL, UNKNOWN, ...)."""
    max_in_flight: int = 64
    """Concurrent CreateEvent calls at most (the rate is the target, this the ceiling)."""

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    @property
    def total_events(self) -> int:
        return max(1, round(self.duration_s * self.rate))

    @property
    def stall_s(self) -> float:
        """SIGSTOP lasts twice the lease: long enough for any lease of the stalled one to lapse."""
        return 2.0 * self.lease_s

    @property
    def interval_s(self) -> float:
        if self.fault_interval_s > 0:
            return self.fault_interval_s
        # Long runs: a fault every ~11 s (each of 4 kinds >= 10 times in 10 minutes); short
        # runs: every kind at least twice.
        return 11.0 if self.duration_s >= 300 else max(3.0, self.duration_s / 9)

    @property
    def can_restart_db(self) -> bool:
        return self.database_url is None
