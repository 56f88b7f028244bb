-- workflow_state: filled by its component.
SELECT 1;
