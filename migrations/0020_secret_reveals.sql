-- Secret fields reach executions too: an execution's config (and its result, which may echo
-- it) holds what was rendered from its enforcement's payload. Reads mask them like the
-- enforcement's, and a read that reveals them is audited under the executions it showed.
ALTER TABLE audit_log
    DROP CONSTRAINT IF EXISTS audit_log_entity_type_check,
    ADD CONSTRAINT audit_log_entity_type_check
        CHECK (entity_type IN ('rule', 'trigger', 'token', 'enforcement', 'event', 'execution'));
