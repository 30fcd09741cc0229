-- Secret fields: a trigger's out_schema may mark properties "x-secret": true. Their values are
-- stored as sent (rules match on them), and reads mask them for whoever may not reveal them.
--
-- An event is masked by the schema version it was checked against (event.schema_version), or,
-- when it was not checked (schema_mode 'off'), by the version in effect when it was created:
-- so every version of every trigger's schema is kept here, with the time it took effect. Rows
-- are written by a trigger on `trigger`, so every writer's change is kept; they outlive the
-- trigger (no foreign key): the events of a deleted trigger stay masked. Small: one row per
-- schema change, schemas at most 64 KiB.
CREATE TABLE trigger_schema_version (
    trigger_id     BIGINT NOT NULL,
    trigger_ref    TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    out_schema     JSONB,
    since          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (trigger_id, schema_version)
);
CREATE INDEX trigger_schema_version_ref_idx ON trigger_schema_version (trigger_ref, since);

CREATE FUNCTION trigger_schema_version_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO trigger_schema_version (trigger_id, trigger_ref, schema_version, out_schema)
    VALUES (NEW.id, NEW.ref, NEW.schema_version, NEW.out_schema)
    ON CONFLICT (trigger_id, schema_version) DO UPDATE SET out_schema = EXCLUDED.out_schema;
    RETURN NULL;
END;
$$;
CREATE TRIGGER trigger_schema_version_insert AFTER INSERT ON trigger
    FOR EACH ROW EXECUTE FUNCTION trigger_schema_version_keep();
-- Every change of out_schema bumps schema_version in the same statement (store/rules.py); a
-- change of out_schema alone (another writer) updates the version's row rather than lose it.
CREATE TRIGGER trigger_schema_version_update AFTER UPDATE OF out_schema, schema_version ON trigger
    FOR EACH ROW WHEN (OLD.schema_version IS DISTINCT FROM NEW.schema_version
                       OR OLD.out_schema IS DISTINCT FROM NEW.out_schema)
    EXECUTE FUNCTION trigger_schema_version_keep();

-- The schemas of today's triggers apply to every event stored before this migration (a record
-- older than every version of its trigger is masked by the oldest).
INSERT INTO trigger_schema_version (trigger_id, trigger_ref, schema_version, out_schema, since)
SELECT id, ref, schema_version, out_schema, created FROM trigger;

-- `reveal`: a role that lets a principal ask reads for secret values in clear (alone it calls
-- nothing; it goes with `viewer` or `operator`).
ALTER TABLE api_token
    DROP CONSTRAINT IF EXISTS api_token_roles_check,
    ADD CONSTRAINT api_token_roles_check
        CHECK (cardinality(roles) >= 1
               AND roles <@ ARRAY['sensor', 'executor', 'viewer', 'operator', 'webhook', 'reveal']::text[]);

-- Each reveal is audited: one record per read that returned secret values in clear, naming
-- the events or enforcements revealed.
ALTER TABLE audit_log
    DROP CONSTRAINT IF EXISTS audit_log_entity_type_check,
    ADD CONSTRAINT audit_log_entity_type_check
        CHECK (entity_type IN ('rule', 'trigger', 'token', 'enforcement', 'event'));
