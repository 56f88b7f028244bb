"""The registry's FastAPI app: built by :func:`create_app`, its parts opened in the lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from agent_registry.deps import Registry
from agent_registry.events import AgentEvents
from agent_registry.reaper import Reaper
from agent_registry.routes import router
from agent_registry.store import RegistryStore
from agent_registry.watch import ChangeFeed
from shared.lib.event_bus import EventBus
from shared.lib.http_service import (
    ServiceContext,
    guard_input,
    install_error_handlers,
    open_context,
    ops_router,
)
from shared.lib.settings import Settings

__all__ = ["SERVICE", "create_app"]

SERVICE = "agent-registry"


@contextlib.asynccontextmanager
async def _open_registry(settings: Settings) -> AsyncIterator[ServiceContext]:
    async with open_context(settings) as ctx:
        assert settings.database_url is not None  # open_context refuses to start without it
        bus = EventBus(ctx.redis, settings, pool=ctx.pool)
        store = RegistryStore(ctx.pool)
        events = AgentEvents(bus)
        feed = ChangeFeed(settings.database_url)
        reaper = Reaper(
            store,
            events,
            stale_after_s=settings.agent_stale_after_s,
            remove_after_s=settings.agent_remove_after_s,
        )
        try:
            await feed.start()
            ctx.extras["registry"] = Registry(settings=settings, store=store, events=events, feed=feed)
            reaper.start()
            yield ctx
        finally:
            await reaper.stop()
            await feed.stop()
            await bus.close()


def create_app(settings: Settings) -> FastAPI:
    """The registry app for ``settings``; nothing connects until the lifespan runs."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _open_registry(settings) as ctx:
            app.state.ctx = ctx
            yield

    app = FastAPI(title=SERVICE, lifespan=lifespan)
    install_error_handlers(app)
    guard_input(app, max_bytes=settings.max_payload_bytes)
    app.include_router(ops_router(SERVICE))
    app.include_router(router)
    return app
