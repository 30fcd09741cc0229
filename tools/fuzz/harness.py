"""One fuzz run, start to end: processes, known-nasty requests, fuzzing beside ordinary
traffic, the closing checks (database, processes, logs, memory), and the verdict."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from services.api.auth import ROLES, new_token
from tools.fuzz.invariants import REGRESSIONS_DIR, Protected, Recorder, Violation, last_error, tracebacks
from tools.fuzz.known import KNOWN
from tools.fuzz.processes import Cluster, Database, snapshot
from tools.fuzz.runner import Engine, Ledger, Stats, wait_until
from tools.fuzz.strategies import Pool, Strategies
from tools.fuzz.traffic import Ordinary, TrafficStats

log = logging.getLogger("fuzz")


@dataclass(frozen=True, slots=True)
class Settings:
    minutes: float = 1.0
    seed: int = 0
    max_rss_mb: float = 1024.0
    database_url: str | None = None
    keep_logs: bool = False
    log_dir: Path | None = None
    regressions_dir: Path | None = REGRESSIONS_DIR
    """Where failing calls are written (None: nowhere)."""
    workers: int = 4
    rate: float = 20.0
    """Ordinary CreateEvent calls per second."""
    deadline_s: float = 30.0
    resolve_timeout_s: float = 60.0
    """How long the ordinary traffic's enforcements may take to resolve after the run."""
    known: bool = True
    """Replay the known-nasty requests first."""
    code_dir: Path | None = None
    """Run the api and executor from this tree (services, shared, migrations) instead of a
    snapshot of the working tree: another commit's ``git archive``, to compare."""
    principals: int = 0
    """Many principals: the api authenticates, and the fuzzed calls go under this many tokens
    of every role (PERMISSION_DENIED and a budget's RESOURCE_EXHAUSTED are then allowed
    answers); the ordinary traffic and the executor have tokens of their own, and must not be
    slowed into failure or refused by any of them. 0: no authentication, as before."""

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Outcome:
    settings: Settings
    stats: Stats
    traffic: TrafficStats
    violations: list[Violation]
    checks: list[Check]
    rss_peak_kb: dict[str, int]
    resolved: dict[str, int] = field(default_factory=dict)
    fuzz_pending: int = 0
    ledger_sizes: tuple[int, int] = (0, 0)
    log_dir: Path | None = None
    pool_sizes: dict[str, int] = field(default_factory=dict)
    own_peak_rss_kb: int = 0

    @property
    def failed(self) -> bool:
        return any(not c.ok for c in self.checks)


# --- the database's view ---------------------------------------------------------------------
async def _baseline(url: str) -> tuple[int, int]:
    """The highest event and enforcement ids before the run: only rows above are ours."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT coalesce(max(id), 0) FROM event), (SELECT coalesce(max(id), 0) FROM enforcement)"
        )
        assert row is not None
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


async def _resolution(url: str, ids: set[int]) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT status::text AS status, count(*) AS n FROM enforcement WHERE id = ANY($1::bigint[]) GROUP BY 1",
            list(ids),
        )
        return {str(r["status"]): int(r["n"]) for r in rows}
    finally:
        await conn.close()


def _examples(ids: set[int], n: int = 8) -> str:
    return ", ".join(str(i) for i in sorted(ids)[:n]) + (" ..." if len(ids) > n else "")


async def _described(conn: asyncpg.Connection, ids: list[int]) -> str:
    """``; event N: trigger, source_ref, key, ...`` for each of ``ids``."""
    rows = await conn.fetch(
        "SELECT e.id, e.trigger_ref, e.source_ref, e.rule_ref, e.reemit_of, e.created, "
        "left(e.payload::text, 120) AS payload, q.request_id "
        "FROM event e LEFT JOIN ingest_request q ON q.kind = 'event' AND q.entity_id = e.id "
        "WHERE e.id = ANY($1::bigint[]) ORDER BY e.id",
        ids,
    )
    return "".join(
        f"; event {r['id']}: trigger {r['trigger_ref']!r}, source_ref {r['source_ref']!r}, "
        f"rule_ref {r['rule_ref']!r}, reemit_of {r['reemit_of']}, key {r['request_id']!r}, "
        f"created {r['created'].isoformat()}, payload {r['payload']}"
        for r in rows
    )


async def _row_checks(url: str, base: tuple[int, int], ledger: Ledger) -> tuple[list[Check], int]:
    """Acknowledged rows are stored; stored rows were acknowledged (nothing half-written)."""
    conn = await asyncpg.connect(url)
    try:
        events = {int(r[0]) for r in await conn.fetch("SELECT id FROM event WHERE id > $1", base[0])}
        events |= {
            int(r[0])
            for r in await conn.fetch("SELECT id FROM event WHERE id = ANY($1::bigint[])", list(ledger.events))
        }
        enforcements = {int(r[0]) for r in await conn.fetch("SELECT id FROM enforcement WHERE id > $1", base[1])}
        enforcements |= {
            int(r[0])
            for r in await conn.fetch(
                "SELECT id FROM enforcement WHERE id = ANY($1::bigint[])", list(ledger.enforcements)
            )
        }
        pending = int(
            await conn.fetchval("SELECT count(*) FROM enforcement WHERE id > $1 AND status = 'created'", base[1]) or 0
        )
        # A fire replay commits a page of enforcements before it streams them, and the fuzzer
        # cancels streams after two messages: what it did not read is acknowledged by the
        # audit record the page was committed with.
        fired = {
            int(r[0])
            for r in await conn.fetch(
                "SELECT jsonb_array_elements_text(change->'fired'->'enforcements') FROM audit_log "
                "WHERE rpc = 'automation.v1.RuleService/ReplayRule'"
            )
        }
        lost_ev, lost_enf = ledger.events - events, ledger.enforcements - enforcements
        extra_ev = {i for i in events if i > base[0]} - ledger.events
        extra_enf = {i for i in enforcements if i > base[1]} - ledger.enforcements - fired
        # What each unanswered event is, so that a failure names the way in that stored it.
        described = await _described(conn, sorted(extra_ev)[:5]) if extra_ev else ""
    finally:
        await conn.close()
    hint = f"; writes that failed ambiguously: {'; '.join(ledger.ambiguous[:3])}" if ledger.ambiguous else ""
    checks = [
        Check(
            "every acknowledged event and enforcement is stored",
            not lost_ev and not lost_enf,
            f"{len(ledger.events):,} events, {len(ledger.enforcements):,} enforcements acknowledged"
            + (f"; missing events {_examples(lost_ev)}" if lost_ev else "")
            + (f"; missing enforcements {_examples(lost_enf)}" if lost_enf else ""),
        ),
        Check(
            "no stored event or enforcement that no OK call returned",
            not extra_ev and not extra_enf,
            "none"
            if not extra_ev and not extra_enf
            else f"{len(extra_ev)} events ({_examples(extra_ev)}), {len(extra_enf)} enforcements "
            f"({_examples(extra_enf)}) stored without an OK answer{hint}{described}",
        ),
    ]
    return checks, pending


# --- one run ---------------------------------------------------------------------------------
async def _principals(url: str, n: int) -> dict[str, str]:
    """Tokens for the many-principals mode: ``n`` fuzzing principals (``fuzz-<i>-<role>``,
    the roles in turn), the ordinary traffic's (sensor and operator) and the executor's."""
    conn = await asyncpg.connect(url)
    try:
        out = {}
        wanted = [(f"fuzz-{i}-{ROLES[i % len(ROLES)]}", [ROLES[i % len(ROLES)]]) for i in range(n)]
        wanted += [("ordinary", ["sensor", "operator"]), ("executor", ["executor"])]
        suffix = secrets.token_hex(4)  # a reused database keeps earlier runs' names
        for name, roles in wanted:
            token, digest = new_token()
            await conn.execute(
                "INSERT INTO api_token (name, roles, token_hash) VALUES ($1, $2, $3)", f"{name}-{suffix}", roles, digest
            )
            out[name] = token
        return out
    finally:
        await conn.close()


async def _known(engine: Engine) -> None:
    for name, case in KNOWN.items():
        try:
            await case(engine)
        except Exception as exc:  # noqa: BLE001 - a broken case is reported, the run goes on
            engine.stats.fuzzer_errors.append(f"known case {name}: {type(exc).__name__}: {exc}"[:300])


async def run(settings: Settings) -> Outcome:
    log_dir = settings.log_dir or Path(tempfile.mkdtemp(prefix="fuzz-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    cluster: Cluster | None = None
    engine: Engine | None = None
    ordinary: Ordinary | None = None
    rss_stop = asyncio.Event()
    rss_task: asyncio.Task[None] | None = None
    outcome: Outcome | None = None
    try:
        code = settings.code_dir or snapshot(log_dir / "code")
        await db.start(code / "migrations")
        base = await _baseline(db.url)
        tokens = await _principals(db.url, settings.principals) if settings.principals else {}
        cluster = Cluster(db.url, log_dir, code, executor_token=tokens.get("executor", ""))
        await cluster.start()
        rss_task = asyncio.create_task(cluster.sample_rss(rss_stop))
        log.info("api on %s, logs in %s", cluster.target, log_dir)

        pool = Pool()
        protected = Protected()
        ledger = Ledger()
        recorder = Recorder(settings.regressions_dir, seed=settings.seed)
        engine = Engine(
            cluster.target,
            strategies=Strategies(pool),
            recorder=recorder,
            protected=protected,
            ledger=ledger,
            seed=settings.seed,
            workers=settings.workers,
            deadline_s=settings.deadline_s,
            tokens=[v for k, v in tokens.items() if k.startswith("fuzz-")],
        )
        ordinary = Ordinary(cluster.target, ledger, protected, rate=settings.rate, token=tokens.get("ordinary", ""))
        await ordinary.setup()
        if settings.known:
            log.info("replaying %d known-nasty cases", len(KNOWN))
            await _known(engine)
        stop = asyncio.Event()
        traffic = asyncio.create_task(ordinary.run(stop))
        log.info(
            "fuzzing for %.0f s with %d workers beside %g ordinary events/s",
            settings.seconds,
            settings.workers,
            settings.rate,
        )
        try:
            await engine.run(settings.seconds)
        finally:
            stop.set()
            await traffic

        ordinary_ids = set(ordinary.stats.enforcements)

        executor = cluster.executor

        async def all_resolved() -> bool:
            if executor is None or not executor.running:
                return True  # nobody left to resolve them: no use waiting
            done = await _resolution(db.url, ordinary_ids)
            return done.get("created", 0) == 0

        await wait_until(all_resolved, settings.resolve_timeout_s)
        resolution = await _resolution(db.url, ordinary_ids)
        row_checks, fuzz_pending = await _row_checks(db.url, base, ledger)
        rss_stop.set()
        await rss_task

        checks = _checks(settings, engine, recorder, ordinary, cluster, resolution)
        checks = [*checks[:-1], *row_checks, checks[-1]]
        outcome = Outcome(
            settings=settings,
            stats=engine.stats,
            traffic=ordinary.stats,
            violations=sorted(recorder.violations.values(), key=lambda v: (v.method, v.problem)),
            checks=checks,
            rss_peak_kb={c.name: c.peak_rss_kb for c in cluster.children},
            resolved=resolution,
            fuzz_pending=fuzz_pending,
            ledger_sizes=(len(ledger.events), len(ledger.enforcements)),
            log_dir=log_dir,
            pool_sizes=pool.sizes(),
            own_peak_rss_kb=cluster.own_peak_rss_kb,
        )
        return outcome
    finally:
        rss_stop.set()
        if rss_task is not None:
            with contextlib.suppress(Exception):
                await rss_task
        if engine is not None:
            await engine.close()
        if ordinary is not None:
            await ordinary.close()
        if cluster is not None:
            await cluster.close()
        await db.close()
        if outcome is not None and not settings.keep_logs and not outcome.failed and settings.log_dir is None:
            shutil.rmtree(log_dir, ignore_errors=True)
            outcome.log_dir = None


def _traceback_summary(found: Counter[str]) -> str:
    """The commonest tracebacks of each log (a rare one in the executor must not hide behind
    many in the api)."""
    per_file: dict[str, list[str]] = {}
    for key, n in found.most_common():
        name = key.split(":", 1)[0]
        if len(per_file.setdefault(name, [])) < 3:
            per_file[name].append(f"{key} x{n}")
    return "; ".join(x for items in per_file.values() for x in items)


def _checks(
    settings: Settings,
    engine: Engine,
    recorder: Recorder,
    ordinary: Ordinary,
    cluster: Cluster,
    resolution: dict[str, int],
) -> list[Check]:
    by_kind: dict[str, int] = {"status": 0, "message": 0, "decode": 0}
    for v in recorder.violations.values():
        kind = (
            "message"
            if v.problem.startswith("error message")
            else "decode"
            if v.problem.startswith("OK answer")
            else "status"
        )
        by_kind[kind] += v.count
    calls = sum(engine.stats.calls.values())
    api, executor = cluster.api, cluster.executor
    assert api is not None and executor is not None
    found = tracebacks(c.log for c in cluster.children)
    t = ordinary.stats
    pending = resolution.get("created", 0)
    resolved = sum(n for s, n in resolution.items() if s != "created")
    peaks = {c.name: c.peak_rss_kb / 1024 for c in cluster.children}
    fuzzer_errors = engine.stats.fuzzer_errors + engine.stats.generator_errors
    return [
        Check(
            "every status is allowed (RESOURCE_EXHAUSTED only above the size limit)",
            by_kind["status"] == 0,
            f"{by_kind['status']:,} of {calls:,} calls off the contract",
        ),
        Check(
            "error messages are at most 1,000 characters",
            by_kind["message"] == 0,
            f"{by_kind['message']:,} too long",
        ),
        Check("OK answers decode with a default client", by_kind["decode"] == 0, f"{by_kind['decode']:,} did not"),
        Check(
            "no Traceback in the api's or executor's log",
            not found,
            "none" if not found else _traceback_summary(found),
        ),
        Check(
            "api alive",
            api.running,
            f"pid {api.pid}"
            + ("" if api.running else f" exited with {api.process.returncode}; last error: {last_error(api.log)}"),
        ),
        Check(
            "executor alive and never restarted",
            executor.running,
            f"pid {executor.pid}"
            + (
                ""
                if executor.running
                else f" exited with {executor.process.returncode}; last error: {last_error(executor.log)}"
            ),
        ),
        Check(
            "every ordinary call answered OK",
            t.ok == t.sent and t.sent > 0,
            f"{t.ok:,} of {t.sent:,} OK" + (f"; {dict(t.failures.most_common(3))}" if t.failures else ""),
        ),
        Check(
            f"every ordinary enforcement resolved within {settings.resolve_timeout_s:.0f} s",
            pending == 0 and resolved == len(t.enforcements),
            f"{resolved:,} of {len(t.enforcements):,} resolved ({resolution})",
        ),
        Check(
            f"peak RSS at most {settings.max_rss_mb:g} MiB",
            all(p <= settings.max_rss_mb for p in peaks.values()),
            ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()),
        ),
        Check(
            "the fuzzer itself ran cleanly",
            not fuzzer_errors,
            "yes" if not fuzzer_errors else "; ".join(fuzzer_errors[:3]),
        ),
    ]
