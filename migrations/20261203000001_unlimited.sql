-- Rule 12: unlimited grants. An unlimited grant's lot counts no units; while it is active
-- its product has no limit (pools.unlimited), transfers draw on it first, and the ledger
-- marks its entries and the transfers it gave. Each lot also keeps what became of its
-- units, so a pool's units can be told apart by grant and by source.

ALTER TABLE pools ADD COLUMN unlimited boolean NOT NULL DEFAULT false;

ALTER TABLE lots ADD COLUMN unlimited boolean NOT NULL DEFAULT false;
ALTER TABLE lots ADD COLUMN drawn bigint NOT NULL DEFAULT 0 CHECK (drawn >= 0);
ALTER TABLE lots ADD COLUMN expired bigint NOT NULL DEFAULT 0 CHECK (expired >= 0);

-- Lots stored before this upgrade: what expired is in their expiry entries (caused by the
-- grant), and what was transferred is the rest of what left them.
UPDATE lots
   SET expired = expiries.total
  FROM (SELECT org_id, caused_by AS lot_id, sum(quantity) AS total
          FROM ledger WHERE kind = 'expiry'
         GROUP BY org_id, caused_by) AS expiries
 WHERE expiries.org_id = lots.org_id AND expiries.lot_id = lots.lot_id;
UPDATE lots SET drawn = quantity - remaining - revoked - expired WHERE status <> 'pending';

ALTER TABLE lots DROP CONSTRAINT lots_quantity_check;
ALTER TABLE lots ADD CONSTRAINT lot_quantity CHECK (
    CASE WHEN unlimited THEN quantity = 0 AND remaining = 0 AND revoked = 0 AND expired = 0
         ELSE quantity BETWEEN 1 AND 1000000 END);
-- Every counted unit of a lot is in one place: still in the pool (or not yet valid),
-- transferred, revoked or expired.
ALTER TABLE lots ADD CONSTRAINT lot_accounted CHECK (
    unlimited
    OR CASE WHEN status = 'pending'
            THEN remaining = quantity AND drawn = 0 AND revoked = 0 AND expired = 0
            ELSE remaining + drawn + revoked + expired = quantity END);

-- Marks an unlimited grant's own entries and the transfers that drew on one; their
-- quantity is not in any counted balance.
ALTER TABLE ledger ADD COLUMN unlimited boolean NOT NULL DEFAULT false;
