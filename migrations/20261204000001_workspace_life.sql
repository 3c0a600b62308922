-- Rule 13: workspaces have a life. Each workspace keeps what its latest workspace-updated
-- said (by occurred_at, then event_id: life_event_at and life_event_id), and whether it is
-- live: not archived and its ends_at not passed. A workspace never updated has no life
-- event, no name, and is live. Being past changes nothing else: its consumption stays.

ALTER TABLE workspaces
    ADD COLUMN name          text CHECK (char_length(name) BETWEEN 1 AND 256),
    ADD COLUMN starts_at     timestamptz,
    ADD COLUMN ends_at       timestamptz,
    ADD COLUMN archived      boolean NOT NULL DEFAULT false,
    ADD COLUMN live          boolean NOT NULL DEFAULT true,
    ADD COLUMN life_event_at timestamptz,
    ADD COLUMN life_event_id text CHECK (char_length(life_event_id) BETWEEN 1 AND 128),
    ADD CONSTRAINT workspace_ends_after_it_starts
        CHECK (ends_at IS NULL OR starts_at IS NULL OR ends_at > starts_at),
    ADD CONSTRAINT workspace_life_has_its_event
        CHECK ((life_event_at IS NULL) = (life_event_id IS NULL)),
    -- Only an event sets a life: without one, a workspace has its defaults.
    ADD CONSTRAINT workspace_life_comes_from_an_event
        CHECK (life_event_at IS NOT NULL
               OR (name IS NULL AND starts_at IS NULL AND ends_at IS NULL
                   AND NOT archived AND live)),
    ADD CONSTRAINT archived_workspace_is_past CHECK (NOT (archived AND live));

-- The latest event wins: a life is only ever replaced by a later event, ordered by
-- occurred_at and then by event_id compared byte by byte (COLLATE "C"), as the worker
-- orders them. The clock turning a workspace past keeps its event.
CREATE FUNCTION workspace_life_only_moves_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.life_event_at IS NOT NULL
       AND (NEW.life_event_at IS NULL
            OR NEW.life_event_at < OLD.life_event_at
            OR (NEW.life_event_at = OLD.life_event_at
                AND NEW.life_event_id COLLATE "C" < OLD.life_event_id COLLATE "C")) THEN
        RAISE EXCEPTION 'the life of workspace % at % (%) is older than the one at % (%)',
            OLD.workspace_id, NEW.life_event_at, NEW.life_event_id, OLD.life_event_at,
            OLD.life_event_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER workspaces_latest_life_wins BEFORE UPDATE ON workspaces
    FOR EACH ROW EXECUTE FUNCTION workspace_life_only_moves_forward();

-- The clock turns live workspaces past when their ends_at passes; it looks for them here.
CREATE INDEX workspaces_live_until ON workspaces (ends_at) WHERE live AND ends_at IS NOT NULL;
