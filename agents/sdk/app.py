"""The FastAPI app of one agent instance, and serving it with a SIGTERM drain.

``create_agent_app`` opens the service context (PostgreSQL pool, Redis) and an
:class:`AgentRuntime` in the lifespan, and serves ``/agent-request``, the A2A
card, ``/health``, ``/ready`` and ``/metrics``. ``serve_agent`` runs it under
uvicorn; on SIGTERM the agent stops taking work at once (bus and HTTP), lets
in-flight work finish for ``Settings.agent_drain_grace_s``, deregisters, and
only then lets uvicorn close.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from agents.sdk.agent import Agent
from agents.sdk.routes import agent_routes
from agents.sdk.runtime import AgentRuntime
from shared.lib.errors import StartupError
from shared.lib.http_service import (
    check_port_free,
    guard_input,
    install_error_handlers,
    open_context,
    ops_router,
    tune_gc_after_startup,
)

__all__ = ["create_agent_app", "serve_agent"]

_log = logging.getLogger(__name__)


def create_agent_app(agent: Agent, *, instance_id: str, endpoint: str) -> FastAPI:
    """The app serving ``agent`` as ``instance_id``, announced to the registry at ``endpoint``."""
    settings = agent.settings

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_context(settings) as ctx:
            app.state.ctx = ctx
            runtime = AgentRuntime(agent, ctx, instance_id=instance_id, endpoint=endpoint)
            app.state.runtime = runtime
            try:
                await runtime.start()
                yield
            finally:
                await runtime.close()

    app = FastAPI(title=f"agent {agent.name}", version=agent.version, lifespan=lifespan)
    install_error_handlers(app)
    guard_input(app, max_bytes=settings.max_payload_bytes + 64 * 1024)
    app.include_router(ops_router(agent.name))
    app.include_router(agent_routes())
    return app


class _DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM first tells the agent to stop taking work."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        runtime: AgentRuntime | None = getattr(self._app.state, "runtime", None)
        if runtime is not None:
            runtime.begin_drain()
        super().handle_exit(sig, frame)


def serve_agent(app: FastAPI, *, host: str, port: int, service: str, log_level: str = "info") -> None:
    """Run the agent app until SIGTERM/SIGINT, draining before it exits."""
    check_port_free(host, port, service)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), lifespan="on",
                            access_log=False, timeout_graceful_shutdown=30)  # fmt: skip
    tune_gc_after_startup(app)
    server = _DrainingServer(config, app)
    server.run()
    if not server.started:
        raise StartupError(f"{service} failed to start on {host}:{port}; its log above says why")
