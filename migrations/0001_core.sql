-- Core tables of the pipeline: triggers, rules, events, enforcements, executions, workers.
--
-- Storage facts (see DESIGN.md): events are immutable; an enforcement changes exactly once
-- (status created -> processed | disabled, with resolved_at); event and enforcement have
-- primary keys (id, created) so they can become TimescaleDB hypertables on `created`; no
-- foreign key points at event or enforcement (soft BIGINT references instead).

CREATE TYPE enforcement_status AS ENUM ('created', 'processed', 'disabled');
CREATE TYPE enforcement_condition AS ENUM ('all', 'any');
CREATE TYPE execution_status AS ENUM (
    'requested', 'scheduling', 'scheduled', 'running', 'completed',
    'failed', 'timeout', 'canceling', 'cancelled', 'abandoned'
);
CREATE TYPE worker_status AS ENUM ('active', 'inactive', 'busy', 'error');

CREATE TABLE trigger (
    id           BIGSERIAL PRIMARY KEY,
    ref          TEXT NOT NULL UNIQUE CHECK (ref ~ '^[a-z0-9_-]+\.[a-z0-9_.-]+$'),
    pack_ref     TEXT NOT NULL GENERATED ALWAYS AS (split_part(ref, '.', 1)) STORED,
    label        TEXT NOT NULL DEFAULT '',
    description  TEXT NOT NULL DEFAULT '',
    param_schema JSONB,
    out_schema   JSONB,
    created      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX trigger_pack_created_idx ON trigger (pack_ref, created DESC, id DESC);
CREATE INDEX trigger_created_idx ON trigger (created DESC, id DESC);

CREATE TABLE rule (
    id            BIGSERIAL PRIMARY KEY,
    ref           TEXT NOT NULL UNIQUE CHECK (ref ~ '^[a-z0-9_-]+\.[a-z0-9_.-]+$'),
    pack_ref      TEXT NOT NULL GENERATED ALWAYS AS (split_part(ref, '.', 1)) STORED,
    label         TEXT NOT NULL DEFAULT '',
    description   TEXT NOT NULL DEFAULT '',
    trigger       BIGINT REFERENCES trigger (id) ON DELETE SET NULL,
    trigger_ref   TEXT NOT NULL,
    -- NULL means "no action": enforcements of the rule resolve disabled.
    action_ref    TEXT CHECK (action_ref ~ '^[a-z0-9_-]+\.[a-z0-9_.-]+$'),
    action_params JSONB NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(action_params) = 'object'),
    conditions    JSONB NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(conditions) = 'array'),
    condition     enforcement_condition NOT NULL DEFAULT 'all',
    enabled       BOOLEAN NOT NULL DEFAULT TRUE,
    created       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated       TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Matching an event reads the enabled rules of its trigger.
CREATE INDEX rule_trigger_enabled_idx ON rule (trigger_ref) WHERE enabled;
CREATE INDEX rule_trigger_idx ON rule (trigger);
CREATE INDEX rule_created_idx ON rule (created DESC, id DESC);
CREATE INDEX rule_pack_created_idx ON rule (pack_ref, created DESC, id DESC);
CREATE INDEX rule_trigger_ref_created_idx ON rule (trigger_ref, created DESC, id DESC);
CREATE INDEX rule_action_created_idx ON rule (action_ref, created DESC, id DESC);

CREATE TABLE event (
    id          BIGSERIAL NOT NULL,
    trigger     BIGINT REFERENCES trigger (id) ON DELETE SET NULL,
    trigger_ref TEXT NOT NULL,
    config      JSONB,
    payload     JSONB NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(payload) = 'object'),
    source      BIGINT,
    source_ref  TEXT,
    rule        BIGINT REFERENCES rule (id) ON DELETE SET NULL,
    rule_ref    TEXT,
    created     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created)
);
COMMENT ON TABLE event IS 'Immutable: rows are never updated (a trigger refuses it) and have no updated column.';
CREATE INDEX event_created_idx ON event (created DESC, id DESC);
CREATE INDEX event_trigger_ref_created_idx ON event (trigger_ref, created DESC, id DESC);
CREATE INDEX event_source_ref_created_idx ON event (source_ref, created DESC, id DESC) WHERE source_ref IS NOT NULL;
CREATE INDEX event_rule_ref_created_idx ON event (rule_ref, created DESC, id DESC) WHERE rule_ref IS NOT NULL;
-- The ON DELETE SET NULL actions look events up by trigger and rule.
CREATE INDEX event_trigger_idx ON event (trigger) WHERE trigger IS NOT NULL;
CREATE INDEX event_rule_idx ON event (rule) WHERE rule IS NOT NULL;

-- Events are immutable. The one change allowed is the one the foreign keys make when a
-- trigger or rule is deleted: unsetting that reference.
CREATE FUNCTION event_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.trigger IS NULL OR NEW.trigger IS NOT DISTINCT FROM OLD.trigger)
       AND (NEW.rule IS NULL OR NEW.rule IS NOT DISTINCT FROM OLD.rule)
       AND (NEW.id, NEW.trigger_ref, NEW.config, NEW.payload, NEW.source, NEW.source_ref,
            NEW.rule_ref, NEW.created)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.trigger_ref, OLD.config, OLD.payload, OLD.source, OLD.source_ref,
            OLD.rule_ref, OLD.created)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'event % is immutable and cannot be updated', OLD.id
        USING ERRCODE = 'restrict_violation';
END;
$$;
CREATE TRIGGER event_immutable BEFORE UPDATE ON event
    FOR EACH ROW EXECUTE FUNCTION event_refuse_update();

CREATE TABLE enforcement (
    id          BIGSERIAL NOT NULL,
    rule        BIGINT REFERENCES rule (id) ON DELETE SET NULL,
    rule_ref    TEXT NOT NULL,
    trigger_ref TEXT NOT NULL,
    config      JSONB,
    -- Soft reference to event(id): no foreign key may point at a hypertable.
    event       BIGINT,
    status      enforcement_status NOT NULL DEFAULT 'created',
    payload     JSONB NOT NULL DEFAULT '{}',
    condition   enforcement_condition NOT NULL DEFAULT 'all',
    conditions  JSONB NOT NULL DEFAULT '[]',
    created     TIMESTAMPTZ NOT NULL DEFAULT now(),
    resolved_at TIMESTAMPTZ,
    PRIMARY KEY (id, created),
    CONSTRAINT enforcement_resolved_at_iff_resolved
        CHECK ((status = 'created') = (resolved_at IS NULL))
);
COMMENT ON COLUMN enforcement.resolved_at IS 'Set in the one update that moves status away from created; NULL exactly while created.';
CREATE INDEX enforcement_created_idx ON enforcement (created DESC, id DESC);
CREATE INDEX enforcement_rule_ref_created_idx ON enforcement (rule_ref, created DESC, id DESC);
CREATE INDEX enforcement_trigger_ref_created_idx ON enforcement (trigger_ref, created DESC, id DESC);
CREATE INDEX enforcement_status_created_idx ON enforcement (status, created DESC, id DESC);
CREATE INDEX enforcement_event_idx ON enforcement (event, created DESC, id DESC) WHERE event IS NOT NULL;
CREATE INDEX enforcement_rule_idx ON enforcement (rule) WHERE rule IS NOT NULL;
-- Finds pending enforcements fast: it holds only the rows still waiting.
CREATE INDEX enforcement_pending_idx ON enforcement (created, id) WHERE status = 'created';

CREATE TABLE worker (
    id             BIGSERIAL PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    worker_type    TEXT NOT NULL DEFAULT 'local',
    host           TEXT,
    port           INTEGER,
    status         worker_status NOT NULL DEFAULT 'active',
    capabilities   JSONB NOT NULL DEFAULT '{}',
    meta           JSONB NOT NULL DEFAULT '{}',
    last_heartbeat TIMESTAMPTZ,
    created        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated        TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE execution (
    id          BIGSERIAL PRIMARY KEY,
    action_ref  TEXT NOT NULL,
    config      JSONB NOT NULL DEFAULT '{}',
    -- Soft reference to enforcement(id): no foreign key may point at a hypertable.
    enforcement BIGINT,
    parent      BIGINT REFERENCES execution (id) ON DELETE SET NULL,
    executor    BIGINT REFERENCES worker (id) ON DELETE SET NULL,
    status      execution_status NOT NULL DEFAULT 'requested',
    result      JSONB,
    created     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated     TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- One execution per enforcement at most: the last line of defence of "exactly once".
CREATE UNIQUE INDEX execution_enforcement_key ON execution (enforcement) WHERE enforcement IS NOT NULL;
CREATE INDEX execution_created_idx ON execution (created DESC, id DESC);
CREATE INDEX execution_action_created_idx ON execution (action_ref, created DESC, id DESC);
CREATE INDEX execution_status_created_idx ON execution (status, created DESC, id DESC);
CREATE INDEX execution_parent_idx ON execution (parent) WHERE parent IS NOT NULL;
CREATE INDEX execution_executor_idx ON execution (executor) WHERE executor IS NOT NULL;

CREATE FUNCTION touch_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated := now();
    RETURN NEW;
END;
$$;
CREATE TRIGGER trigger_touch BEFORE UPDATE ON trigger FOR EACH ROW EXECUTE FUNCTION touch_updated();
CREATE TRIGGER rule_touch BEFORE UPDATE ON rule FOR EACH ROW EXECUTE FUNCTION touch_updated();
CREATE TRIGGER worker_touch BEFORE UPDATE ON worker FOR EACH ROW EXECUTE FUNCTION touch_updated();
CREATE TRIGGER execution_touch BEFORE UPDATE ON execution FOR EACH ROW EXECUTE FUNCTION touch_updated();
