"""``agent-orchestrator agent NAME``: run one of the reference agents as its own process."""

from __future__ import annotations

import logging
import re
import secrets
from typing import Annotated

import typer

__all__ = ["agent"]

_NAMES = ("orchestrator", "code-review", "cicd", "infrastructure", "documentation", "feature-dev")


def agent(
    name: Annotated[str, typer.Argument(help="One of: " + ", ".join(_NAMES) + ".")],
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on (default: AO_PORTS).")] = None,
    instance_id: Annotated[
        str | None, typer.Option("--instance-id", help="Registry id of this instance (default: NAME-<random>).")
    ] = None,
) -> None:
    """Serve an agent: register it, consume its requests and answer /agent-request until SIGTERM."""
    from agents.catalogue import agent_class
    from agents.sdk.app import create_agent_app, serve_agent
    from agents.sdk.brain import load_brain
    from shared.lib.bootstrap import bootstrap
    from shared.lib.errors import StartupError
    from shared.lib.settings import AGENT_ID_PATTERN

    cls = agent_class(name)
    identity = instance_id or f"{name}-{secrets.token_hex(4)}"
    if not re.match(AGENT_ID_PATTERN, identity):
        raise StartupError(f"--instance-id {identity!r} must match {AGENT_ID_PATTERN}")
    settings = bootstrap(name)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per heartbeat would drown the agent's own log
    listen = port if port is not None else settings.port_for(name)
    instance = cls(settings, brain=load_brain(settings.agent_llm))
    app = create_agent_app(instance, instance_id=identity, endpoint=f"http://{settings.host}:{listen}")
    serve_agent(app, host=settings.host, port=listen, service=name, log_level=settings.log_level)
