-- What became of each delivery attempt that did not end in a resolution: released (by its
-- executor, a closing stream or an operator, with the reason given), its lease expired, the
-- enforcement exhausted its attempts, or an operator retried it. The dispatch row keeps only
-- the last error and a counter that a retry resets; an operator looking at a failing
-- enforcement needs every earlier attempt too (the console's enforcement page).
--
-- Written by a trigger on enforcement_dispatch, so every writer's changes are recorded (the
-- api's statements, another replica's, a person's psql). Only failures are recorded: a
-- resolution deletes the dispatch row and fires nothing here, and renewals and first claims
-- are filtered out by the trigger's WHEN clause before the function runs, so the hot path
-- (hand-off, claim, renew, resolve) writes nothing more. A plain table, small (failures
-- only), not a hypertable; the api forgets rows older than 90 days with its dispatch orphans.

CREATE TABLE enforcement_attempt (
    id                  BIGSERIAL PRIMARY KEY,
    enforcement         BIGINT NOT NULL,
    -- The attempt this outcome ends (the dispatch row's counter then; a retry starts again at 1).
    attempt             INTEGER NOT NULL,
    outcome             TEXT NOT NULL CHECK (outcome IN ('released', 'lease_expired', 'exhausted', 'retried')),
    -- The executor (and its principal) that held the lease, when one did.
    executor_id         TEXT,
    principal           TEXT,
    -- The reason given (released), or the error the row was left with.
    error               TEXT,
    time                TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX enforcement_attempt_enforcement_idx ON enforcement_attempt (enforcement, id);
CREATE INDEX enforcement_attempt_time_idx ON enforcement_attempt (time);

CREATE FUNCTION enforcement_attempt_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A lease ended without a resolution: given back (no new holder), or taken over by a new
    -- claim or marked exhausted after it expired.
    IF OLD.lease_token IS NOT NULL AND NEW.lease_token IS DISTINCT FROM OLD.lease_token THEN
        INSERT INTO enforcement_attempt (enforcement, attempt, outcome, executor_id, principal, error)
        VALUES (OLD.enforcement, OLD.attempts,
                CASE WHEN OLD.lease_expires_at <= now() THEN 'lease_expired' ELSE 'released' END,
                OLD.leased_by, OLD.lease_principal,
                CASE WHEN OLD.lease_expires_at <= now() THEN 'lease of ' || OLD.leased_by || ' expired'
                     ELSE NEW.last_error END);
    END IF;
    IF NEW.exhausted_at IS NOT NULL AND OLD.exhausted_at IS NULL THEN
        INSERT INTO enforcement_attempt (enforcement, attempt, outcome, error)
        VALUES (NEW.enforcement, NEW.attempts, 'exhausted', NEW.last_error);
    ELSIF NEW.exhausted_at IS NULL AND OLD.exhausted_at IS NOT NULL THEN
        INSERT INTO enforcement_attempt (enforcement, attempt, outcome, error)
        VALUES (NEW.enforcement, OLD.attempts, 'retried', OLD.last_error);
    END IF;
    RETURN NULL;
END;
$$;
-- The WHEN clause is evaluated before the function is called: renewals (only the expiry
-- changes) and claims of unleased rows never run it.
CREATE TRIGGER enforcement_attempt_record
    AFTER UPDATE ON enforcement_dispatch
    FOR EACH ROW
    WHEN ((OLD.lease_token IS NOT NULL AND NEW.lease_token IS DISTINCT FROM OLD.lease_token)
          OR (NEW.exhausted_at IS DISTINCT FROM OLD.exhausted_at))
    EXECUTE FUNCTION enforcement_attempt_record();
