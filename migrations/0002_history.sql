-- Change history of executions and workers, written by triggers. Events and enforcements have
-- no history tables: events never change and an enforcement changes once (resolved_at).

CREATE TABLE execution_history (
    id             BIGSERIAL NOT NULL,
    time           TIMESTAMPTZ NOT NULL DEFAULT now(),
    operation      TEXT NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
    entity_id      BIGINT NOT NULL,
    entity_ref     TEXT,
    changed_fields TEXT[] NOT NULL,
    old_values     JSONB,
    new_values     JSONB,
    PRIMARY KEY (id, time)
);
CREATE INDEX execution_history_time_idx ON execution_history (time DESC, id DESC);
CREATE INDEX execution_history_entity_idx ON execution_history (entity_id, time DESC, id DESC);

CREATE TABLE worker_history (
    id             BIGSERIAL NOT NULL,
    time           TIMESTAMPTZ NOT NULL DEFAULT now(),
    operation      TEXT NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
    entity_id      BIGINT NOT NULL,
    entity_ref     TEXT,
    changed_fields TEXT[] NOT NULL,
    old_values     JSONB,
    new_values     JSONB,
    PRIMARY KEY (id, time)
);
CREATE INDEX worker_history_time_idx ON worker_history (time DESC, id DESC);
CREATE INDEX worker_history_entity_idx ON worker_history (entity_id, time DESC, id DESC);

-- record_history(history_table, ref_column, tracked_field...): writes one row per change of
-- a tracked field, with only the changed fields' old and new values. An UPDATE that changes
-- no tracked field (a heartbeat, say) writes nothing. The table name comes from the trigger
-- arguments, never from TG_TABLE_NAME (on a hypertable that is a chunk's name).
CREATE FUNCTION record_history() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    history_table TEXT := TG_ARGV[0];
    ref_column    TEXT := TG_ARGV[1];
    old_row       JSONB := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
    new_row       JSONB := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
    changed       TEXT[] := '{}';
    old_values    JSONB := '{}';
    new_values    JSONB := '{}';
    field         TEXT;
    i             INTEGER;
BEGIN
    FOR i IN 2 .. TG_NARGS - 1 LOOP
        field := TG_ARGV[i];
        IF TG_OP = 'UPDATE' AND (old_row -> field) IS NOT DISTINCT FROM (new_row -> field) THEN
            CONTINUE;
        END IF;
        changed := changed || field;
        IF old_row IS NOT NULL THEN
            old_values := old_values || jsonb_build_object(field, old_row -> field);
        END IF;
        IF new_row IS NOT NULL THEN
            new_values := new_values || jsonb_build_object(field, new_row -> field);
        END IF;
    END LOOP;
    IF cardinality(changed) = 0 THEN
        RETURN NULL;
    END IF;
    EXECUTE format(
        'INSERT INTO %I (operation, entity_id, entity_ref, changed_fields, old_values, new_values)
         VALUES ($1, $2, $3, $4, $5, $6)', history_table)
    USING TG_OP,
          (COALESCE(new_row, old_row) ->> 'id')::BIGINT,
          COALESCE(new_row, old_row) ->> ref_column,
          changed,
          CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE old_values END,
          CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE new_values END;
    RETURN NULL;
END;
$$;

CREATE TRIGGER execution_history_trigger
    AFTER INSERT OR UPDATE OR DELETE ON execution
    FOR EACH ROW EXECUTE FUNCTION record_history(
        'execution_history', 'action_ref', 'status', 'result', 'executor', 'parent', 'config');

CREATE TRIGGER worker_history_trigger
    AFTER INSERT OR UPDATE OR DELETE ON worker
    FOR EACH ROW EXECUTE FUNCTION record_history(
        'worker_history', 'name', 'name', 'status', 'host', 'port', 'capabilities', 'meta');
