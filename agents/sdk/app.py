"""The FastAPI app of one agent instance, and serving it with a SIGTERM drain.

``create_agent_app`` opens the service context (PostgreSQL pool, Redis) and an
:class:`AgentRuntime` in the lifespan, and serves ``/agent-request``, the A2A
card, ``/health``, ``/ready`` and ``/metrics``. ``serve_agent`` runs it under
uvicorn; on SIGTERM the agent stops taking work at once (bus and HTTP), lets
in-flight work finish for ``Settings.agent_drain_grace_s``, deregisters, and
only then lets uvicorn close.

A start-up failure (the port taken, a wrong registration secret, PostgreSQL or
Redis out of reach) is one line, ``error: <what to do>``, and exit status 2, the
same through ``agent-orchestrator agent`` and through a script calling
``serve_agent`` as docs/AGENT_REGISTRY.md shows. So the server enters the app's
lifespan itself, as the first step of its start-up, instead of leaving it to
uvicorn: uvicorn logs a lifespan that fails with its whole traceback (58 lines for
a wrong secret) and exits 3 before ``serve_agent`` can say anything.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from agents.sdk.agent import Agent
from agents.sdk.routes import agent_routes
from agents.sdk.runtime import AgentRuntime
from shared.lib.errors import OrchestratorError, StartupError
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
    """uvicorn, except that SIGTERM first tells the agent to stop taking work, and that the
    app's lifespan is entered here (its error raised as such) rather than by uvicorn."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._lifespan: AbstractAsyncContextManager[Any] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        lifespan = self._app.router.lifespan_context(self._app)
        await lifespan.__aenter__()  # a failure propagates out of run(), as an exception, unlogged
        self._lifespan = lifespan
        try:
            await super().startup(sockets)
        except BaseException:  # the socket could not be bound: leave (deregister) before exiting
            await self._exit_lifespan()
            raise

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            await self._exit_lifespan()

    async def _exit_lifespan(self) -> None:
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        runtime: AgentRuntime | None = getattr(self._app.state, "runtime", None)
        if runtime is not None:
            runtime.begin_drain()
        super().handle_exit(sig, frame)


def serve_agent(app: FastAPI, *, host: str, port: int, service: str, log_level: str = "info") -> None:
    """Run the agent app until SIGTERM/SIGINT, draining before it exits. A start-up failure
    prints one line, ``error: ...``, and exits with status 2."""
    try:
        _serve(app, host=host, port=port, service=service, log_level=log_level)
    except OrchestratorError as e:
        print(f"error: {e.message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _serve(app: FastAPI, *, host: str, port: int, service: str, log_level: str) -> None:
    check_port_free(host, port, service)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), lifespan="off",
                            access_log=False, timeout_graceful_shutdown=30)  # fmt: skip
    tune_gc_after_startup(app)
    server = _DrainingServer(config, app)
    try:
        server.run()
    except SystemExit as e:  # uvicorn's own start-up failure (exit 3), its reason logged in one line
        if e.code != uvicorn.config.STARTUP_FAILURE:
            raise
    if not server.started:
        raise StartupError(f"{service} failed to start on {host}:{port}; its log above says why")
