"""The invariants of a run, checked in SQL once the backlog has drained.

What the load driver was told (each OK CreateEvent: event id and enforcement ids) goes into a
temporary table; every check is then one query over it and the stored rows. A check counts
offending rows and keeps a few of them as examples; any count above zero is a violation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from tools.chaos.load import ALWAYS, DOOMED, STEADY, TARGET, TRIGGER, Ack

_ACKS = """
CREATE TEMPORARY TABLE chaos_ack (
    request_id  TEXT PRIMARY KEY,
    event_id    BIGINT NOT NULL,
    enforcements BIGINT[] NOT NULL,
    target      TEXT NOT NULL,
    kind        TEXT NOT NULL
)"""

LOSSES = ("acked_event_missing", "acked_enforcement_missing")
"""What an acknowledged write lost with its host looks like; the other checks look only at the
events that are there, so that one lost event is counted once, here."""

# name -> (what it means, query returning offending rows: first column an id)
CHECKS: dict[str, tuple[str, str]] = {
    "acked_event_missing": (
        "an acknowledged event is not stored (or stored under another request_id)",
        """SELECT a.event_id, a.request_id FROM chaos_ack a
            WHERE NOT EXISTS (SELECT 1 FROM event e
                               WHERE e.id = a.event_id AND e.payload->>'rid' = a.request_id)""",
    ),
    "acked_enforcement_missing": (
        "an enforcement CreateEvent returned is not stored for its event",
        """SELECT x.id, a.event_id FROM chaos_ack a, unnest(a.enforcements) AS x(id)
            WHERE NOT EXISTS (SELECT 1 FROM enforcement e WHERE e.id = x.id AND e.event = a.event_id)""",
    ),
    "enforcement_not_acked": (
        "an acknowledged event has a stored enforcement its CreateEvent answer did not list",
        """SELECT e.id, e.event FROM enforcement e JOIN chaos_ack a ON a.event_id = e.event
            WHERE NOT (e.id = ANY(a.enforcements))""",
    ),
    "always_rule_missing": (
        f"an acknowledged untargeted event has no enforcement of {ALWAYS} (enabled all along)",
        f"""SELECT a.event_id, a.request_id FROM chaos_ack a JOIN event ev ON ev.id = a.event_id
             WHERE a.target = '' AND NOT EXISTS (
                   SELECT 1 FROM enforcement e WHERE e.event = a.event_id AND e.rule_ref = '{ALWAYS}')""",
    ),
    "targeted_wrong": (
        f"a targeted event has other than exactly one enforcement, of {TARGET}",
        """SELECT a.event_id, array_agg(e.rule_ref) FROM chaos_ack a
             JOIN event ev ON ev.id = a.event_id
             LEFT JOIN enforcement e ON e.event = a.event_id
            WHERE a.target <> ''
            GROUP BY a.event_id, a.target
           HAVING count(e.id) <> 1 OR bool_or(e.rule_ref IS DISTINCT FROM a.target)""",
    ),
    "left_created": (
        "an enforcement is still pending after the drain",
        "SELECT id, rule_ref FROM enforcement WHERE status = 'created'",
    ),
    "dispatch_leftover": (
        "a resolved enforcement still has a dispatch row, or a pending one is exhausted",
        """SELECT d.enforcement, d.attempts FROM enforcement_dispatch d
            WHERE d.exhausted_at IS NOT NULL
               OR NOT EXISTS (SELECT 1 FROM enforcement e WHERE e.id = d.enforcement AND e.status = 'created')""",
    ),
    "resolved_incoherent": (
        "resolved_at and status disagree, or resolution precedes creation",
        """SELECT id, status FROM enforcement
            WHERE (status = 'created') <> (resolved_at IS NULL) OR resolved_at < created""",
    ),
    "processed_without_one_execution": (
        "a PROCESSED enforcement has other than exactly one execution",
        """SELECT e.id, count(x.id) FROM enforcement e LEFT JOIN execution x ON x.enforcement = e.id
            WHERE e.status = 'processed' GROUP BY e.id HAVING count(x.id) <> 1""",
    ),
    "execution_not_processed": (
        "an execution exists for an enforcement that is not PROCESSED (or for none at all)",
        """SELECT x.id, x.enforcement FROM execution x
            WHERE NOT EXISTS (SELECT 1 FROM enforcement e WHERE e.id = x.enforcement AND e.status = 'processed')""",
    ),
    "duplicate_execution": (
        "an enforcement has more than one execution",
        "SELECT enforcement, count(*) FROM execution GROUP BY enforcement HAVING count(*) > 1",
    ),
    "duplicate_enforcement": (
        "a rule fired more than once for one event",
        "SELECT event, rule_ref FROM enforcement GROUP BY event, rule_ref HAVING count(*) > 1",
    ),
    "duplicate_event": (
        "more than one event stored for one request_id",
        f"""SELECT min(id), payload->>'rid' FROM event WHERE trigger_ref = '{TRIGGER}'
             GROUP BY payload->>'rid' HAVING count(*) > 1""",
    ),
    "steady_rule_disabled": (
        f"an enforcement of a rule enabled all along ({', '.join(STEADY)}) was resolved DISABLED",
        f"""SELECT id, rule_ref FROM enforcement
             WHERE status = 'disabled' AND rule_ref IN ({", ".join(f"'{r}'" for r in STEADY)})""",
    ),
    "doomed_not_disabled": (
        "a rule the harness disabled is enabled",
        f"""SELECT id, ref FROM rule WHERE enabled AND ref IN ({", ".join(f"'{r}'" for r in DOOMED)})""",
    ),
}

# An execution for an enforcement resolved after its rule's disable committed. The commit
# time is exact with track_commit_timestamp (our own server); `updated` is the fallback.
_AFTER_DISABLE = """
WITH disabled AS (
    SELECT r.id, r.ref, {at} AS at FROM rule r
     WHERE NOT r.enabled AND r.ref IN ({doomed})
)
SELECT e.id, e.rule_ref, e.resolved_at, d.at FROM enforcement e
  JOIN disabled d ON d.id = e.rule
  JOIN execution x ON x.enforcement = e.id
 WHERE e.resolved_at > d.at"""

_COUNTS = """
SELECT (SELECT count(*) FROM event) AS events,
       (SELECT count(*) FROM event e WHERE NOT EXISTS
            (SELECT 1 FROM chaos_ack a WHERE a.event_id = e.id)) AS events_unacked,
       (SELECT count(*) FROM enforcement) AS enforcements,
       (SELECT count(*) FROM enforcement WHERE status = 'processed') AS processed,
       (SELECT count(*) FROM enforcement WHERE status = 'disabled') AS disabled,
       (SELECT count(*) FROM enforcement WHERE status = 'created') AS pending,
       (SELECT count(*) FROM execution) AS executions,
       (SELECT count(*) FROM enforcement e JOIN rule r ON r.id = e.rule
         WHERE r.ref IN ({doomed}) AND e.status = 'disabled') AS doomed_disabled,
       (SELECT coalesce(max(attempts), 0) FROM enforcement_dispatch) AS max_attempts_left
"""


@dataclass
class Findings:
    counts: dict[str, int] = field(default_factory=dict)
    violations: dict[str, tuple[str, int, list[str]]] = field(default_factory=dict)
    """name -> (meaning, offending rows, a few examples)."""
    disable_clock: str = ""

    @property
    def failed(self) -> bool:
        return any(n for _, n, _ in self.violations.values())

    def count(self, name: str) -> int:
        return self.violations[name][1] if name in self.violations else 0


def _quoted(refs: tuple[str, ...]) -> str:
    return ", ".join(f"'{r}'" for r in refs)


async def run_checks(url: str, acks: dict[str, Ack]) -> Findings:
    findings = Findings()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(_ACKS)
        await conn.copy_records_to_table(
            "chaos_ack",
            records=[(a.request_id, a.event_id, list(a.enforcements), a.target, a.kind) for a in acks.values()],
        )
        await conn.execute("ANALYZE chaos_ack")
        row = await conn.fetchrow(_COUNTS.format(doomed=_quoted(DOOMED)))
        assert row is not None
        findings.counts = {k: int(v) for k, v in row.items()}
        for name, (meaning, sql) in CHECKS.items():
            rows = await conn.fetch(sql)
            findings.violations[name] = (meaning, len(rows), [str(tuple(r.values())) for r in rows[:5]])
        try:
            at = "COALESCE(pg_xact_commit_timestamp(r.xmin), r.updated)"
            await conn.fetchval(f"SELECT {at} FROM rule r LIMIT 1")
            findings.disable_clock = "commit timestamp of the disable"
        except asyncpg.PostgresError:
            at = "r.updated"
            findings.disable_clock = "rule.updated (track_commit_timestamp is off)"
        rows = await conn.fetch(_AFTER_DISABLE.format(at=at, doomed=_quoted(DOOMED)))
        findings.violations["execution_after_disable"] = (
            "an execution exists for an enforcement resolved after its rule's disable committed",
            len(rows),
            [str(tuple(r.values())) for r in rows[:5]],
        )
    finally:
        await conn.close()
    return findings
