-- Background runs of workflows, leased by orchestrator replicas.
--
-- A replica runs a workflow only while it holds the workflow's session-level
-- advisory lock on a dedicated connection and the row names it as runner. The
-- lease is renewed every third of its TTL; a run whose lease expired (its
-- runner died, so the advisory lock went with its session) is taken over by a
-- live replica and resumes from its last LangGraph checkpoint.
CREATE TABLE IF NOT EXISTS workflow_runs (
    workflow_id      text PRIMARY KEY,
    workflow_type    text NOT NULL,
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'waiting', 'done')),
    runner_id        text,
    lease_expires_at timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    resume_value     jsonb,        -- the answer to the pending interrupt, consumed by the next run
    pending_interrupt jsonb,       -- the interrupt's payload while the run waits for a human
    wait_deadline    timestamptz,  -- when a pending approval expires as rejected
    cancel_requested boolean NOT NULL DEFAULT false,
    last_progress_at timestamptz NOT NULL DEFAULT now(),
    stuck_since      timestamptz,
    checkpoints_pruned_at timestamptz,  -- when a finished run's checkpoints were pruned to the final one
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS workflow_runs_claimable
    ON workflow_runs (updated_at) WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS workflow_runs_waiting
    ON workflow_runs (wait_deadline) WHERE state = 'waiting';
