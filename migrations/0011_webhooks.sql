-- Webhooks: a trigger may accept events by HTTP (POST /webhooks/{key} on the web service).
-- The key is made by the database (wh_ + 32 hex digits from gen_random_uuid(), 122 random
-- bits: unguessable) and can be rotated; the secret, when set, signs deliveries (HMAC-SHA256
-- of the raw body) and is never returned by any RPC: the api verifies signatures itself, so
-- the secret never leaves this database.
ALTER TABLE trigger ADD COLUMN webhook_enabled BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE trigger ADD COLUMN webhook_key TEXT NOT NULL UNIQUE
    DEFAULT 'wh_' || replace(gen_random_uuid()::text, '-', '')
    CHECK (webhook_key ~ '^wh_[0-9a-f]{32}$');
ALTER TABLE trigger ADD COLUMN webhook_secret TEXT CHECK (length(webhook_secret) BETWEEN 16 AND 255);
ALTER TABLE trigger ADD COLUMN webhook_signed BOOLEAN GENERATED ALWAYS AS (webhook_secret IS NOT NULL) STORED;
