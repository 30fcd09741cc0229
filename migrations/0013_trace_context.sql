-- The trace an enforcement belongs to: the W3C traceparent of the call that created it (an
-- api with tracing on writes it in the ingest INSERT), so that a stream claiming it later, on
-- any replica, continues that trace (Delivery.traceparent). NULL when tracing was off or the
-- enforcement was written another way. Nullable without a default: on a hypertable with
-- compressed chunks this changes only the catalog (no chunk is rewritten or decompressed),
-- as 0010 did for event.reemit_of.
ALTER TABLE enforcement ADD COLUMN traceparent TEXT;
