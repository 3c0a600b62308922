-- The ledger is stored as blocks: one row per organization per committed batch, holding
-- that batch's entries of the organization (consecutive sequences first_sequence to
-- last_sequence) as arrays, one element per entry. A row per entry cost a tuple header, a
-- WAL record's headers and a primary key entry each; a block pays them once for all its
-- entries. `ledger`, a view, shows one row per entry as before; the worker writes blocks.
-- The rules on each entry stay checks on the stored rows, the blocks of an organization
-- are gapless from sequence 1 (a trigger refuses a block that does not follow the last),
-- and blocks are append-only like the rows were.

-- Rules 11 and the ledger's own: a transfer names its workspace and nothing else does, a
-- manual transfer names its person, a revocation names the grant that lost the units.
CREATE FUNCTION ledger_entries_consistent(kinds text[], workspace_ids text[], actors text[],
                                          grant_ids text[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (SELECT coalesce(bool_and(
                       (k IN ('transfer', 'manual_transfer')) = (w IS NOT NULL)
                       AND (k = 'manual_transfer') = (a IS NOT NULL)
                       AND (k <> 'revocation' OR g IS NOT NULL)), true)
              FROM unnest(kinds, workspace_ids, actors, grant_ids) AS e (k, w, a, g));

CREATE TABLE ledger_blocks (
    org_id               text NOT NULL,
    first_sequence       bigint NOT NULL CHECK (first_sequence >= 1),
    last_sequence        bigint NOT NULL,
    entry_ids            uuid[] NOT NULL,
    products             text[] NOT NULL,
    kinds                text[] NOT NULL,
    quantities           bigint[] NOT NULL,
    workspace_ids        text[] NOT NULL,
    pool_available_after bigint[] NOT NULL,
    caused_by            text[] NOT NULL,
    grant_ids            text[] NOT NULL,
    actors               text[] NOT NULL,
    unlimited            boolean[] NOT NULL,
    recorded_at          timestamptz[] NOT NULL,
    PRIMARY KEY (org_id, first_sequence),
    -- One element per entry in every array, one-dimensional, numbered from 1.
    CONSTRAINT ledger_blocks_sizes CHECK (
        last_sequence >= first_sequence
        AND array_ndims(entry_ids) = 1 AND array_lower(entry_ids, 1) = 1
        AND cardinality(entry_ids) = last_sequence - first_sequence + 1
        AND cardinality(products) = cardinality(entry_ids)
        AND cardinality(kinds) = cardinality(entry_ids)
        AND cardinality(quantities) = cardinality(entry_ids)
        AND cardinality(workspace_ids) = cardinality(entry_ids)
        AND cardinality(pool_available_after) = cardinality(entry_ids)
        AND cardinality(caused_by) = cardinality(entry_ids)
        AND cardinality(grant_ids) = cardinality(entry_ids)
        AND cardinality(actors) = cardinality(entry_ids)
        AND cardinality(unlimited) = cardinality(entry_ids)
        AND cardinality(recorded_at) = cardinality(entry_ids)),
    CONSTRAINT ledger_blocks_required CHECK (
        array_position(entry_ids, NULL) IS NULL AND array_position(products, NULL) IS NULL
        AND array_position(kinds, NULL) IS NULL AND array_position(quantities, NULL) IS NULL
        AND array_position(pool_available_after, NULL) IS NULL
        AND array_position(caused_by, NULL) IS NULL AND array_position(unlimited, NULL) IS NULL
        AND array_position(recorded_at, NULL) IS NULL),
    CONSTRAINT ledger_kind_check CHECK (
        kinds <@ ARRAY['grant', 'transfer', 'expiry', 'manual_transfer', 'revocation']),
    CONSTRAINT ledger_quantity_check CHECK (0 < ALL (quantities)),
    CONSTRAINT ledger_pool_available_after_check CHECK (0 <= ALL (pool_available_after)),
    CONSTRAINT ledger_entries_consistent CHECK (
        ledger_entries_consistent(kinds, workspace_ids, actors, grant_ids))
);
-- Blocks large enough to be stored out of line are compressed with lz4 where the server
-- has it: pglz cost more time than the bytes it saved.
DO $$
BEGIN
    ALTER TABLE ledger_blocks
        ALTER COLUMN entry_ids SET COMPRESSION lz4,
        ALTER COLUMN products SET COMPRESSION lz4,
        ALTER COLUMN kinds SET COMPRESSION lz4,
        ALTER COLUMN quantities SET COMPRESSION lz4,
        ALTER COLUMN workspace_ids SET COMPRESSION lz4,
        ALTER COLUMN pool_available_after SET COMPRESSION lz4,
        ALTER COLUMN caused_by SET COMPRESSION lz4,
        ALTER COLUMN grant_ids SET COMPRESSION lz4,
        ALTER COLUMN actors SET COMPRESSION lz4,
        ALTER COLUMN unlimited SET COMPRESSION lz4,
        ALTER COLUMN recorded_at SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available; the ledger keeps the default compression';
END
$$;

-- The entries stored so far, one block each (the checks above hold for them as they held
-- for the rows).
INSERT INTO ledger_blocks (org_id, first_sequence, last_sequence, entry_ids, products, kinds,
                           quantities, workspace_ids, pool_available_after, caused_by,
                           grant_ids, actors, unlimited, recorded_at)
SELECT org_id, sequence, sequence, ARRAY[entry_id], ARRAY[product], ARRAY[kind],
       ARRAY[quantity], ARRAY[workspace_id], ARRAY[pool_available_after], ARRAY[caused_by],
       ARRAY[grant_id], ARRAY[actor], ARRAY[unlimited], ARRAY[recorded_at]
  FROM ledger
 ORDER BY org_id, sequence;
DROP TABLE ledger;

-- From now on a block follows the organization's last block, or is its first from
-- sequence 1.
CREATE FUNCTION ledger_block_follows() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    previous bigint;
BEGIN
    SELECT b.last_sequence INTO previous
      FROM ledger_blocks b
     WHERE b.org_id = NEW.org_id
     ORDER BY b.first_sequence DESC
     LIMIT 1;
    IF NEW.first_sequence <> coalesce(previous, 0) + 1 THEN
        RAISE EXCEPTION 'the ledger of % is gapless: a block from sequence % cannot follow %',
            NEW.org_id, NEW.first_sequence, coalesce(previous::text, 'nothing')
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER ledger_blocks_follow BEFORE INSERT ON ledger_blocks
    FOR EACH ROW EXECUTE FUNCTION ledger_block_follows();
CREATE TRIGGER ledger_no_update_or_delete BEFORE UPDATE OR DELETE ON ledger_blocks
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger_blocks
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_is_append_only();

-- One row per entry, as the ledger table had them.
CREATE VIEW ledger AS
SELECT b.org_id, b.first_sequence + e.n - 1 AS sequence, e.entry_id, e.product, e.kind,
       e.quantity, e.workspace_id, e.pool_available_after, e.caused_by, e.actor,
       e.recorded_at, e.grant_id, e.unlimited
  FROM ledger_blocks b
 CROSS JOIN LATERAL unnest(b.entry_ids, b.products, b.kinds, b.quantities, b.workspace_ids,
                           b.pool_available_after, b.caused_by, b.grant_ids, b.actors,
                           b.unlimited, b.recorded_at)
       WITH ORDINALITY AS e (entry_id, product, kind, quantity, workspace_id,
                             pool_available_after, caused_by, grant_id, actor, unlimited,
                             recorded_at, n);
