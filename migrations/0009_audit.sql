-- The audit trail: every change made through the api to rules, triggers, tokens and dispatch
-- (retry, forced release), with the principal who made it, when, by which RPC, and what changed.
--
-- A row is written in the same transaction as the change it describes (store/audit.py), so
-- the two commit together or not at all. Rows are never changed: a trigger refuses UPDATE.
-- A plain table, not a hypertable: the trail is small (operators' changes, not traffic) and
-- must not be dropped by the 90-day retention of 0005_timescaledb.sql.

CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    time        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The authenticated caller (a token's name, a certificate's principal).
    principal   TEXT NOT NULL,
    -- The full method name, such as 'automation.v1.RuleService/UpdateRule'.
    rpc         TEXT NOT NULL,
    entity_type TEXT NOT NULL CHECK (entity_type IN ('rule', 'trigger', 'token', 'enforcement')),
    entity_id   BIGINT,
    -- A readable reference of the entity: a rule's or trigger's ref, a token's name.
    entity_ref  TEXT,
    -- What changed: {"field": {"old": .., "new": ..}} for updates, the record's main fields
    -- for creates, its id and ref for deletes, the enforcement and reason for dispatch.
    change      JSONB NOT NULL CHECK (jsonb_typeof(change) = 'object')
);
-- ListAuditRecords: newest first, alone or filtered by entity or by principal.
CREATE INDEX audit_log_time_idx ON audit_log (time DESC, id DESC);
CREATE INDEX audit_log_entity_time_idx ON audit_log (entity_type, entity_ref, time DESC, id DESC);
CREATE INDEX audit_log_principal_time_idx ON audit_log (principal, time DESC, id DESC);

CREATE FUNCTION audit_log_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit record % cannot be changed', OLD.id USING ERRCODE = 'restrict_violation';
END;
$$;
CREATE TRIGGER audit_log_immutable BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_update();

-- Who created or last changed a rule or trigger through the api (NULL: not known, such as a
-- row written before this migration or by a writer other than the api).
ALTER TABLE rule ADD COLUMN updated_by TEXT;
ALTER TABLE trigger ADD COLUMN updated_by TEXT;
