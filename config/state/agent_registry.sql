-- agent_registry: filled by its component.
SELECT 1;
