"""The registry and its clients as real processes: kill -9 a client, kill -9 and restart the registry."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from shared.lib.connections import create_database, drop_database, with_database
from shared.lib.migrations import apply_migrations
from shared.lib.registry_client import RegistryClient
from shared.lib.registry_models import AgentStatus, Registration, Skill
from support.tests.procs import ServiceProcess
from support.tests.registry_support import API_KEY, SECRET

pytestmark = pytest.mark.slow

Spawn = Callable[..., ServiceProcess]


@pytest.fixture
def registry_url(ports: dict[str, int]) -> str:
    return f"http://127.0.0.1:{ports['agent-registry']}"


@pytest.fixture
async def second_database(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    """Another fresh, migrated database: a registry restarted on it has forgotten every instance."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = await create_database(server_urls[0], name)
    await apply_migrations(url)
    yield url
    await drop_database(with_database(server_urls[0], "postgres"), name)


async def _until(check: Callable[[], Awaitable[Any]], *, timeout_s: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def _status(http: httpx.AsyncClient, url: str, agent_id: str) -> str | None:
    r = await http.get(f"{url}/agents/{agent_id}", headers={"X-API-Key": API_KEY})
    return None if r.status_code == 404 else str(r.json()["status"])


async def test_killed_client_goes_offline_after_ttl_then_is_removed(
    spawn: Spawn, registry_url: str, service_env: dict[str, str]
) -> None:
    """A client killed with SIGKILL turns offline after the heartbeat TTL and is removed after the grace."""
    ttl_s, grace_s = 1.0, 3.0
    env = {"AO_AGENT_STALE_AFTER_S": str(ttl_s), "AO_AGENT_REMOVE_AFTER_S": str(grace_s)}
    spawn("registry", url=registry_url, env=env, name="registry")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "support.tests.chaos.registry_client_proc", registry_url, "chaos-target",
        env=service_env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        agent_id = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        async with httpx.AsyncClient(timeout=5) as http:
            await asyncio.sleep(ttl_s * 2)  # alive past the TTL: heartbeats keep it active
            assert await _status(http, registry_url, agent_id) == "active"
            proc.kill()
            await proc.wait()
            killed = time.monotonic()

            async def offline() -> bool:
                return await _status(http, registry_url, agent_id) == "offline"

            await _until(offline, timeout_s=ttl_s * 4, what="the killed client to turn offline")
            assert time.monotonic() - killed >= ttl_s * 0.5

            async def removed() -> bool:
                return await _status(http, registry_url, agent_id) is None

            await _until(removed, timeout_s=grace_s * 3, what="the offline client to be removed")
            assert time.monotonic() - killed >= grace_s * 0.8
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _registration(i: int) -> Registration:
    return Registration(
        name="restart-target",
        version="1.0.0",
        endpoint=f"http://127.0.0.1:{9000 + i}",
        capabilities=[Skill(id="survive", name="Survive restarts")],
    )


async def _stale_count(http: httpx.AsyncClient, url: str) -> float:
    text = (await http.get(f"{url}/metrics")).text
    return sum(float(v) for v in re.findall(r"^registry_stale_agents_total\{[^}]*\} (\S+)$", text, re.M))


async def test_clients_survive_registry_restarts(spawn: Spawn, registry_url: str, second_database: str) -> None:
    """After a kill -9 and restart the heartbeats resume; on an emptied registry clients register again."""
    env = {"AO_AGENT_STALE_AFTER_S": "2", "AO_AGENT_REMOVE_AFTER_S": "30"}
    registry = spawn("registry", url=registry_url, env=env, name="registry")
    clients = [RegistryClient(registry_url, registration_secret=SECRET, api_key=API_KEY) for _ in range(3)]
    try:
        ids = [(await c.register(_registration(i))).agent.id for i, c in enumerate(clients)]
        for c in clients:
            await c.set_status(AgentStatus.ACTIVE)
        await clients[0].set_status(AgentStatus.BUSY)
        for c in clients:
            c.start_heartbeat(interval_s=0.2)
        async with httpx.AsyncClient(timeout=5) as http:
            # 1. Same database: the instances are still known; heartbeats simply resume.
            registry.kill9()
            await asyncio.sleep(1.0)
            registry = spawn("registry", url=registry_url, env=env, name="registry-same-db")
            await asyncio.sleep(3.0)  # past the TTL: a lost heartbeat would show as offline now
            assert [await _status(http, registry_url, i) for i in ids] == ["busy", "active", "active"]
            assert [c.registrations for c in clients] == [1, 1, 1]
            assert await _stale_count(http, registry_url) == 0

            # 2. Empty database: the registry answers 404; each client registers again, same id and status.
            registry.kill9()
            spawn("registry", url=registry_url, env={**env, "DATABASE_URL": second_database}, name="registry-new-db")

            async def all_back() -> bool:
                return all(c.registrations == 2 for c in clients)

            await _until(all_back, timeout_s=10, what="every client to register again")
            assert [await _status(http, registry_url, i) for i in ids] == ["busy", "active", "active"]
    finally:
        for c in clients:
            await c.aclose()


async def test_sigterm_with_open_watch_streams_exits_promptly(spawn: Spawn, registry_url: str) -> None:
    """A registry asked to stop ends its open /agents/watch streams instead of waiting on them."""
    registry = spawn("registry", url=registry_url, name="registry")
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("GET", f"{registry_url}/agents/watch", headers={"X-API-Key": API_KEY}) as response,
    ):
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith(": watching")
        started = time.monotonic()
        code = await asyncio.to_thread(registry.stop, timeout_s=20)
        assert time.monotonic() - started < 10
        tail = [line async for line in lines]  # the stream ended rather than being cut
    output = registry.output()
    assert code in (0, -signal.SIGTERM), output[-2000:]  # uvicorn re-raises the signal it handled
    assert "without completing response" not in output
    assert not any(tail)
