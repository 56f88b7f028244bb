"""Clients for a one-shot operator command (``dlq``, ``events``, ``locks``).

The command connects to the configured servers (or starts the embedded ones, as
``migrate`` does), does its work and closes everything again.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from shared.lib.connections import connect_redis, create_pg_pool
from shared.lib.embedded import servers_for
from shared.lib.event_bus import EventBus
from shared.lib.settings import Settings

__all__ = ["Clients", "one_shot_clients"]


@dataclass(frozen=True)
class Clients:
    """What was asked for: the PostgreSQL URL and a small pool, and a bus over Redis (with the pool)."""

    database_url: str | None
    pool: asyncpg.Pool | None
    bus: EventBus | None


@contextlib.asynccontextmanager
async def one_shot_clients(settings: Settings, *, postgres: bool, redis: bool) -> AsyncIterator[Clients]:
    with servers_for(
        settings.data_dir,
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        with_postgres=postgres,
        with_redis=redis,
    ) as (db_url, redis_url):
        async with contextlib.AsyncExitStack() as stack:
            pool = await create_pg_pool(db_url, max_size=2) if db_url is not None else None
            if pool is not None:
                stack.push_async_callback(pool.close)
            bus = None
            if redis_url is not None:
                client = await connect_redis(redis_url, max_connections=4)
                stack.push_async_callback(client.aclose)
                bus = EventBus(client, settings, pool=pool)
                stack.push_async_callback(bus.close)
            yield Clients(db_url, pool, bus)
