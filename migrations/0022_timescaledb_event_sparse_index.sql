-- ============================================================================================
-- TimescaleDB (Timescale-licensed edition, where 0005 turned compression on): compressed event
-- batches get a min/max sparse index on `reemit_of` instead of the automatic bloom filter.
--
-- Why: almost every event has no `reemit_of`. A batch whose values are all NULL gets a NULL
-- bloom filter, and TimescaleDB treats a NULL bloom as "may contain anything": a lookup by
-- `reemit_of` (an event's page lists its re-emissions) decompressed every batch of every
-- compressed chunk it reached, about 3 ms a chunk (100 ms on the page of an event 45 days
-- old). A NULL min/max excludes the batch before decompression (measured: 0.06 ms a chunk).
-- The other automatic ones are kept as they were (bloom on trigger, source_ref, rule and
-- rule_ref): naming any sparse index turns the automatic ones off.
--
-- Chunks compressed before this migration keep their old layout (TimescaleDB applies new
-- settings at the next compression) until retention drops them; to convert them at once:
--   SELECT compress_chunk(decompress_chunk(c)) FROM show_chunks('event', older_than => INTERVAL '7 days') c;
-- A database that moves from the Apache edition to the licensed one after this migration gets
-- 0016's layout (the automatic sparse indexes on event): run this file's ALTER TABLE by hand.
-- ============================================================================================
DO $migration$
DECLARE
    version INT[];
BEGIN
    SELECT string_to_array(split_part(extversion, '-', 1), '.')::INT[] INTO version
      FROM pg_extension WHERE extname = 'timescaledb';
    IF version IS NULL THEN
        RETURN;
    END IF;
    -- Explicit sparse indexes arrived in 2.22; older versions keep their automatic ones.
    IF version < ARRAY[2, 22] OR current_setting('timescaledb.license', true) IS DISTINCT FROM 'timescale' THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                    WHERE hypertable_schema = 'public' AND hypertable_name = 'event' AND compression_enabled) THEN
        RETURN;
    END IF;
    ALTER TABLE event SET (
        timescaledb.sparse_index = 'minmax(reemit_of), bloom(trigger), bloom(source_ref), bloom(rule), bloom(rule_ref)');
END
$migration$;
