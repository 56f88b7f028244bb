-- Workflow metadata: what the orchestrator API lists and shows.
--
-- The LangGraph checkpointer keeps each workflow's graph state; this table keeps
-- only what people and operators look at (type, status, step, agents, input,
-- result, errors) and a small metadata snapshot in `state`. Every change bumps
-- `version`, and writers that read-modify-write compare it (optimistic locking).

CREATE TABLE IF NOT EXISTS workflows (
    id              text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    workflow_type   text NOT NULL CHECK (length(workflow_type) BETWEEN 1 AND 128),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'running', 'interrupted', 'succeeded', 'failed', 'cancelled')),
    current_step    text,
    agents          text[] NOT NULL DEFAULT '{}',  -- participating agents, in order of first appearance
    input           jsonb NOT NULL DEFAULT '{}',
    state           jsonb NOT NULL DEFAULT '{}',   -- small metadata snapshot, not the graph state
    result          jsonb,
    errors          jsonb NOT NULL DEFAULT '[]',
    metadata        jsonb NOT NULL DEFAULT '{}',   -- correlation id, finishing reason, ...
    version         integer NOT NULL DEFAULT 1 CHECK (version > 0),
    idempotency_key text UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    completed_at    timestamptz,
    CHECK ((completed_at IS NOT NULL) = (status IN ('succeeded', 'failed', 'cancelled')))
);

-- Listing is newest first with a (created_at, id) cursor, optionally by status or type.
CREATE INDEX IF NOT EXISTS workflows_created ON workflows (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS workflows_status_created ON workflows (status, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS workflows_type_created ON workflows (workflow_type, created_at DESC, id DESC);
-- cleanup(older_than) deletes finished workflows by completion time.
CREATE INDEX IF NOT EXISTS workflows_completed ON workflows (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS workflow_checkpoints (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow_id text NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    version     integer NOT NULL,  -- the workflow's version when the snapshot was taken
    step        text,
    state       jsonb NOT NULL,
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS workflow_checkpoints_workflow ON workflow_checkpoints (workflow_id, id);
