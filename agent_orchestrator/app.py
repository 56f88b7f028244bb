"""The orchestrator service: the FastAPI app, its lifespan and its background runner.

Everything with a lifecycle (pools, the bus, the saver, the runner, the
orchestrator agent's registration) is created in the lifespan and closed there,
in reverse order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from fastapi import FastAPI

from agent_orchestrator.api import mount
from agent_orchestrator.checkpointer import open_checkpointer
from agent_orchestrator.housekeeping import Housekeeper
from agent_orchestrator.orchestrator_agent import WorkflowOrchestratorAgent
from agent_orchestrator.records import WorkflowRecords
from agent_orchestrator.run_store import RunStore
from agent_orchestrator.runner import WorkflowRunner
from agent_orchestrator.service import Orchestrator
from agent_orchestrator.workflows import load_workflow_types
from agents.sdk.routes import agent_routes
from agents.sdk.runtime import AgentRuntime
from shared.lib.event_bus import EventBus
from shared.lib.http_service import guard_input, install_error_handlers, open_context, ops_router, stop_server
from shared.lib.resource_lock import ResourceLockManager
from shared.lib.settings import Settings
from shared.lib.workflow_state import WorkflowStateManager

__all__ = ["create_app"]

_log = logging.getLogger(__name__)


def _instance_id(port: int) -> str:
    """This replica's id in the registry: host and port, stable across restarts, so a restarted
    replica re-registers under (replaces) its earlier row instead of leaving it behind."""
    return f"orchestrator-{socket.gethostname()[:20].lower()}-{port}".replace(".", "-")


def _runner_id(instance_id: str) -> str:
    """This process's id in run leases: the instance id and the pid, so a restarted replica never
    takes the leases of its previous process for its own."""
    return f"{instance_id}-{os.getpid()}"


def _orchestrator(
    settings: Settings, pool: asyncpg.Pool, bus: EventBus, locks: ResourceLockManager, saver: Any, replica: str
) -> Orchestrator:
    run_store = RunStore(pool, runner_id=replica, lease_ttl_s=settings.run_lease_ttl_s)
    records = WorkflowRecords(pool, WorkflowStateManager(pool), run_store)
    types, failed = load_workflow_types()
    orch = Orchestrator(
        settings=settings, records=records, bus=bus, locks=locks, saver=saver, types=types, failed_types=failed
    )
    orch.runner = WorkflowRunner(
        pool,
        settings,
        execute=orch.execute,
        on_finished=orch.on_finished,
        on_stuck=orch.on_stuck,
        on_expired=orch.expire_approval,
        load_records=orch.records.get_many,
        runner_id=replica,
        workflow_types=list(orch.types),
    )
    return orch


def create_app(settings: Settings, *, port: int | None = None) -> FastAPI:
    """The orchestrator API; ``port`` names this replica in leases and logs."""
    instance = _instance_id(port or settings.port_for("orchestrator"))
    replica = _runner_id(instance)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            ctx = await stack.enter_async_context(open_context(settings, pg_max_size=20))
            app.state.ctx = ctx
            agent = WorkflowOrchestratorAgent(settings)
            runtime = AgentRuntime(
                agent,
                ctx,
                instance_id=instance,
                endpoint=settings.url_for("orchestrator") if port is None else f"http://{settings.host}:{port}",
                on_serving_failed=lambda: stop_server(app),
            )
            stack.push_async_callback(runtime.close)
            locks = await stack.enter_async_context(ResourceLockManager(ctx.pool, settings, emit=runtime.bus.emit))
            saver = await stack.enter_async_context(open_checkpointer(settings, max_size=20))
            orch = _orchestrator(settings, ctx.pool, runtime.bus, locks, saver, replica)
            orch.preinitialize_metrics()
            agent.services.extras["orchestrator"] = orch
            app.state.orchestrator = orch
            stack.push_async_callback(orch.watch.close)
            app.state.runtime = runtime
            assert orch.runner is not None
            await orch.runner.start()
            stack.push_async_callback(orch.runner.stop)
            housekeeper = Housekeeper(
                ctx.pool,
                saver,
                retention_s=settings.checkpoint_retention_s,
                interval_s=settings.housekeeping_interval_s,
            )
            housekeeper.start()
            stack.push_async_callback(housekeeper.stop)
            await runtime.start()
            _log.info("orchestrator %s ready with workflow types %s", replica, sorted(orch.types))
            yield

    app = FastAPI(title="agent-orchestrator", version="0.1.0", lifespan=lifespan)
    guard_input(app, max_bytes=settings.max_payload_bytes)
    install_error_handlers(app)
    app.include_router(ops_router("orchestrator"))
    mount(app)
    app.include_router(agent_routes())
    return app
