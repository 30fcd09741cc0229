-- Dispatch of enforcements to executors, and idempotent ingestion.
--
-- enforcement_dispatch holds one row per pending enforcement, and only while it is pending:
-- a trigger adds the row in the transaction that inserts the enforcement and another removes
-- it in the transaction that resolves it. Leases live here, in PostgreSQL, so several api
-- replicas share one view of who holds what, and the enforcement hypertable itself is still
-- updated exactly once.

CREATE TABLE enforcement_dispatch (
    enforcement         BIGINT PRIMARY KEY,
    enforcement_created TIMESTAMPTZ NOT NULL,
    rule_ref            TEXT NOT NULL,
    trigger_ref         TEXT NOT NULL,
    -- How many times it was handed to an executor.
    attempts            INTEGER NOT NULL DEFAULT 0,
    -- The executor holding the lease, and the stream (lease token) it was handed on.
    leased_by           TEXT,
    lease_token         TEXT,
    lease_expires_at    TIMESTAMPTZ,
    last_error          TEXT,
    -- Set when attempts ran out; an operator retry clears it.
    exhausted_at        TIMESTAMPTZ,
    CONSTRAINT enforcement_dispatch_lease_whole
        CHECK ((leased_by IS NULL) = (lease_expires_at IS NULL)
           AND (leased_by IS NULL) = (lease_token IS NULL))
) WITH (fillfactor = 80);
-- The claim scans waiting rows oldest first.
CREATE INDEX enforcement_dispatch_ready_idx ON enforcement_dispatch (enforcement_created, enforcement)
    WHERE exhausted_at IS NULL;
CREATE INDEX enforcement_dispatch_lease_idx ON enforcement_dispatch (lease_token)
    WHERE lease_token IS NOT NULL;

CREATE FUNCTION enforcement_dispatch_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status = 'created' THEN
            INSERT INTO enforcement_dispatch (enforcement, enforcement_created, rule_ref, trigger_ref)
            VALUES (NEW.id, NEW.created, NEW.rule_ref, NEW.trigger_ref);
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        DELETE FROM enforcement_dispatch WHERE enforcement = OLD.id;
    ELSIF OLD.status = 'created' AND NEW.status <> 'created' THEN
        DELETE FROM enforcement_dispatch WHERE enforcement = NEW.id;
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER enforcement_dispatch_track
    AFTER INSERT OR UPDATE OF status OR DELETE ON enforcement
    FOR EACH ROW EXECUTE FUNCTION enforcement_dispatch_track();

-- An enforcement changes exactly once: from created to processed or disabled.
CREATE FUNCTION enforcement_resolve_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status AND OLD.status <> 'created' THEN
        RAISE EXCEPTION 'enforcement % is already %', OLD.id, OLD.status
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER enforcement_resolve_once BEFORE UPDATE OF status ON enforcement
    FOR EACH ROW EXECUTE FUNCTION enforcement_resolve_once();

-- Idempotency keys of CreateEvent / CreateEnforcement: a retry with the same key answers
-- with the stored result. Kept at least 24 hours (the api deletes older rows).
CREATE TABLE ingest_request (
    kind           TEXT NOT NULL CHECK (kind IN ('event', 'enforcement')),
    request_id     TEXT NOT NULL,
    -- Digest of the request, so that a key reused for a different request is refused.
    fingerprint    TEXT NOT NULL,
    entity_id      BIGINT NOT NULL,
    entity_created TIMESTAMPTZ NOT NULL,
    created        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, request_id)
);
CREATE INDEX ingest_request_created_idx ON ingest_request (created);
