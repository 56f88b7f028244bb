"""The infrastructure agent's health checks and remediations against real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from agents.infrastructure import InfrastructureAgent
from shared.lib.connections import connect_redis, create_pg_pool
from shared.lib.errors import InvalidInput
from shared.lib.redis_keys import request_stream
from shared.lib.resource_lock import ResourceLockManager
from shared.lib.settings import Settings


@pytest.fixture
async def infra(settings_factory: Callable[..., Settings], database_url: str, redis_url: str) -> AsyncIterator[Any]:
    """An infrastructure agent wired to this test's Redis prefix and database."""
    settings = settings_factory(visibility_timeout_s=5.0)
    agent = InfrastructureAgent(settings)
    agent.services.redis = await connect_redis(redis_url)
    agent.services.pool = await create_pg_pool(database_url, max_size=4)
    yield agent
    await agent.services.redis.aclose()
    await agent.services.pool.close()


async def test_requests_held_by_a_dead_consumer_are_found_and_made_reclaimable(infra: Any) -> None:
    """A request read by a consumer that is no longer live is an issue; reclaiming marks it idle past the timeout."""
    redis, prefix = infra.services.redis, infra.settings.redis_prefix
    stream = request_stream(prefix, "ghost", "normal")
    await redis.xgroup_create(stream, "ghost", id="0", mkstream=True)
    await redis.xadd(stream, {"e": b"{}"})
    await redis.xreadgroup("ghost", "ghost-dead-1", {stream: ">"}, count=1)

    report = await infra.run("HEALTH_CHECK", {"agents": ["ghost"], "max_pending": 0})
    kinds = {i["kind"]: i for i in report["issues"]}
    assert set(kinds) == {"pending_backlog", "dead_consumer"}
    assert kinds["pending_backlog"]["remediation"] is None  # a backlog has no fix of its own (REMEDIATE refuses)
    [probe] = [p for p in report["probes"] if p["kind"] == "redis_pending"]
    assert probe["detail"] == {"pending": 1, "consumers": {"ghost-dead-1": 1}}
    fix = kinds["dead_consumer"]["remediation"]
    assert fix == {"action": "reclaim_pending", "agent": "ghost", "consumer": "ghost-dead-1"}

    done = await infra.run("REMEDIATE", fix)
    assert done["reclaimable"] == 1
    [entry] = await redis.xpending_range(stream, "ghost", min="-", max="+", count=10)
    assert entry["time_since_delivered"] >= 5000
    assert entry["times_delivered"] == 1  # JUSTID: the bus's reclaim counts the redelivery, not us


async def test_an_expired_lock_is_found_and_released(infra: Any) -> None:
    """A lease past its TTL is an issue, and the release_lock remediation frees the resource."""
    locks = ResourceLockManager(infra.services.pool, infra.settings)
    try:
        await locks.acquire_lease("env:staging", owner="deployer-1", ttl_s=0.2)
        await asyncio.sleep(0.4)
        report = await infra.run("HEALTH_CHECK", {"locks": True})
        [issue] = report["issues"]
        assert issue["kind"] == "expired_lock"
        assert issue["remediation"] == {"action": "release_lock", "resource_id": "env:staging"}
        done = await infra.run("REMEDIATE", issue["remediation"])
        assert done["released"] is True
        assert done["owner"] == "deployer-1"
        assert await locks.holder("env:staging") is None
    finally:
        await locks.close()


async def test_a_remediation_missing_its_target_names_the_field(infra: Any) -> None:
    """Each remediation action requires its own target field."""
    with pytest.raises(InvalidInput) as refused:
        await infra.run("REMEDIATE", {"action": "release_lock"})
    assert "resource_id" in refused.value.message
