-- Rule 14: the catalogue. One row per product that was ever defined, holding its latest
-- definition by (occurred_at, event_id). A product without a row was never defined: its
-- handle is its name, and modules.auto_assign decides whether it moves by itself. The
-- catalogue is global: it names no organization.
CREATE TABLE products (
    product     text PRIMARY KEY CHECK (product ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    name        text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 256),
    description text CHECK (char_length(description) <= 2000),
    -- NULL: modules.auto_assign decides.
    assignment  text CHECK (assignment IN ('automatic', 'manual')),
    -- The definition that decided the row.
    occurred_at timestamptz NOT NULL,
    event_id    text NOT NULL CHECK (char_length(event_id) BETWEEN 1 AND 128),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- Seats always move from the pool by themselves.
    CONSTRAINT seat_is_always_automatic CHECK (product <> 'seat' OR assignment IS NULL)
);

-- The latest definition wins: a row is only ever replaced by a later definition, ordered
-- by occurred_at and then by event_id compared byte by byte (COLLATE "C"), as the worker
-- orders them.
CREATE FUNCTION products_only_move_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.occurred_at < OLD.occurred_at
       OR (NEW.occurred_at = OLD.occurred_at
           AND NEW.event_id COLLATE "C" <= OLD.event_id COLLATE "C") THEN
        RAISE EXCEPTION 'the definition of % at % (%) is not later than the one at % (%)',
            OLD.product, NEW.occurred_at, NEW.event_id, OLD.occurred_at, OLD.event_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER products_latest_definition_wins BEFORE UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION products_only_move_forward();

-- A definition that makes a module automatic looks for the organizations with open
-- shortfalls of it through consumption_open_shortfalls (the open ones only). Definitions
-- are rare; an index by product would cost every transfer and shortfall a write.
