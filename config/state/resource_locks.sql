-- resource_locks: filled by its component.
SELECT 1;
