"""An agent instance as a service, in-process on a real port next to a real registry, over
real PostgreSQL and Redis: what its ``/ready``, the registry and ``POST /agent-request`` say
when its bus serving fails, when it is full, and for a reused idempotency key."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from agents.sdk.agent import Agent, skill
from agents.sdk.app import create_agent_app
from shared.lib import redis_keys as keys
from shared.lib.agent_events import AgentRequestEvent
from shared.lib.embedded import free_port
from shared.lib.settings import Settings
from support.tests.registry_support import API_KEY, RunningRegistry, serve_in_loop, serve_registry


class _Wait(BaseModel):
    seconds: float = 0.0


class Waiter(Agent):
    """An agent whose one skill sleeps as long as it is told."""

    name = "waiter"
    description = "Waits."

    @skill("WAIT", description="Sleeps for the seconds given.")
    async def wait(self, payload: _Wait) -> dict[str, Any]:
        await asyncio.sleep(payload.seconds)
        return {"waited_s": payload.seconds}


@dataclass
class RunningAgent:
    url: str
    agent: Agent
    app: Any

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime


@contextlib.asynccontextmanager
async def serve_agent_app(
    settings_factory: Callable[..., Settings], registry: RunningRegistry, **overrides: Any
) -> AsyncIterator[RunningAgent]:
    """The :class:`Waiter` agent's app served by uvicorn on a free port, registered with ``registry``."""
    agent = Waiter(settings_factory(registry_url=registry.url, **overrides))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_agent_app(agent, instance_id="waiter-1", endpoint=url)
    async with serve_in_loop(app, port, stop_within_s=30):
        yield RunningAgent(url=url, agent=agent, app=app)


async def _until(check: Callable[[], Any], *, timeout_s: float) -> Any:
    """Poll the coroutine function ``check`` until it returns something truthy; that value."""
    async with asyncio.timeout(timeout_s):
        while not (value := await check()):
            await asyncio.sleep(0.05)
    return value


async def test_an_instance_whose_bus_serving_ended_is_not_ready_and_is_error_in_the_registry(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a loop of the bus server ends on its own (a bug), /ready answers 503 naming the bus and
    the registry has the instance as error (both said ready and active while nobody took its requests)."""
    from shared.lib import _bus_serve

    async def broken(self: Any) -> None:
        await asyncio.sleep(0.5)
        raise RuntimeError("a bug in the maintenance")

    monkeypatch.setattr(_bus_serve.Server, "_maintain_loop", broken)
    async with (
        serve_registry(settings_factory) as registry,
        serve_agent_app(settings_factory, registry) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10) as http,
    ):
        settings = running.agent.settings

        async def not_ready() -> httpx.Response | None:
            answer = await http.get("/ready")
            return answer if answer.status_code == 503 else None

        answer = await _until(not_ready, timeout_s=10)
        assert "a bug in the maintenance" in answer.json()["checks"]["bus"]
        assert answer.json()["checks"]["bus"].startswith("error: ")

        async def in_error() -> bool:
            return bool((await registry.get("waiter-1")).json()["status"] == "error")

        await _until(in_error, timeout_s=10)
        consumers = keys.consumers_key(settings.redis_prefix, "waiter")
        assert await running.runtime.ctx.redis.zscore(consumers, "waiter-1") is None
        assert (await http.get("/health")).status_code == 200


def _envelope(seconds: float = 0.0, **fields: Any) -> dict[str, Any]:
    request = AgentRequestEvent.create(
        source_agent="tester", target_agent="waiter", request_type="WAIT", payload={"seconds": seconds}
    )
    return {**request.to_dict(), **fields}


async def test_a_forged_envelope_without_credentials_is_answered_and_stores_nothing(
    settings_factory: Callable[..., Settings],
) -> None:
    """POST /agent-request with no credentials, a bogus signature and a 1 MB payload is a 401
    bad_signature and leaves nothing in Redis (each went whole into the dead-letter stream)."""
    async with (
        serve_registry(settings_factory) as registry,
        serve_agent_app(settings_factory, registry) as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as http,
    ):
        redis = running.runtime.ctx.redis
        dead = keys.dead_letter_stream(running.agent.settings.redis_prefix, "waiter")
        before = (await redis.info("memory"))["used_memory"]
        forged = _envelope(signature="00" * 32)
        forged["payload"]["filler"] = "a" * 1_000_000
        for _ in range(20):
            answer = await http.post("/agent-request", json=forged)
            assert (answer.status_code, answer.json()["error"]["code"]) == (401, "bad_signature")
        assert await redis.xlen(dead) == 0
        assert (await redis.info("memory"))["used_memory"] - before < 5_000_000  # it was 20 MB


async def test_a_full_instance_answers_busy_over_http_at_once(settings_factory: Callable[..., Settings]) -> None:
    """With AO_AGENT_CONCURRENCY 2, six concurrent POST /agent-request of a 1 s WAIT: two run, four
    are answered 503 busy with Retry-After at once (all six ran together: 60 pipelines at once)."""
    async with (
        serve_registry(settings_factory) as registry,
        serve_agent_app(settings_factory, registry, agent_concurrency=2) as running,
        httpx.AsyncClient(base_url=running.url, timeout=30, headers={"X-API-Key": API_KEY}) as http,
    ):

        async def post() -> tuple[httpx.Response, float]:
            started = time.monotonic()
            answer = await http.post("/agent-request", json=_envelope(seconds=1.0))
            return answer, time.monotonic() - started

        answers = await asyncio.gather(*(post() for _ in range(6)))
    codes = sorted(answer.status_code for answer, _ in answers)
    assert codes == [200, 200, 503, 503, 503, 503]
    for answer, took_s in answers:
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "busy"
            assert answer.json()["error"]["retryable"] is True
            assert answer.headers["Retry-After"] == "1"
            assert took_s < 0.9


async def test_an_idempotency_key_reused_by_another_caller_over_http_is_a_409(
    settings_factory: Callable[..., Settings],
) -> None:
    """One request with the API key under key K; another agent's token then sends a different
    request under K: 409 naming idempotency_key (it got 200 with the first caller's answer), and
    the first caller's retry of its own request still gets its stored answer."""
    async with (
        serve_registry(settings_factory) as registry,
        serve_agent_app(settings_factory, registry) as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as http,
    ):
        first = _envelope(seconds=0.01, idempotency_key="K", source_agent="orchestrator")
        answer = await http.post("/agent-request", json=first, headers={"X-API-Key": API_KEY})
        assert answer.status_code == 200, answer.text
        agent_id, token = await registry.register("other-agent")
        other = _envelope(seconds=0.02, idempotency_key="K", source_agent="other-agent")
        refused = await http.post(
            "/agent-request", json=other, headers={"X-Agent-Id": agent_id, "X-Agent-Token": token}
        )
        assert refused.status_code == 409, refused.text
        assert (refused.json()["error"]["code"], refused.json()["error"]["field"]) == ("conflict", "idempotency_key")
        assert "waited_s" not in refused.text
        retry = {**first, "request_id": "retry-1"}
        again = await http.post("/agent-request", json=retry, headers={"X-API-Key": API_KEY})
        assert (again.status_code, again.json()["payload"]) == (200, answer.json()["payload"])
