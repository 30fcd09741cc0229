-- Trigger schemas, enforced: a trigger's out_schema is a JSON Schema checked on every way in,
-- per the trigger's schema_mode ('off', 'warn': stored and marked, 'enforce': refused).
-- Triggers defined before this kept their schemas as information only: they stay 'off', so
-- upgrading refuses no event a sensor sends today; an operator switches each one on.
ALTER TABLE trigger ADD COLUMN schema_mode TEXT NOT NULL DEFAULT 'off'
    CHECK (schema_mode IN ('off', 'warn', 'enforce'));
-- Bumped by every change to out_schema or schema_mode, in the change's own statement: ingest
-- reads it with the trigger and compiles a schema again only when it moved (as rule_set.version
-- does for rules), so every replica uses a change from its commit on.
ALTER TABLE trigger ADD COLUMN schema_version INTEGER NOT NULL DEFAULT 1 CHECK (schema_version > 0);

-- What an event was checked against: the trigger's schema_version (NULL: not checked, the mode
-- was 'off' or there was no schema), and in 'warn' mode the first problems found (NULL: it
-- conforms). Nullable without defaults: on a hypertable with compressed chunks this changes
-- only the catalog, as 0013 did.
ALTER TABLE event ADD COLUMN schema_version INTEGER;
ALTER TABLE event ADD COLUMN schema_errors JSONB;
