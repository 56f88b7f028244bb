"""Lock benchmark: leases through ResourceLockManager against the bare advisory lock and Redis.

Figures, measured in the same run on the same servers (rounds interleaved so a
busy machine weighs on all of them alike):

- ``lock_p50_ms``: an uncontended ``async with locks.acquire(...)`` (grant with
  fencing token and history, then release), one task;
- ``lock_floor_p50_ms``: bare ``pg_try_advisory_lock`` + ``pg_advisory_unlock`` on
  one connection, the floor any advisory-lock lease pays;
- ``redis_lock_p50_ms``: redis-py's asyncio ``Lock`` acquire + release, the peer;
- ``lock_contended_throughput``: grants per second with 64 tasks over 16 resources;
- ``lock_vs_floor``: ``lock_p50_ms / lock_floor_p50_ms``.

Run alone: ``uv run python -m support.bench.locks`` prints the figures as JSON
(embedded servers, placed as ``harness`` says, unless DATABASE_URL / REDIS_URL are set).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from support.bench.harness import Plan, Progress, measure, standalone

__all__ = ["run"]

PLAN = Plan(warmup=300, rounds=10, per_round=300)
CONTENDED_TASKS = 64
CONTENDED_RESOURCES = 16
CONTENDED_S = 3.0


async def _latencies(db_url: str, redis_url: str, settings: Any, progress: Progress) -> dict[str, float]:
    from redis.asyncio import Redis

    from shared.lib.connections import connect_postgres, create_pg_pool
    from shared.lib.resource_lock import ResourceLockManager

    pool = await create_pg_pool(db_url, max_size=4)
    floor_conn = await connect_postgres(db_url)
    redis = Redis.from_url(redis_url)
    try:
        async with ResourceLockManager(pool, settings.model_copy(update={"database_url": db_url})) as locks:

            async def lease() -> None:
                async with locks.acquire("bench:uncontended", owner="bench", ttl_s=30):
                    pass

            async def floor() -> None:
                await floor_conn.fetchval("SELECT pg_try_advisory_lock(4242)")
                await floor_conn.fetchval("SELECT pg_advisory_unlock(4242)")

            redis_lock = redis.lock(f"aobench:{uuid.uuid4().hex}", timeout=30)

            async def peer() -> None:
                await redis_lock.acquire(blocking=False)
                await redis_lock.release()

            timings = await measure(
                {"lock": lease, "floor": floor, "redis": peer}, plan=PLAN, progress=progress, label="locks"
            )
            contended = await _contended(locks)
    finally:
        await redis.aclose()
        await floor_conn.close()
        await pool.close()
    lock, floor_ms, redis_ms = (timings[k].p50 for k in ("lock", "floor", "redis"))
    return {
        "lock_p50_ms": lock,
        "lock_p99_ms": timings["lock"].p99,
        "lock_floor_p50_ms": floor_ms,
        "redis_lock_p50_ms": redis_ms,
        "lock_vs_floor": lock / floor_ms,
        "lock_contended_throughput": contended,
    }


async def _contended(locks: Any) -> float:
    """Grants per second with CONTENDED_TASKS tasks looping over CONTENDED_RESOURCES resources."""
    grants = 0
    stop = time.monotonic() + CONTENDED_S

    async def worker(i: int) -> None:
        nonlocal grants
        resource = f"bench:contended-{i % CONTENDED_RESOURCES}"
        while time.monotonic() < stop:
            async with locks.acquire(resource, owner=f"task-{i}", ttl_s=30, wait_s=30):
                grants += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(CONTENDED_TASKS)))
    return grants / (time.monotonic() - started)


async def run(settings: Any, *, progress: Progress = None) -> dict[str, float]:
    """Run the lock benchmark on the database and Redis of ``settings``."""
    return await _latencies(settings.database_url, settings.redis_url, settings, progress)


if __name__ == "__main__":
    standalone(run)
