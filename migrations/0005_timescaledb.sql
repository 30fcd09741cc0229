-- ============================================================================================
-- TimescaleDB: every TimescaleDB statement of the schema lives in this file, and runs only
-- where the extension is available AND preloaded (CREATE EXTENSION on a server that did not
-- preload the library is a FATAL that drops the connection and cannot be caught).
--
-- With the extension: event and enforcement become hypertables on `created` (1-day chunks),
-- the history tables likewise on `time` (7-day chunks). Then by edition (`timescaledb.license`):
-- * 'timescale' (the Timescale-licensed edition): compressed after 7 days (segmented by
--   trigger_ref / rule_ref), dropped after 90 days by retention policies; the hourly volume
--   views are continuous aggregates (created WITH NO DATA, which is allowed in a transaction;
--   real-time aggregation on, so rows not yet materialised still show) refreshed by policies.
-- * 'apache' (the Apache-licensed edition: Debian's and Ubuntu's packages, some managed
--   services), which refuses compression, continuous aggregates and every policy: no
--   compression, the volume views are ordinary views, and the api's maintenance drops chunks
--   older than 90 days itself (drop_chunks is in that edition). 0016 completes the licensed
--   layout if the database later moves to the licensed edition.
-- Without the extension: the same view names and columns as ordinary views over the base tables.
-- Everything here is allowed inside the migration's transaction; refreshes and run_job are
-- not, and are left to the policies' background jobs.
-- ============================================================================================
DO $migration$
DECLARE
    use_timescaledb BOOLEAN :=
        EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
        OR (EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
            AND current_setting('timescaledb.disable_load', true) IS NOT NULL);
BEGIN
    IF NOT use_timescaledb THEN
        RAISE NOTICE 'timescaledb is not available: plain tables and ordinary volume views';
        CREATE VIEW event_volume_hourly AS
            SELECT date_trunc('hour', created, 'UTC') AS bucket, trigger_ref, count(*) AS event_count
            FROM event GROUP BY 1, 2;
        CREATE VIEW enforcement_volume_hourly AS
            SELECT date_trunc('hour', created, 'UTC') AS bucket, rule_ref, status,
                   count(*) AS enforcement_count
            FROM enforcement GROUP BY 1, 2, 3;
        RETURN;
    END IF;

    CREATE EXTENSION IF NOT EXISTS timescaledb;

    PERFORM create_hypertable('event', by_range('created', INTERVAL '1 day'),
                              if_not_exists => TRUE, migrate_data => TRUE);
    PERFORM create_hypertable('enforcement', by_range('created', INTERVAL '1 day'),
                              if_not_exists => TRUE, migrate_data => TRUE);
    PERFORM create_hypertable('execution_history', by_range('time', INTERVAL '7 days'),
                              if_not_exists => TRUE, migrate_data => TRUE);
    PERFORM create_hypertable('worker_history', by_range('time', INTERVAL '7 days'),
                              if_not_exists => TRUE, migrate_data => TRUE);

    IF current_setting('timescaledb.license', true) IS DISTINCT FROM 'timescale' THEN
        RAISE NOTICE 'timescaledb edition %: no compression, policies or continuous aggregates; '
                     'the api drops chunks past 90 days itself', current_setting('timescaledb.license', true);
        CREATE VIEW event_volume_hourly AS
            SELECT time_bucket(INTERVAL '1 hour', created) AS bucket, trigger_ref, count(*) AS event_count
            FROM event GROUP BY 1, 2;
        CREATE VIEW enforcement_volume_hourly AS
            SELECT time_bucket(INTERVAL '1 hour', created) AS bucket, rule_ref, status,
                   count(*) AS enforcement_count
            FROM enforcement GROUP BY 1, 2, 3;
        RETURN;
    END IF;

    ALTER TABLE event SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'trigger_ref',
        timescaledb.compress_orderby = 'created DESC, id');
    ALTER TABLE enforcement SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'rule_ref',
        timescaledb.compress_orderby = 'created DESC, id');
    ALTER TABLE execution_history SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'entity_id',
        timescaledb.compress_orderby = 'time DESC, id');
    ALTER TABLE worker_history SET (timescaledb.compress,
        timescaledb.compress_segmentby = 'entity_id',
        timescaledb.compress_orderby = 'time DESC, id');

    PERFORM add_compression_policy('event', INTERVAL '7 days', if_not_exists => TRUE);
    PERFORM add_compression_policy('enforcement', INTERVAL '7 days', if_not_exists => TRUE);
    PERFORM add_compression_policy('execution_history', INTERVAL '7 days', if_not_exists => TRUE);
    PERFORM add_compression_policy('worker_history', INTERVAL '7 days', if_not_exists => TRUE);

    PERFORM add_retention_policy('event', INTERVAL '90 days', if_not_exists => TRUE);
    PERFORM add_retention_policy('enforcement', INTERVAL '90 days', if_not_exists => TRUE);
    PERFORM add_retention_policy('execution_history', INTERVAL '90 days', if_not_exists => TRUE);
    PERFORM add_retention_policy('worker_history', INTERVAL '90 days', if_not_exists => TRUE);

    CREATE MATERIALIZED VIEW event_volume_hourly
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT time_bucket(INTERVAL '1 hour', created) AS bucket, trigger_ref,
               count(*) AS event_count
        FROM event GROUP BY 1, 2
        WITH NO DATA;
    CREATE MATERIALIZED VIEW enforcement_volume_hourly
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT time_bucket(INTERVAL '1 hour', created) AS bucket, rule_ref, status,
               count(*) AS enforcement_count
        FROM enforcement GROUP BY 1, 2, 3
        WITH NO DATA;
    PERFORM add_continuous_aggregate_policy('event_volume_hourly',
        start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
        schedule_interval => INTERVAL '30 minutes', if_not_exists => TRUE);
    PERFORM add_continuous_aggregate_policy('enforcement_volume_hourly',
        start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
        schedule_interval => INTERVAL '30 minutes', if_not_exists => TRUE);
END
$migration$;
