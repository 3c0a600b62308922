-- Less work per event in the hottest tables (docs/performance.md).

-- The outbox keeps one row per committed batch (or clock round) instead of one per
-- message: the messages travel as parallel arrays, in the order they are published. A
-- row per message cost an insert, an index entry and a delete for every ledger entry and
-- alert; a row per batch costs them once per batch. Rows waiting at the upgrade are kept,
-- each as a batch of one, in their order.
CREATE TABLE outbox_batches (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- How many messages the row holds: lets the relay size a round without reading them.
    messages     integer NOT NULL CHECK (messages >= 1),
    channels     text[] NOT NULL CHECK (channels <@ ARRAY['ledger', 'shortfalls', 'dlq']),
    message_keys text[] NOT NULL,
    payloads     bytea[] NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (cardinality(channels) = messages
           AND cardinality(message_keys) = messages
           AND cardinality(payloads) = messages)
);
INSERT INTO outbox_batches (messages, channels, message_keys, payloads, created_at)
SELECT 1, ARRAY[channel], ARRAY[message_key], ARRAY[payload], created_at
  FROM outbox ORDER BY id;
DROP TABLE outbox;
ALTER TABLE outbox_batches RENAME TO outbox;
ALTER SEQUENCE outbox_batches_id_seq RENAME TO outbox_id_seq;
ALTER INDEX outbox_batches_pkey RENAME TO outbox_pkey;
-- A batch's payloads are one value of a few hundred KB: lz4 compresses JSON several
-- times faster than the default pglz. A server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE outbox ALTER COLUMN payloads SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available; the outbox keeps the default compression';
END
$$;

-- The entry id is derived from (org_id, sequence), the primary key, so a second unique
-- index on it only repeated the key at the cost of a random-order index insert per entry
-- (`entitlement-worker verify` checks every entry's id against its key).
ALTER TABLE ledger DROP CONSTRAINT ledger_entry_id_key;

-- No query of the worker or its commands used this index (the history reads an
-- organization's entries by its primary key), while every transfer paid for it.
DROP INDEX ledger_by_workspace;

-- Every ledger entry is written under its organization's row lock, in the transaction
-- that created or locked that row, and the ledger is append-only: the foreign key could
-- never fail, while its check ran once per entry (a lookup and a row lock).
ALTER TABLE ledger DROP CONSTRAINT ledger_org_id_fkey;
