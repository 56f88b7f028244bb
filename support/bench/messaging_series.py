"""Messaging curves for the report: bus throughput against requests in flight, and the
latency distribution of sequential calls.

The responder is the messaging benchmark's own (``support.bench.messaging --role
responder``, a separate process, no-op handler, signing on); the requester runs
here. Figures: ``rpc_series_p50_ms`` and ``rpc_series_rps_at_<n>`` for each ``n``
in ``IN_FLIGHT``; the curve ``messaging throughput vs in-flight`` and the
distribution ``messaging sequential``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import uuid
from pathlib import Path
from typing import Any

from support.bench.harness import Plan, Progress, SuiteResult, measure, quantiles, say, standalone, throughput

__all__ = ["run", "run_detailed"]

IN_FLIGHT = (1, 4, 16, 64)
SECONDS_EACH = 2.0
PLAN = Plan(warmup=300, rounds=5, per_round=300)
AGENT = "bench"  # the responder serves this name


def _env(settings: Any, signing_key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AO_")}
    env.update(
        {
            "REDIS_URL": settings.redis_url,
            "AO_REDIS_PREFIX": settings.redis_prefix,
            "AO_SIGNING_KEY": signing_key,
            "AO_REGISTRATION_SECRET": secrets.token_urlsafe(32),
            "AO_API_KEYS": secrets.token_urlsafe(16),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        }
    )
    return env


async def _curves(bus: Any, progress: Progress) -> SuiteResult:
    from shared.lib.agent_events import AgentRequestEvent

    async def call() -> None:
        request = AgentRequestEvent.create(source_agent="series", target_agent=AGENT, request_type="NOOP")
        response = await bus.request_agent(request, timeout_s=30)
        assert response.status == "success", response

    timing = (await measure({"sequential": call}, plan=PLAN, progress=progress, label="messaging"))["sequential"]
    result = SuiteResult(
        figures={"rpc_series_p50_ms": timing.p50},
        distributions={"messaging sequential": quantiles(timing.samples_ms)},
    )
    points = []
    for n in IN_FLIGHT:
        say(progress, f"messaging: throughput with {n} in flight")
        rps = await throughput(call, in_flight=n, duration_s=SECONDS_EACH)
        result.figures[f"rpc_series_rps_at_{n}"] = rps
        points.append([float(n), rps])
    result.series["messaging throughput vs in-flight"] = points
    return result


async def run_detailed(settings: Any, *, progress: Progress = None) -> SuiteResult:
    from shared.lib.connections import connect_redis
    from shared.lib.errors import AgentOffline
    from shared.lib.event_bus import EventBus

    key = secrets.token_urlsafe(32)
    settings = settings.model_copy(
        update={"signing_key": key, "dev_mode": False, "redis_prefix": f"series{uuid.uuid4().hex[:8]}"}
    )
    responder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "support.bench.messaging",
        "--role",
        "responder",
        env=_env(settings, key),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    client = await connect_redis(settings.redis_url, max_connections=max(IN_FLIGHT) + 8)
    bus = EventBus(client, settings)
    try:
        for _ in range(600):  # the responder is up once a call is answered (at most 30 s)
            try:
                return await _curves(bus, progress)
            except AgentOffline:
                await asyncio.sleep(0.05)
        raise RuntimeError("the messaging responder never answered")
    finally:
        responder.terminate()
        try:
            await asyncio.wait_for(responder.wait(), 10)
        except TimeoutError:
            responder.kill()
            await responder.wait()
        await bus.close()
        await client.aclose()


async def run(settings: Any, *, progress: Progress = None) -> dict[str, float]:
    return (await run_detailed(settings, progress=progress)).figures


if __name__ == "__main__":
    standalone(run)
