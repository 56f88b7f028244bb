"""Health probes of a deployment: HTTP and TCP targets, the release an
environment serves, and the request backlog pending on the bus.

Each probe returns :class:`Issue` values; an issue may carry the remediation
the infrastructure agent can apply to it (``deregister_instance``,
``reclaim_pending``, ``release_lock``, ``rollback``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from agents.work.release import current_release
from shared.lib.redis_keys import BANDS, as_text, request_stream

__all__ = ["Issue", "Probe", "probe_environment", "probe_http", "probe_pending", "probe_tcp"]


@dataclass(frozen=True)
class Issue:
    """Something unhealthy, where, how bad, and what would fix it."""

    kind: str
    target: str
    severity: str  # "critical" fails the check; "warning" does not
    message: str
    remediation: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Probe:
    """The outcome of one probe, healthy or not, with how long it took."""

    kind: str
    target: str
    healthy: bool
    latency_ms: float
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def probe_http(url: str, *, timeout_s: float, expect_status: int = 200) -> tuple[Probe, Issue | None]:
    """GET ``url``; anything but ``expect_status`` within ``timeout_s`` is a critical issue."""
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(url)
    except httpx.HTTPError as e:
        probe = Probe("http", url, False, _ms(started), {"error": f"{type(e).__name__}: {e}"})
        return probe, Issue("http_unreachable", url, "critical", f"{url} did not answer: {type(e).__name__}")
    probe = Probe("http", url, response.status_code == expect_status, _ms(started), {"status": response.status_code})
    if probe.healthy:
        return probe, None
    message = f"{url} answered {response.status_code}, expected {expect_status}"
    return probe, Issue("http_status", url, "critical", message)


async def probe_tcp(host: str, port: int, *, timeout_s: float) -> tuple[Probe, Issue | None]:
    """Open (and close) a TCP connection to ``host:port`` within ``timeout_s``."""
    target = f"{host}:{port}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), timeout=timeout_s)
    except (OSError, TimeoutError) as e:
        probe = Probe("tcp", target, False, _ms(started), {"error": f"{type(e).__name__}: {e}"})
        return probe, Issue("tcp_unreachable", target, "critical", f"nothing accepts connections on {target}")
    return Probe("tcp", target, True, _ms(started)), None


def probe_environment(env: Path) -> tuple[Probe, Issue | None]:
    """Whether ``env/current`` points at an existing release (a dangling switch is critical)."""
    revision = current_release(env)
    target = str(env)
    if revision is None:
        issue = Issue("not_deployed", target, "warning", f"{env.name} has never been deployed")
        return Probe("release", target, False, 0.0), issue
    healthy = (env / "current").resolve().is_dir()
    probe = Probe("release", target, healthy, 0.0, {"revision": revision})
    if healthy:
        return probe, None
    fix = {"action": "rollback", "environment": target}
    return probe, Issue("dangling_release", target, "critical", f"current points at missing release {revision}", fix)


async def probe_pending(
    redis: aioredis.Redis, prefix: str, agents: list[str], *, max_pending: int
) -> tuple[list[Probe], list[Issue]]:
    """Requests read but not yet acknowledged per agent (XPENDING over its request streams)."""
    probes, issues = [], []
    for agent in agents:
        started = time.monotonic()
        pending, consumers = await _pending_of(redis, prefix, agent)
        detail = {"pending": pending, "consumers": consumers}
        probes.append(Probe("redis_pending", agent, pending <= max_pending, _ms(started), detail))
        if pending > max_pending:  # no fix of its own: a dead consumer's share is a dead_consumer issue
            message = f"{pending} requests pending for {agent} (threshold {max_pending})"
            issues.append(Issue("pending_backlog", agent, "warning", message))
    return probes, issues


async def _pending_of(redis: aioredis.Redis, prefix: str, agent: str) -> tuple[int, dict[str, int]]:
    total, consumers = 0, dict[str, int]()
    for band in BANDS:
        try:
            summary = await redis.xpending(request_stream(prefix, agent, band), agent)
        except ResponseError:  # no stream or no group yet: nothing pending
            continue
        total += int(summary.get("pending") or 0)
        for entry in summary.get("consumers") or []:
            name = as_text(entry["name"])
            consumers[name] = consumers.get(name, 0) + int(entry["pending"])
    return total, consumers


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)
