-- Version 2's entitlement-state topic: each workspace-product and each pool counts the
-- state messages it has published; a consumer keeps the message with the highest version
-- per key. Existing rows start at 0: their first message is version 1.
ALTER TABLE pools
    ADD COLUMN state_version bigint NOT NULL DEFAULT 0 CONSTRAINT pool_state_version CHECK (state_version >= 0);
ALTER TABLE consumption
    ADD COLUMN state_version bigint NOT NULL DEFAULT 0 CONSTRAINT consumption_state_version CHECK (state_version >= 0);

-- The outbox carries the state messages too, in the same row as the batch's other output.
ALTER TABLE outbox DROP CONSTRAINT outbox_batches_channels_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_channels
    CHECK (channels <@ ARRAY['ledger', 'shortfalls', 'dlq', 'state']);

-- A pool's state message names the input that last changed it; kept for `snapshot`,
-- which republishes the state. Pools stored before know it from their last ledger entry.
ALTER TABLE pools ADD COLUMN last_cause text;
UPDATE pools p
   SET last_cause = (SELECT l.caused_by FROM ledger l
                      WHERE l.org_id = p.org_id AND l.product = p.product
                      ORDER BY l.sequence DESC LIMIT 1);
