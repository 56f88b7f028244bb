"""Clients for a one-shot operator command (``dlq``, ``events``, ``locks``).

The command connects to the configured servers (``DATABASE_URL``, ``REDIS_URL``) or, where
one is unset, to the embedded server a running stack (``agent-orchestrator up``) keeps under
the data dir. It never starts a server of its own: a fresh, empty one would answer "no dead
letters" or lack the schema, when the operator meant the stack's. With neither, it fails
with one line saying what to set.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from shared.lib.connections import connect_redis, create_pg_pool
from shared.lib.errors import StartupError
from shared.lib.event_bus import EventBus
from shared.lib.running_stack import server_urls
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
    db_url, redis_url = server_urls(settings, postgres=postgres, redis=redis)
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
        try:
            yield Clients(db_url, pool, bus)
        except asyncpg.UndefinedTableError as e:
            raise StartupError(
                f"the database lacks the schema ({e}): run `agent-orchestrator migrate` against it, "
                "or point DATABASE_URL at the stack's database"
            ) from e
