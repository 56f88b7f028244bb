"""The FastAPI app of one agent instance, and serving it with a SIGTERM drain.

``create_agent_app`` opens the service context (PostgreSQL pool, Redis) and an
:class:`AgentRuntime` in the lifespan, and serves ``/agent-request``, the A2A
card, ``/health``, ``/ready`` and ``/metrics``. ``serve_agent`` runs it under
uvicorn; on SIGTERM the agent stops taking work at once (bus and HTTP), lets
in-flight work finish for ``Settings.agent_drain_grace_s``, deregisters, and
only then lets uvicorn close.

An instance whose bus serving ends on its own drains and exits with status 1, after one
line ``error: ...``, for its supervisor to start it again.

A start-up failure (the port taken, a wrong registration secret, PostgreSQL,
Redis or the registry out of reach) is one line, ``error: <what to do>``, and exit
status 2, the same through ``agent-orchestrator agent`` and through a script
calling ``serve_agent`` as docs/AGENT_REGISTRY.md shows (``http_service.serve``
enters the lifespan itself, so its error is raised, not logged by uvicorn).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI

from agents.sdk.agent import Agent
from agents.sdk.routes import ServingReadiness, agent_routes
from agents.sdk.runtime import AgentRuntime
from shared.lib.errors import OrchestratorError
from shared.lib.http_service import guard_input, install_error_handlers, open_context, ops_router, serve, stop_server

__all__ = ["create_agent_app", "exit_if_serving_failed", "serve_agent"]

_log = logging.getLogger(__name__)


def create_agent_app(agent: Agent, *, instance_id: str, endpoint: str) -> FastAPI:
    """The app serving ``agent`` as ``instance_id``, announced to the registry at ``endpoint``."""
    settings = agent.settings

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_context(settings) as ctx:
            app.state.ctx = ctx
            runtime = AgentRuntime(
                agent, ctx, instance_id=instance_id, endpoint=endpoint, on_serving_failed=lambda: stop_server(app)
            )
            app.state.runtime = runtime
            try:
                await runtime.start()
                yield
            finally:
                await runtime.close()

    app = FastAPI(title=f"agent {agent.name}", version=agent.version, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(ServingReadiness)  # innermost: it sees HEAD /ready as the GET it is served as
    guard_input(app, max_bytes=settings.max_payload_bytes + 64 * 1024)
    app.include_router(ops_router(agent.name))
    app.include_router(agent_routes())
    return app


def serve_agent(app: FastAPI, *, host: str, port: int, service: str, log_level: str = "info") -> None:
    """Run the agent app until SIGTERM/SIGINT, draining before it exits. A start-up failure
    prints one line, ``error: ...``, and exits with status 2."""

    def stop_taking_work() -> None:
        runtime: AgentRuntime | None = getattr(app.state, "runtime", None)
        if runtime is not None:
            runtime.begin_drain()

    try:
        serve(app, host=host, port=port, service=service, log_level=log_level, on_signal=stop_taking_work)
    except OrchestratorError as e:
        print(f"error: {e.message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    exit_if_serving_failed(app, service)


def exit_if_serving_failed(app: FastAPI, service: str) -> None:
    """After :func:`~shared.lib.http_service.serve` returned: exit with status 1 and one error line
    when it returned because the app's agent stopped serving its requests on the bus, so that a
    supervisor starts it again (it stayed up, not ready, until someone restarted it by hand)."""
    runtime: AgentRuntime | None = getattr(app.state, "runtime", None)
    if runtime is None or runtime.serving_error is None:
        return
    print(
        f"error: {service} stopped serving its requests on the bus ({runtime.serving_error}); "
        "exiting with status 1, for its supervisor to start it again",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(1)
