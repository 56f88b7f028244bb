"""Benchmarks of the platform against peers (run by `agent-orchestrator bench`)."""

__all__: list[str] = []
