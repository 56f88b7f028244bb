"""Fixtures of the integration tests."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from shared.lib import redis_keys as keys
from shared.lib.connections import connect_redis, create_pg_pool
from shared.lib.event_bus import EventBus
from shared.lib.settings import Settings

BusFactory = Callable[..., Awaitable[EventBus]]


@pytest.fixture
async def make_bus(settings_factory: Callable[..., Settings]) -> AsyncIterator[BusFactory]:
    """Build buses (own Redis client each, shared PG pool); all are closed at teardown."""
    made: list[tuple[EventBus, aioredis.Redis]] = []
    pools: list[asyncpg.Pool] = []

    async def make(**overrides: Any) -> EventBus:
        settings = settings_factory(**{"visibility_timeout_s": 1.0, **overrides})
        client = await connect_redis(settings.redis_url or "")
        if not pools:
            pools.append(await create_pg_pool(settings.database_url or "", max_size=4))
        bus = EventBus(client, settings, pool=pools[0])
        made.append((bus, client))
        return bus

    yield make
    for bus, client in made:
        await bus.close()
        await client.aclose()
    for pool in pools:
        await pool.close()


async def serve_on(bus: EventBus, agent: str, handler: Any) -> asyncio.Task[None]:
    """``bus`` serving ``agent`` with ``handler`` (as consumer c1), once its consumer shows as live."""
    task = asyncio.create_task(bus.serve(agent, handler, concurrency=4, consumer="c1"))
    for _ in range(200):
        if await bus.redis.zcard(keys.consumers_key(bus.settings.redis_prefix, agent)):
            break
        await asyncio.sleep(0.01)
    return task


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """``agent-orchestrator ARGS`` in a child process: its exit code and its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_orchestrator",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()
