"""Finding and fixing what a health check reports beyond HTTP and TCP: stale
registry instances, requests held by dead bus consumers, expired lock leases.

Each finder returns :class:`Issue` values whose ``remediation`` is the action
the infrastructure agent's REMEDIATE applies. The fixes reuse the owners'
mechanisms rather than redoing them: the registry's operator DELETE, the bus's
own reclaim (a dead consumer's entries are marked idle past the visibility
timeout, so a live instance's next XAUTOCLAIM takes them with their delivery
counts intact), and the lock manager's force release.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from agents.work.health import Issue
from shared.lib.errors import NotFound, OrchestratorError
from shared.lib.redis_keys import BANDS, as_text, consumers_key, request_stream
from shared.lib.registry_client import RegistryClient
from shared.lib.registry_models import AgentStatus
from shared.lib.resource_lock import ResourceLockManager

__all__ = [
    "dead_consumers",
    "deregister_instance",
    "expired_locks",
    "reclaim_pending",
    "release_lock",
    "stale_instances",
]

_DEAD = (AgentStatus.OFFLINE, AgentStatus.ERROR)


async def stale_instances(registry: RegistryClient, *, stale_after_s: float) -> list[Issue]:
    """Instances the registry marks offline/error, or whose last heartbeat is older than ``stale_after_s``."""
    issues = []
    now = datetime.now(UTC)
    for instance in await registry.discover(limit=1000):
        silent_s = (now - instance.last_heartbeat).total_seconds()
        if instance.status in _DEAD or silent_s > stale_after_s:
            message = f"{instance.name} instance {instance.id} is {instance.status.value}, silent for {silent_s:.0f}s"
            fix = {"action": "deregister_instance", "agent_id": instance.id}
            issues.append(Issue("stale_instance", instance.id, "warning", message, fix))
    return issues


async def deregister_instance(registry_url: str, agent_id: str, *, api_key: str | None, timeout_s: float) -> bool:
    """Remove ``agent_id`` from the registry as an operator; False if it was already gone."""
    headers = {"X-API-Key": api_key} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout_s) as http:
        response = await http.delete(f"{registry_url.rstrip('/')}/agents/{agent_id}", headers=headers)
    if response.status_code == 404:
        return False
    if response.status_code >= 400:
        raise OrchestratorError(f"registry refused to remove {agent_id}: {response.status_code} {response.text[:200]}")
    return True


async def dead_consumers(redis: aioredis.Redis, prefix: str, agent: str) -> dict[str, int]:
    """Consumers of ``agent`` holding pending requests while no longer live, with how many each holds."""
    live_until = {as_text(m): s for m, s in await redis.zrange(consumers_key(prefix, agent), 0, -1, withscores=True)}
    now_ms = time.time() * 1000
    held: dict[str, int] = {}
    for band in BANDS:
        try:
            summary = await redis.xpending(request_stream(prefix, agent, band), agent)
        except ResponseError:  # no stream or group yet
            continue
        for entry in summary.get("consumers") or []:
            name = as_text(entry["name"])
            if live_until.get(name, 0) < now_ms:
                held[name] = held.get(name, 0) + int(entry["pending"])
    return held


async def reclaim_pending(
    redis: aioredis.Redis, prefix: str, agent: str, consumer: str, *, visibility_timeout_s: float
) -> int:
    """Make ``consumer``'s pending requests reclaimable now; returns how many were marked."""
    idle_ms = int(visibility_timeout_s * 1000) + 1
    marked = 0
    for band in BANDS:
        stream = request_stream(prefix, agent, band)
        try:
            rows = await redis.xpending_range(stream, agent, min="-", max="+", count=10_000, consumername=consumer)
        except ResponseError:
            continue
        ids = [row["message_id"] for row in rows]
        if ids:
            await redis.xclaim(stream, agent, consumer, 0, ids, idle=idle_ms, justid=True)
            marked += len(ids)
    return marked


async def expired_locks(locks: ResourceLockManager) -> list[Issue]:
    """Leases past their TTL (or abandoned by their session) that nobody has ended yet."""
    issues = []
    for info in await locks.list_locks():
        if info.state in ("expired", "abandoned"):
            message = (
                f"lock {info.resource_id} held by {info.owner} is {info.state} since {info.expires_at.isoformat()}"
            )
            fix = {"action": "release_lock", "resource_id": info.resource_id}
            issues.append(Issue("expired_lock", info.resource_id, "warning", message, fix))
    return issues


async def release_lock(locks: ResourceLockManager, resource_id: str, *, reason: str) -> dict[str, Any]:
    """Force-release ``resource_id``; a lock already free is reported, not an error."""
    try:
        info = await locks.force_release(resource_id, reason)
    except NotFound:
        return {"released": False, "resource_id": resource_id}
    return {"released": True, "resource_id": resource_id, "owner": info.owner, "token": info.token}
