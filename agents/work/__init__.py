"""The agents' real work, free of HTTP and the bus: git, lint, tests, packaging,
releases, documentation and scaffolding, as plain async functions."""

__all__: list[str] = []
