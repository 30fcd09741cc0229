-- ============================================================================================
-- TimescaleDB: a database whose hypertables were made on the Apache-licensed edition (0005 left
-- out compression, policies and continuous aggregates there) and that now runs on the
-- Timescale-licensed edition gets the licensed layout: compression as 0005 and 0014 set it,
-- the compression and retention policies, and the volume views as real-time continuous
-- aggregates in place of the ordinary views (they hold no data of their own; the new ones are
-- created WITH NO DATA and filled by their policies, real-time aggregation covering the rest).
--
-- Nothing happens on plain PostgreSQL, on the Apache-licensed edition (the api's maintenance
-- drops chunks past 90 days there), or where 0005 already made the licensed layout.
--
-- It is a function, and the migration runner calls it after every run (``migrate.py``
-- ``LAYOUT``), not only once here: a database migrated on the Apache edition (0016 included)
-- that moves to the licensed one later gets the layout at its next migrate.
-- A database moved the other way (licensed to Apache) keeps its objects: the Apache edition
-- neither runs policies nor reads compressed chunks, so decompress them before such a move.
-- ============================================================================================
CREATE OR REPLACE FUNCTION automation_timescaledb_layout() RETURNS void LANGUAGE plpgsql AS $migration$
DECLARE
    version INT[];
BEGIN
    SELECT string_to_array(split_part(extversion, '-', 1), '.')::INT[] INTO version
      FROM pg_extension WHERE extname = 'timescaledb';
    IF version IS NULL THEN
        RETURN;
    END IF;
    IF current_setting('timescaledb.license', true) IS DISTINCT FROM 'timescale' THEN
        RETURN;
    END IF;
    -- Plain tables (the extension came after 0005), or the licensed layout already there.
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                    WHERE hypertable_schema = 'public' AND hypertable_name = 'enforcement' AND NOT compression_enabled) THEN
        RETURN;
    END IF;
    RAISE NOTICE 'hypertables made on the Apache edition: adding compression, policies and continuous aggregates';

    ALTER TABLE event SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'trigger_ref',
        timescaledb.compress_orderby = 'created DESC, id DESC');
    ALTER TABLE enforcement SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'rule_ref',
        timescaledb.compress_orderby = 'created DESC, id DESC');
    ALTER TABLE execution_history SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'entity_id',
        timescaledb.compress_orderby = 'time DESC, id DESC');
    ALTER TABLE worker_history SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'entity_id',
        timescaledb.compress_orderby = 'time DESC, id DESC');
    IF version >= ARRAY[2, 22] THEN
        ALTER TABLE enforcement SET (
            timescaledb.sparse_index = 'minmax(event), bloom(trigger_ref), bloom(rule), bloom(status)');
    END IF;

    PERFORM add_compression_policy('event', INTERVAL '7 days', if_not_exists => TRUE);
    PERFORM add_compression_policy('enforcement', INTERVAL '7 days', if_not_exists => TRUE);
    PERFORM add_compression_policy('execution_history', INTERVAL '7 days', if_not_exists => TRUE);
    PERFORM add_compression_policy('worker_history', INTERVAL '7 days', if_not_exists => TRUE);

    PERFORM add_retention_policy('event', INTERVAL '90 days', if_not_exists => TRUE);
    PERFORM add_retention_policy('enforcement', INTERVAL '90 days', if_not_exists => TRUE);
    PERFORM add_retention_policy('execution_history', INTERVAL '90 days', if_not_exists => TRUE);
    PERFORM add_retention_policy('worker_history', INTERVAL '90 days', if_not_exists => TRUE);

    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates
                    WHERE view_name = 'event_volume_hourly') THEN
        DROP VIEW IF EXISTS event_volume_hourly;
        CREATE MATERIALIZED VIEW event_volume_hourly
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT time_bucket(INTERVAL '1 hour', created) AS bucket, trigger_ref,
                   count(*) AS event_count
            FROM event GROUP BY 1, 2
            WITH NO DATA;
        PERFORM add_continuous_aggregate_policy('event_volume_hourly',
            start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
            schedule_interval => INTERVAL '30 minutes', if_not_exists => TRUE);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates
                    WHERE view_name = 'enforcement_volume_hourly') THEN
        DROP VIEW IF EXISTS enforcement_volume_hourly;
        CREATE MATERIALIZED VIEW enforcement_volume_hourly
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT time_bucket(INTERVAL '1 hour', created) AS bucket, rule_ref, status,
                   count(*) AS enforcement_count
            FROM enforcement GROUP BY 1, 2, 3
            WITH NO DATA;
        PERFORM add_continuous_aggregate_policy('enforcement_volume_hourly',
            start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
            schedule_interval => INTERVAL '30 minutes', if_not_exists => TRUE);
    END IF;
END
$migration$;

SELECT automation_timescaledb_layout();
