-- Agent registry: one row per running agent instance.
--
-- Heartbeats are the hot path (hundreds per second), so the columns a heartbeat
-- writes (last_heartbeat, in_flight) carry no index: the UPDATE then stays a HOT
-- update that touches no index page, and fillfactor 70 leaves room on each page
-- for it. The reaper scans by last_heartbeat without an index; the table holds
-- one row per live instance, so that scan is a few pages.
CREATE TABLE agent_instances (
    id                text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    name              text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    version           text NOT NULL,
    endpoint          text NOT NULL,
    -- A2A skills: [{id, name, description, tags, input_schema, output_schema}, ...]
    capabilities      jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(capabilities) = 'array'),
    metadata          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    status            text NOT NULL DEFAULT 'initializing'
                      CHECK (status IN ('initializing', 'active', 'busy', 'error', 'offline')),
    -- Set only when the reaper marked the instance offline: the status a returning
    -- heartbeat restores. NULL for an instance that declared itself offline.
    prior_status      text CHECK (prior_status IN ('initializing', 'active', 'busy', 'error')),
    status_reason     text,
    in_flight         integer NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    last_heartbeat    timestamptz NOT NULL DEFAULT now(),
    registered_at     timestamptz NOT NULL DEFAULT now(),
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    -- SHA-256 of the per-instance token; the token itself is never stored.
    token_hash        text NOT NULL
) WITH (fillfactor = 70);

-- Discovery by capability (skill id) and by tag: both are containment queries
-- (capabilities @> '[{"id": "x"}]', capabilities @> '[{"tags": ["t"]}]').
CREATE INDEX agent_instances_capabilities_gin ON agent_instances USING gin (capabilities jsonb_path_ops);
-- Discovery by name (optionally with status) and by status alone.
CREATE INDEX agent_instances_name_status ON agent_instances (name, status);
CREATE INDEX agent_instances_status ON agent_instances (status);

-- Every registration, status change and removal is announced on one channel, so
-- each registry replica's /agents/watch streams changes made by any replica.
-- Heartbeats that change neither status nor registration fire nothing.
CREATE FUNCTION agent_instances_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kind text;
    row  agent_instances;
BEGIN
    IF TG_OP = 'DELETE' THEN
        kind := 'removed';
        row := OLD;
    ELSIF TG_OP = 'INSERT' OR OLD.registered_at IS DISTINCT FROM NEW.registered_at THEN
        kind := 'registered';
        row := NEW;
    ELSE
        kind := 'status';
        row := NEW;
    END IF;
    PERFORM pg_notify('agent_registry_changes', json_build_object(
        'kind', kind,
        'agent_id', row.id,
        'name', row.name,
        'status', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE row.status END,
        'previous_status', CASE WHEN TG_OP = 'UPDATE' THEN OLD.status ELSE NULL END,
        'at', now()
    )::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER agent_instances_changed
    AFTER INSERT OR DELETE ON agent_instances
    FOR EACH ROW EXECUTE FUNCTION agent_instances_notify();

CREATE TRIGGER agent_instances_status_changed
    AFTER UPDATE ON agent_instances
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.registered_at IS DISTINCT FROM NEW.registered_at)
    EXECUTE FUNCTION agent_instances_notify();
