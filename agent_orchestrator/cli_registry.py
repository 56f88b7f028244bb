"""``agent-orchestrator registry``: run the agent registry service."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["registry"]


def registry(
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on (default: AO_PORTS or 8009).")] = None,
) -> None:
    """Serve the agent registry (port 8009 by default) until SIGTERM or Ctrl-C."""
    from agent_registry import SERVICE, create_app
    from shared.lib.bootstrap import bootstrap
    from shared.lib.http_service import serve

    settings = bootstrap(SERVICE)
    serve(
        create_app(settings),
        host=settings.host,
        port=port if port is not None else settings.port_for(SERVICE),
        service=SERVICE,
        log_level=settings.log_level,
    )
