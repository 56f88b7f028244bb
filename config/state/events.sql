-- events: the append-only log of broadcast events (shared.lib.event_bus).
-- The bigserial id increases with every insert, so consumers use it as a cursor
-- (SSE Last-Event-ID, `events replay --since`). Rows are never updated; old rows
-- may be deleted by retention.
CREATE TABLE IF NOT EXISTS events (
    id             bigserial PRIMARY KEY,
    event_type     text NOT NULL CHECK (event_type ~ '^[A-Za-z][A-Za-z0-9_.:-]{0,127}$'),
    aggregate_type text,
    aggregate_id   text,
    payload        jsonb NOT NULL DEFAULT '{}'::jsonb,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    schema_version integer NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS events_type_id ON events (event_type, id);
CREATE INDEX IF NOT EXISTS events_aggregate_id ON events (aggregate_type, aggregate_id, id);
CREATE INDEX IF NOT EXISTS events_created_at ON events (created_at);

CREATE OR REPLACE FUNCTION events_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: insert a new event instead of updating event %', OLD.id;
END;
$$;

DROP TRIGGER IF EXISTS events_append_only ON events;
CREATE TRIGGER events_append_only BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_update();
