-- ============================================================================================
-- TimescaleDB (Timescale-licensed edition): per-minute volume views, event_volume_minute and
-- enforcement_volume_minute, real-time continuous aggregates refreshed every minute over the
-- last 4 hours.
--
-- Why: the hourly ones (0005) are refreshed every 30 minutes up to an hour ago, so their last
-- one to two and a half hours are counted from the base tables at every read. After a burst
-- that is most of the work: with 50,000 events and 100,000 enforcements in the last hour the
-- console's volume page took 250 ms, all of it counting rows. The api reads the last hours from
-- these (store/analytics.py) and the rest from the hourly ones.
--
-- Their rows are dropped after a day (retention drops whole chunks of the view, 10 days each
-- by default, so about 11 days of minutes stay: some 16,000 rows per trigger).
--
-- A function, which the migration runner calls after every run as it does 0016's (``migrate.py``
-- ``LAYOUT``): a database that moves from the Apache edition to the licensed one gets them at
-- its next migrate. Nothing happens on plain PostgreSQL or the Apache edition.
-- ============================================================================================
CREATE OR REPLACE FUNCTION automation_timescaledb_recent_volume() RETURNS void LANGUAGE plpgsql AS $migration$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN;
    END IF;
    IF current_setting('timescaledb.license', true) IS DISTINCT FROM 'timescale' THEN
        RETURN;
    END IF;
    -- The hourly views must be continuous aggregates first (0005, or 0016's function).
    IF (SELECT count(*) FROM timescaledb_information.continuous_aggregates
         WHERE view_schema = 'public' AND view_name IN ('event_volume_hourly', 'enforcement_volume_hourly')) < 2 THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates
                    WHERE view_schema = 'public' AND view_name = 'event_volume_minute') THEN
        CREATE MATERIALIZED VIEW event_volume_minute
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT time_bucket(INTERVAL '1 minute', created) AS bucket, trigger_ref,
                   count(*) AS event_count
            FROM event GROUP BY 1, 2
            WITH NO DATA;
        PERFORM add_continuous_aggregate_policy('event_volume_minute',
            start_offset => INTERVAL '4 hours', end_offset => INTERVAL '1 minute',
            schedule_interval => INTERVAL '1 minute', if_not_exists => TRUE);
        PERFORM add_retention_policy('event_volume_minute', drop_after => INTERVAL '1 day', if_not_exists => TRUE);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates
                    WHERE view_schema = 'public' AND view_name = 'enforcement_volume_minute') THEN
        CREATE MATERIALIZED VIEW enforcement_volume_minute
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT time_bucket(INTERVAL '1 minute', created) AS bucket, rule_ref, status,
                   count(*) AS enforcement_count
            FROM enforcement GROUP BY 1, 2, 3
            WITH NO DATA;
        PERFORM add_continuous_aggregate_policy('enforcement_volume_minute',
            start_offset => INTERVAL '4 hours', end_offset => INTERVAL '1 minute',
            schedule_interval => INTERVAL '1 minute', if_not_exists => TRUE);
        PERFORM add_retention_policy('enforcement_volume_minute', drop_after => INTERVAL '1 day', if_not_exists => TRUE);
    END IF;
END
$migration$;

SELECT automation_timescaledb_recent_volume();
