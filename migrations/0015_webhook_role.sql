-- The web service gets a role of its own, `webhook`: only it may hand webhook deliveries over
-- (WebhookService/DeliverWebhook), and a delivery carries what only the web service can
-- assert: that the sender's signature was checked, and the client's address. A sensor token
-- can no longer call DeliverWebhook and claim either.
ALTER TABLE api_token
    DROP CONSTRAINT IF EXISTS api_token_roles_check,
    ADD CONSTRAINT api_token_roles_check
        CHECK (cardinality(roles) >= 1
               AND roles <@ ARRAY['sensor', 'executor', 'viewer', 'operator', 'webhook']::text[]);
