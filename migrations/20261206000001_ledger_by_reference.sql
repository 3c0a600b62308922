-- An outbox row names its batch's ledger entries instead of holding each a second time:
-- per organization, the first and last sequence of a run of entries the batch recorded.
-- The ledger is append-only, so what a range names never changes; the relay renders the
-- messages from the ledger's rows when it publishes the row. Rows written before this
-- migration keep their ledger messages inline and go out as they are.
CREATE FUNCTION outbox_ledger_count(first bigint[], last bigint[]) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (SELECT coalesce(sum(l - f + 1), 0) FROM unnest(first, last) AS r (f, l));
CREATE FUNCTION outbox_ledger_ranges_valid(first bigint[], last bigint[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (SELECT coalesce(bool_and(f >= 1 AND l >= f), true) FROM unnest(first, last) AS r (f, l));

ALTER TABLE outbox
    ADD COLUMN ledger_orgs text[] NOT NULL DEFAULT '{}',
    ADD COLUMN ledger_first bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN ledger_last bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN ledger_messages integer NOT NULL DEFAULT 0;
-- `messages` counts the messages held inline from now on; a row holds at least one message
-- of either kind.
ALTER TABLE outbox DROP CONSTRAINT outbox_batches_messages_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_holds_messages
    CHECK (messages >= 0 AND messages + ledger_messages >= 1);
ALTER TABLE outbox ADD CONSTRAINT outbox_ledger_ranges CHECK (
    cardinality(ledger_orgs) = cardinality(ledger_first)
    AND cardinality(ledger_orgs) = cardinality(ledger_last)
    AND outbox_ledger_ranges_valid(ledger_first, ledger_last)
    AND ledger_messages = outbox_ledger_count(ledger_first, ledger_last));
