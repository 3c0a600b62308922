-- The worker's state. PostgreSQL is the one source of truth: every invariant the domain
-- core keeps is repeated here as a constraint, so a bug cannot write a broken state.

-- One row per organization: the lock every batch takes (in org_id order, so no deadlock)
-- and the position of its gapless ledger.
CREATE TABLE organizations (
    org_id        text PRIMARY KEY CHECK (char_length(org_id) BETWEEN 1 AND 128),
    last_sequence bigint NOT NULL DEFAULT 0 CHECK (last_sequence >= 0)
);

-- An organization's pool of one product.
CREATE TABLE pools (
    org_id            text NOT NULL REFERENCES organizations (org_id),
    product           text NOT NULL,
    available         bigint NOT NULL CHECK (available >= 0),
    granted_total     bigint NOT NULL CHECK (granted_total >= 0),
    transferred_total bigint NOT NULL CHECK (transferred_total >= 0),
    expired_total     bigint NOT NULL CHECK (expired_total >= 0),
    PRIMARY KEY (org_id, product),
    CONSTRAINT pool_balance CHECK (available = granted_total - transferred_total - expired_total)
);

-- The units of one grant. Pending lots wait for valid_from; active ones can be drawn.
CREATE TABLE lots (
    lot_id           text PRIMARY KEY,
    org_id           text NOT NULL REFERENCES organizations (org_id),
    product          text NOT NULL,
    quantity         bigint NOT NULL CHECK (quantity BETWEEN 1 AND 1000000),
    remaining        bigint NOT NULL CHECK (remaining >= 0 AND remaining <= quantity),
    valid_from       timestamptz NOT NULL,
    expires_at       timestamptz CHECK (expires_at IS NULL OR expires_at > valid_from),
    status           text NOT NULL CHECK (status IN ('pending', 'active', 'spent', 'expired')),
    source_kind      text,
    source_reference text,
    granted_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lots_open_by_org ON lots (org_id) WHERE status IN ('pending', 'active');
-- The clock's two questions: what becomes valid, what expires.
CREATE INDEX lots_pending_by_start ON lots (valid_from) WHERE status = 'pending';
CREATE INDEX lots_active_by_expiry ON lots (expires_at) WHERE status = 'active' AND expires_at IS NOT NULL;

-- Rule 4: the owner of each workspace, set by the first accepted event that names it.
CREATE TABLE workspaces (
    workspace_id text PRIMARY KEY CHECK (char_length(workspace_id) BETWEEN 1 AND 128),
    org_id       text NOT NULL REFERENCES organizations (org_id),
    claimed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workspaces_by_org ON workspaces (org_id);

-- A workspace's consumption of one product.
CREATE TABLE consumption (
    workspace_id       text NOT NULL REFERENCES workspaces (workspace_id),
    product            text NOT NULL,
    org_id             text NOT NULL REFERENCES organizations (org_id),
    required           bigint NOT NULL CHECK (required >= 0),
    allocated          bigint NOT NULL CHECK (allocated >= 0),
    shortfall_since    timestamptz,
    reported_missing   bigint NOT NULL DEFAULT 0 CHECK (reported_missing >= 0),
    reported_opened_at timestamptz,
    alert_revision     bigint NOT NULL DEFAULT 0 CHECK (alert_revision >= 0),
    last_cause         text,
    PRIMARY KEY (workspace_id, product),
    CHECK ((shortfall_since IS NOT NULL) = (required > allocated))
);
-- Refills look for the organization's open shortfalls of a product, oldest first.
CREATE INDEX consumption_open_shortfalls ON consumption (org_id, product, shortfall_since)
    WHERE required > allocated;

-- Each participant's latest event (rule 2) and whether it counts (rule 3).
CREATE TABLE participants (
    workspace_id   text NOT NULL,
    participant_id text NOT NULL,
    last_event_at  timestamptz NOT NULL,
    last_event_id  text NOT NULL,
    counted        boolean NOT NULL,
    PRIMARY KEY (workspace_id, participant_id)
);

-- Grants and transfer requests already applied (rule 1). Participant and module events
-- are idempotent by their own ordering and are not listed here.
CREATE TABLE processed_events (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- The ledger: append-only, gapless per organization.
CREATE TABLE ledger (
    org_id               text NOT NULL REFERENCES organizations (org_id),
    sequence             bigint NOT NULL CHECK (sequence >= 1),
    entry_id             uuid NOT NULL UNIQUE,
    product              text NOT NULL,
    kind                 text NOT NULL CHECK (kind IN ('grant', 'transfer', 'expiry', 'manual_transfer')),
    quantity             bigint NOT NULL CHECK (quantity > 0),
    workspace_id         text,
    pool_available_after bigint NOT NULL CHECK (pool_available_after >= 0),
    caused_by            text NOT NULL,
    actor                text,
    recorded_at          timestamptz NOT NULL,
    PRIMARY KEY (org_id, sequence),
    CHECK ((kind IN ('transfer', 'manual_transfer')) = (workspace_id IS NOT NULL)),
    CHECK ((kind = 'manual_transfer') = (actor IS NOT NULL))
);
CREATE INDEX ledger_by_workspace ON ledger (workspace_id, product) WHERE workspace_id IS NOT NULL;

CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER ledger_no_update_or_delete BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_is_append_only();

-- Messages committed with the state, waiting to be published. A row is removed once the
-- broker has acknowledged it; the ledger and consumption tables keep the record.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    channel     text NOT NULL CHECK (channel IN ('ledger', 'shortfalls', 'dlq')),
    message_key text,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The next offset to consume per input partition, committed with the effects.
CREATE TABLE consumer_offsets (
    topic       text NOT NULL,
    partition   integer NOT NULL CHECK (partition >= 0),
    next_offset bigint NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);
