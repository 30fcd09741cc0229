-- The rule language: condition trees, backstop rules, re-emitted events, and a version of
-- each trigger's rule set, so that every api replica knows when the rules it compiled are
-- stale.

-- A backstop rule fires for an event only when no standard rule of its trigger matched it.
ALTER TABLE rule ADD COLUMN backstop BOOLEAN NOT NULL DEFAULT false;

-- Tests and groups in the rule's condition tree (nested ones included): what the per-trigger
-- bound on conditions counts. Every stored rule so far has a flat list of tests.
ALTER TABLE rule ADD COLUMN condition_nodes INT NOT NULL DEFAULT 0 CHECK (condition_nodes >= 0);
UPDATE rule SET condition_nodes = jsonb_array_length(conditions);

-- One row per trigger reference that has (or had) rules; its version changes, to a value
-- never used before, in the transaction of every change to those rules. An api compares it
-- with the version of the rules it compiled when it reads the rest of an event's context, so
-- a rule changed through any replica (or by SQL) is used from its commit on. No row: the
-- trigger reference never had a rule.
CREATE SEQUENCE rule_set_version_seq;
CREATE TABLE rule_set (
    trigger_ref TEXT PRIMARY KEY,
    version     BIGINT NOT NULL
);
INSERT INTO rule_set (trigger_ref, version)
SELECT trigger_ref, nextval('rule_set_version_seq') FROM (SELECT DISTINCT trigger_ref FROM rule) r;

CREATE FUNCTION rule_set_bump() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ref TEXT;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE rule_set SET version = nextval('rule_set_version_seq');
        RETURN NULL;
    END IF;
    FOREACH ref IN ARRAY ARRAY(
        SELECT DISTINCT x FROM unnest(ARRAY[
            CASE WHEN TG_OP <> 'DELETE' THEN NEW.trigger_ref END,
            CASE WHEN TG_OP <> 'INSERT' THEN OLD.trigger_ref END]) AS x
         WHERE x IS NOT NULL)
    LOOP
        INSERT INTO rule_set (trigger_ref, version) VALUES (ref, nextval('rule_set_version_seq'))
        ON CONFLICT (trigger_ref) DO UPDATE SET version = EXCLUDED.version;
    END LOOP;
    RETURN NULL;
END;
$$;
CREATE TRIGGER rule_set_bump AFTER INSERT OR UPDATE OR DELETE ON rule
    FOR EACH ROW EXECUTE FUNCTION rule_set_bump();
CREATE TRIGGER rule_set_bump_truncate AFTER TRUNCATE ON rule
    FOR EACH STATEMENT EXECUTE FUNCTION rule_set_bump();

-- The event a re-emitted event repeats (ReemitEvent); NULL for an event a sensor reported.
-- A soft reference, like enforcement.event: no foreign key points at a hypertable.
ALTER TABLE event ADD COLUMN reemit_of BIGINT;
-- ListEvents filtered by reemit_of.
CREATE INDEX event_reemit_of_idx ON event (reemit_of, created DESC, id DESC) WHERE reemit_of IS NOT NULL;
