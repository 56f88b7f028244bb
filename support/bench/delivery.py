"""Delivery at scale: 50 agents each sending 200 requests to the others at once, every answer counted.

Each agent has its own :class:`EventBus` (its own reply channel and consumer) and
serves its own name with a handler that echoes who answered and which request it
was; all 50 then fire their 200 requests, 20 in flight each, to random other
agents. An answer counts only if it is a success from the agent it was sent to,
for the request that was sent. Everything runs in one process on one Redis, so
this measures the bus's bookkeeping under fan-in, not the network.

Figures: ``delivery_ratio_50_agents`` (answers counted / requests sent; must be
exactly 1.0), ``delivery_requests``, ``delivery_seconds``, ``delivery_rps``.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from typing import Any

from support.bench.harness import Progress, say, standalone

__all__ = ["run"]

AGENTS = 50
REQUESTS_EACH = 200
IN_FLIGHT_EACH = 20
TIMEOUT_S = 120.0


def _agent(i: int) -> str:
    return f"dlv-{i:02d}"


async def _send_all(bus: Any, i: int, rng: random.Random) -> int:
    """Agent ``i``'s requests to random others; returns the answers that check out."""
    from shared.lib.agent_events import AgentRequestEvent

    gate = asyncio.Semaphore(IN_FLIGHT_EACH)

    async def one(n: int) -> bool:
        target = rng.choice([j for j in range(AGENTS) if j != i])
        request = AgentRequestEvent.create(
            source_agent=_agent(i), target_agent=_agent(target), request_type="ECHO", payload={"n": n, "from": i}
        )
        async with gate:
            response = await bus.request_agent(request, timeout_s=TIMEOUT_S)
        return response.status == "success" and response.payload == {"by": target, "n": n, "from": i}

    return sum(await asyncio.gather(*(one(n) for n in range(REQUESTS_EACH))))


async def run(settings: Any, *, progress: Progress = None) -> dict[str, float]:
    from shared.lib.connections import connect_redis
    from shared.lib.event_bus import EventBus

    settings = settings.model_copy(update={"signing_key": secrets.token_urlsafe(32), "dev_mode": False})
    # One client per agent, as separate agent processes would have.
    clients = [await connect_redis(settings.redis_url, max_connections=IN_FLIGHT_EACH * 3) for _ in range(AGENTS)]
    buses = [
        EventBus(client, settings, instance_id=f"dlv-{i:02d}-{secrets.token_hex(3)}")
        for i, client in enumerate(clients)
    ]

    def handler(i: int) -> Any:
        async def echo(request: Any) -> dict[str, Any]:
            return {"by": i, **request.payload}

        return echo

    servers = [
        asyncio.create_task(bus.serve(_agent(i), handler(i), concurrency=IN_FLIGHT_EACH, consumer=f"c{i}"))
        for i, bus in enumerate(buses)
    ]
    try:
        await asyncio.sleep(0.5)  # every consumer group exists before the first request
        say(progress, f"scale: {AGENTS} agents x {REQUESTS_EACH} requests to each other")
        started = time.perf_counter()
        rng = random.Random(7)  # picking targets, not secrets
        answered = sum(await asyncio.gather(*(_send_all(bus, i, rng) for i, bus in enumerate(buses))))
        elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(bus.stop_serving(grace_s=2) for bus in buses), return_exceptions=True)
        for task in servers:
            task.cancel()
        await asyncio.gather(*servers, return_exceptions=True)
        await asyncio.gather(*(bus.close() for bus in buses), return_exceptions=True)
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)
    sent = AGENTS * REQUESTS_EACH
    return {
        "delivery_ratio_50_agents": answered / sent,
        "delivery_requests": float(sent),
        "delivery_seconds": elapsed,
        "delivery_rps": sent / elapsed,
    }


if __name__ == "__main__":
    standalone(run)
