-- Live tails (EnforcementService/TailEnforcements) follow resolutions in (resolved_at, id)
-- order, from a position a few seconds back. No existing index orders enforcements by
-- resolved_at (they are all on created, and an enforcement may stay pending for days), so
-- without this one every poll of every tail would scan the table. Partial: a pending
-- enforcement has no entry, and the one UPDATE that resolves it adds one (status is indexed
-- already, so that UPDATE was never a HOT update). Created in the migration's transaction:
-- TimescaleDB builds it on every chunk of the hypertable, and has no CONCURRENTLY.
CREATE INDEX enforcement_resolved_idx ON enforcement (resolved_at, id) WHERE resolved_at IS NOT NULL;
