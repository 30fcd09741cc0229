-- Who may call the api: bearer tokens of named principals, and which principal holds a lease.
--
-- A token is shown once, when it is made; only its SHA-256 is kept (tokens are 256 random
-- bits, so a fast hash is enough: there is nothing to brute-force). Every api replica keeps
-- all of them in memory, reloaded every few seconds, so revocation reaches every replica
-- within seconds and no call waits for the database to be authenticated.

CREATE TABLE api_token (
    id           BIGSERIAL PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.@-]{1,100}$'),
    roles        TEXT[] NOT NULL
                 CHECK (cardinality(roles) >= 1
                        AND roles <@ ARRAY['sensor', 'executor', 'viewer', 'operator']::text[]),
    token_hash   BYTEA NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    created      TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at   TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ
);

-- The principal whose watch stream holds a lease: only it may resolve or release what it
-- holds (an operator may force a release). NULL while not leased, and for leases taken with
-- authentication off.
ALTER TABLE enforcement_dispatch ADD COLUMN lease_principal TEXT;
