"""The knobs of one chaos run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FAULT_KINDS = ("kill_executor", "restart_api", "restart_postgres", "stall_executor")
"""The faults a run injects unless told otherwise (--faults)."""
NETWORK_KINDS = ("blackhole_db", "blackhole_executor", "latency", "reset_connections", "refuse_connections")
"""Through the fault proxies between the apis and PostgreSQL and between each executor and its api."""
CRASH_KINDS = ("crash_postgres",)
REPLICATED_KINDS = ("failover", "switchover")
"""Only with a replicated database (--replication sync|async)."""
ALL_KINDS = FAULT_KINDS + CRASH_KINDS + NETWORK_KINDS + REPLICATED_KINDS
REPLICATION = ("none", "sync", "async")


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
    faults: tuple[str, ...] = FAULT_KINDS
    """The kinds injected, round-robin, in this order."""
    replication: str = "none"
    """``none``: one PostgreSQL; ``sync``/``async``: a Patroni cluster of two nodes."""
    batch_every: int = 4
    batch_size: int = 5
    """Every ``batch_every``-th send is a CreateEvents of ``batch_size`` events (0: never)."""
    statement_timeout_s: float = 10.0
    latency_window_s: float = 60.0
    """How long a ``latency`` fault lasts (other faults go on meanwhile)."""
    refuse_s: float = 5.0

    @property
    def blackhole_s(self) -> float:
        """Longer than the statement timeout and than a lease: the half-open case at its worst."""
        return max(self.statement_timeout_s, self.lease_s) + 2.0

    @property
    def network(self) -> bool:
        """Whether the run puts fault proxies in the paths (only when a network fault is asked)."""
        return any(k in NETWORK_KINDS for k in self.faults)

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
        # Long runs: each kind >= 5 times (a fault every ~11 s with the four default kinds:
        # >= 10 times each in 10 minutes); short runs: every kind at least twice.
        rounds = 5 if self.duration_s >= 300 else 2
        spread = self.duration_s / (rounds * len(self.faults) + 1)
        return min(11.0, spread) if self.duration_s >= 300 else max(3.0, spread)

    @property
    def can_restart_db(self) -> bool:
        return self.database_url is None

    @property
    def replicated(self) -> bool:
        return self.replication != "none"
