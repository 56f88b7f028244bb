-- events: filled by its component.
SELECT 1;
