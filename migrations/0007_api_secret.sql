-- Secrets the api keeps in the database so that every replica shares them and they survive
-- restarts. The first is the key that signs page tokens ('page_token'): a token one replica
-- issues must be accepted by the next, before and after a deploy. The api creates the row
-- itself on first need (INSERT ... ON CONFLICT DO NOTHING), so a fresh database needs no setup.
CREATE TABLE api_secret (
    name    TEXT PRIMARY KEY,
    -- At least 256 bits: a shorter key would make the HMAC guessable.
    value   BYTEA NOT NULL CHECK (octet_length(value) >= 32),
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);
