-- How many times a run was handed back because a server connection was lost while it ran
-- (PostgreSQL or Redis restarting), since it last waited for a person. A run handed back more
-- than a few times fails instead. Unlike `attempts`, claims that are plain resumes (after an
-- approval, after a replica stopped) do not count.
ALTER TABLE workflow_runs ADD COLUMN IF NOT EXISTS handbacks integer NOT NULL DEFAULT 0;
