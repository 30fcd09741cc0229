-- Three changes on the pipeline's hot path (every event, every resolution).
--
-- 1. Direct hand-off: the api may write an enforcement's dispatch row itself, already leased
--    to one of its watch streams, in the statement that inserts the enforcement (saving the
--    claim that would follow). The tracking trigger then finds the row there and leaves it.
CREATE OR REPLACE FUNCTION enforcement_dispatch_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status = 'created' THEN
            INSERT INTO enforcement_dispatch (enforcement, enforcement_created, rule_ref, trigger_ref)
            VALUES (NEW.id, NEW.created, NEW.rule_ref, NEW.trigger_ref)
            ON CONFLICT (enforcement) DO NOTHING;
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        DELETE FROM enforcement_dispatch WHERE enforcement = OLD.id;
    ELSIF OLD.status = 'created' AND NEW.status <> 'created' THEN
        DELETE FROM enforcement_dispatch WHERE enforcement = NEW.id;
    END IF;
    RETURN NULL;
END;
$$;

-- 2. The history of a new execution, written by static SQL. record_history() builds its
--    INSERT with EXECUTE (its table is an argument), which PostgreSQL parses and plans on
--    every call: about a third of a resolution's time. Updates and deletes, rarer, keep it.
CREATE FUNCTION record_execution_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO execution_history (operation, entity_id, entity_ref, changed_fields, old_values, new_values)
    VALUES ('INSERT', NEW.id, NEW.action_ref, ARRAY['status', 'result', 'executor', 'parent', 'config'], NULL,
            jsonb_build_object('status', NEW.status, 'result', NEW.result, 'executor', NEW.executor,
                               'parent', NEW.parent, 'config', NEW.config));
    RETURN NULL;
END;
$$;

DROP TRIGGER execution_history_trigger ON execution;
CREATE TRIGGER execution_history_trigger
    AFTER UPDATE OR DELETE ON execution
    FOR EACH ROW EXECUTE FUNCTION record_history(
        'execution_history', 'action_ref', 'status', 'result', 'executor', 'parent', 'config');
CREATE TRIGGER execution_history_insert
    AFTER INSERT ON execution
    FOR EACH ROW EXECUTE FUNCTION record_execution_insert();

-- 3. enforcement_dispatch is a queue table: each row lives for milliseconds to seconds. Let
--    autovacuum clean it after a fixed number of dead rows, without throttling (the api also
--    vacuums it every few seconds; autovacuum visits a database only about once a minute).
ALTER TABLE enforcement_dispatch SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
