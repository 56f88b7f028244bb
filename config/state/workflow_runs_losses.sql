-- How many times a run's runner died while running it (its lease ran out and another replica
-- claimed it). A run that takes its replica down each time (a node that exits the process, or
-- exhausts its memory) fails once this reaches AO_MAX_RUN_LOSSES, instead of taking down every
-- replica that claims it in turn.
ALTER TABLE workflow_runs ADD COLUMN IF NOT EXISTS losses integer NOT NULL DEFAULT 0;
