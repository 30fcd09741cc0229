-- Notifications of new events, new enforcements and resolved enforcements.
-- They only wake listeners early: nothing depends on them for correctness (the api also
-- polls). Payloads carry resolved_at, never an `updated` column, and never TG_TABLE_NAME
-- (a chunk's name on a hypertable).
--
-- A NOTIFY inside a write transaction takes a global lock at commit, which serialises every
-- notifying commit. Sessions that set `automation.notify = off` skip these triggers: the api
-- does, and announces its own writes itself, batched and debounced outside its write
-- transactions (services/api/dispatcher.py), with the same payloads in JSON arrays. Every
-- other writer (psql, scripts, tools) notifies through these triggers.

CREATE FUNCTION notify_event_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('event_created', json_build_object(
        'id', NEW.id, 'trigger_ref', NEW.trigger_ref, 'rule_ref', NEW.rule_ref,
        'created', NEW.created)::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER event_notify AFTER INSERT ON event
    FOR EACH ROW WHEN (current_setting('automation.notify', true) IS DISTINCT FROM 'off')
    EXECUTE FUNCTION notify_event_created();

CREATE FUNCTION notify_enforcement_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM pg_notify(
            CASE WHEN TG_OP = 'INSERT' THEN 'enforcement_created' ELSE 'enforcement_resolved' END,
            json_build_object(
                'id', NEW.id, 'rule_ref', NEW.rule_ref, 'trigger_ref', NEW.trigger_ref,
                'event', NEW.event, 'status', NEW.status, 'created', NEW.created,
                'resolved_at', NEW.resolved_at)::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER enforcement_notify AFTER INSERT OR UPDATE OF status ON enforcement
    FOR EACH ROW WHEN (current_setting('automation.notify', true) IS DISTINCT FROM 'off')
    EXECUTE FUNCTION notify_enforcement_change();
