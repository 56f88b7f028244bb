"""The agent registry service (imported as ``agent_registry``; the folder name is fixed by the layout)."""

from agent_registry.app import SERVICE, create_app

__all__ = ["SERVICE", "create_app"]
