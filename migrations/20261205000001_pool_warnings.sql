-- Version 2's pool warnings (rule 15): each warning as last published, so that a warning is
-- published only when it opens, its numbers change or it is resolved. A pool has at most
-- one `low` warning (grant_id ''), a grant at most one `expiring` warning. Rows stay after
-- they are resolved: a warning that opens again continues its revisions, and so its ids.
CREATE TABLE pool_warnings (
    org_id      text NOT NULL REFERENCES organizations (org_id),
    product     text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('low', 'expiring')),
    grant_id    text NOT NULL,
    open        boolean NOT NULL,
    -- `low`: the pool's available counted units and its threshold when last published.
    available   bigint,
    threshold   bigint,
    -- `expiring`: the grant's units still in the pool and when they expire.
    units       bigint,
    expires_at  timestamptz,
    -- When the open warning opened; NULL once resolved.
    opened_at   timestamptz,
    revision    bigint NOT NULL CHECK (revision >= 1),
    -- An open `low` warning's next change by time alone (a grant its threshold counts
    -- expires), and that grant: the clock looks at the pool then.
    recheck_at  timestamptz,
    recheck_cause text,
    PRIMARY KEY (org_id, product, kind, grant_id),
    CONSTRAINT pool_warning_subject CHECK ((kind = 'low') = (grant_id = '')),
    CONSTRAINT pool_warning_low CHECK (
        kind <> 'low'
        OR (available IS NOT NULL AND threshold >= 0 AND units IS NULL AND expires_at IS NULL
            AND (NOT open OR available <= threshold))),
    CONSTRAINT pool_warning_expiring CHECK (
        kind <> 'expiring'
        OR (units >= 0 AND expires_at IS NOT NULL AND available IS NULL AND threshold IS NULL
            AND recheck_at IS NULL AND (NOT open OR units > 0))),
    CONSTRAINT pool_warning_opened CHECK (open = (opened_at IS NOT NULL)),
    CONSTRAINT pool_warning_recheck CHECK (
        (recheck_at IS NULL) = (recheck_cause IS NULL) AND (open OR recheck_at IS NULL))
);
CREATE INDEX pool_warnings_recheck ON pool_warnings (recheck_at) WHERE recheck_at IS NOT NULL;
-- The gauge of open warnings, and the clock's look for grants without an open one.
CREATE INDEX pool_warnings_open ON pool_warnings (kind) WHERE open;

-- The clock raises an `expiring` warning as a grant's units come within range: it looks
-- for active counted lots by expiry (lots_active_by_expiry) that have none open.

-- The low threshold counts the units of every valid counted grant, spent ones too: a
-- batch loads those with the lots still in the pool.
CREATE INDEX lots_valid_spent_by_org ON lots (org_id)
    WHERE status IN ('spent', 'revoked') AND NOT unlimited AND quantity > revoked;

-- The outbox carries the pool warnings too.
ALTER TABLE outbox DROP CONSTRAINT outbox_channels;
ALTER TABLE outbox ADD CONSTRAINT outbox_channels
    CHECK (channels <@ ARRAY['ledger', 'shortfalls', 'dlq', 'state', 'pool_warnings']);
