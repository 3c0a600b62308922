-- Rule 11: entitlements can be removed. A revocation takes units of a grant that are still
-- in the pool; the database repeats what the core keeps: a pool's balance counts them,
-- a lot never loses more than it had left, and the ledger says which grant lost them.

ALTER TABLE pools ADD COLUMN revoked_total bigint NOT NULL DEFAULT 0 CHECK (revoked_total >= 0);
ALTER TABLE pools DROP CONSTRAINT pool_balance;
ALTER TABLE pools ADD CONSTRAINT pool_balance
    CHECK (available = granted_total - transferred_total - expired_total - revoked_total);

-- What revocations took of the lot, and its grant's own `occurred_at`: a revocation of a
-- source reaches the grants whose `occurred_at` is not after its own. Lots stored before
-- this upgrade get the earlier of `valid_from` and the time they were stored, which is not
-- after any revocation sent once the upgrade is done.
ALTER TABLE lots ADD COLUMN revoked bigint NOT NULL DEFAULT 0 CHECK (revoked >= 0);
ALTER TABLE lots ADD CONSTRAINT lot_units CHECK (remaining + revoked <= quantity);
ALTER TABLE lots ADD COLUMN occurred_at timestamptz;
UPDATE lots SET occurred_at = LEAST(valid_from, granted_at);
ALTER TABLE lots ALTER COLUMN occurred_at SET NOT NULL;
ALTER TABLE lots DROP CONSTRAINT lots_status_check;
ALTER TABLE lots ADD CONSTRAINT lots_status_check
    CHECK (status IN ('pending', 'active', 'spent', 'expired', 'revoked'));

-- Revocations are kept: one of a grant that has not arrived yet waits for it, and one of a
-- source reaches the source's later grants dated before it.
CREATE TABLE revocations (
    org_id           text NOT NULL REFERENCES organizations (org_id),
    event_id         text NOT NULL,
    occurred_at      timestamptz NOT NULL,
    grant_id         text,
    quantity         bigint CHECK (quantity BETWEEN 1 AND 1000000),
    source_kind      text,
    source_reference text,
    product          text,
    reason           text CHECK (char_length(reason) <= 256),
    -- A revocation of one grant is done once it took what it could from that grant.
    applied          boolean NOT NULL DEFAULT false,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, event_id),
    CHECK ((grant_id IS NULL) <> (source_kind IS NULL)),
    CHECK ((source_kind IS NULL) = (source_reference IS NULL)),
    CHECK (grant_id IS NOT NULL OR quantity IS NULL),
    CHECK (grant_id IS NULL OR product IS NULL),
    CHECK (grant_id IS NOT NULL OR NOT applied)
);

-- Ledger entries name the grant whose units they moved (grant, expiry, revocation).
ALTER TABLE ledger ADD COLUMN grant_id text;
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('grant', 'transfer', 'expiry', 'manual_transfer', 'revocation'));
ALTER TABLE ledger ADD CONSTRAINT ledger_revocation_names_its_grant
    CHECK (kind <> 'revocation' OR grant_id IS NOT NULL);
