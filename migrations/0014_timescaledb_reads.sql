-- ============================================================================================
-- TimescaleDB: compressed chunks laid out for the list queries (only where 0005 made
-- hypertables; nothing on plain PostgreSQL; the compression settings only on the
-- Timescale-licensed edition, where 0005 turned compression on: the Apache-licensed edition
-- refuses them, and 0016 applies them if the database moves to the licensed edition).
--
-- * compress_orderby 'created DESC, id DESC' (was 'created DESC, id'): the order of every list
--   (keyset on (created, id), newest first). With it, a page inside a compressed chunk is a
--   merge of the segments' batches that stops after LIMIT rows; with the old order each chunk
--   was decompressed whole and sorted (10-26 ms a page on 3M events / 6M enforcements).
-- * enforcement: a min/max sparse index on `event` (ids grow with time, so each batch spans a
--   narrow range) instead of the automatic bloom filter, whose hashing cost 0.3 ms per chunk
--   on every ListEnforcements(event) page; blooms kept where a filter has them today.
-- * The single-column `created DESC` / `time DESC` indexes create_hypertable added duplicate
--   our (created DESC, id DESC) ones: every insert paid for both.
--
-- Chunks compressed before this migration keep their old layout (TimescaleDB applies new
-- settings at the next compression) until retention drops them; to convert them at once:
--   SELECT compress_chunk(c, recompress => true) FROM show_chunks('event', older_than => INTERVAL '7 days') c;
--   (and the same for enforcement, execution_history, worker_history).
-- ============================================================================================
DO $migration$
DECLARE
    version INT[];
    duplicate RECORD;
BEGIN
    SELECT string_to_array(split_part(extversion, '-', 1), '.')::INT[] INTO version
      FROM pg_extension WHERE extname = 'timescaledb';
    IF version IS NULL THEN
        RETURN;
    END IF;
    -- An extension installed after 0005 ran without it leaves plain tables.
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = 'enforcement') THEN
        RETURN;
    END IF;

    IF current_setting('timescaledb.license', true) = 'timescale'
       AND (SELECT compression_enabled FROM timescaledb_information.hypertables
             WHERE hypertable_schema = 'public' AND hypertable_name = 'enforcement') THEN
        ALTER TABLE event SET (timescaledb.compress_orderby = 'created DESC, id DESC');
        ALTER TABLE enforcement SET (timescaledb.compress_orderby = 'created DESC, id DESC');
        ALTER TABLE execution_history SET (timescaledb.compress_orderby = 'time DESC, id DESC');
        ALTER TABLE worker_history SET (timescaledb.compress_orderby = 'time DESC, id DESC');

        -- Explicit sparse indexes arrived in 2.22; older versions keep their automatic ones.
        IF version >= ARRAY[2, 22] THEN
            ALTER TABLE enforcement SET (
                timescaledb.sparse_index = 'minmax(event), bloom(trigger_ref), bloom(rule), bloom(status)');
        END IF;
    END IF;

    FOR duplicate IN
        SELECT i.indexname
          FROM pg_indexes i
         WHERE i.schemaname = 'public'
           AND i.tablename IN ('event', 'enforcement', 'execution_history', 'worker_history')
           AND (i.indexdef LIKE '%USING btree (created DESC)'
                OR i.indexdef LIKE '%USING btree ("time" DESC)')
    LOOP
        EXECUTE format('DROP INDEX public.%I', duplicate.indexname);
    END LOOP;
END
$migration$;
