"""A registry app served in-process by uvicorn on a real port, for the registry's tests.

In-process keeps the tests fast while still going through real HTTP (server-sent
events need a real server: httpx's ASGI transport buffers whole responses).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from agent_registry import create_app
from shared.lib.settings import Settings
from support.tests.conftest import TEST_SECRETS
from support.tests.procs import free_port

__all__ = ["API_KEY", "SECRET", "RunningRegistry", "registration", "serve_registry"]

API_KEY = TEST_SECRETS["AO_API_KEYS"]
SECRET = TEST_SECRETS["AO_REGISTRATION_SECRET"]


@dataclass
class RunningRegistry:
    url: str
    settings: Settings
    http: httpx.AsyncClient

    async def register(self, name: str, **fields: Any) -> tuple[str, str]:
        """Register an instance; returns (agent_id, token)."""
        r = await self.http.post(
            f"{self.url}/agents/register",
            json=registration(name, **fields),
            headers={"X-Registration-Secret": SECRET},
        )
        assert r.status_code == 201, r.text
        body = r.json()
        return body["agent"]["id"], body["token"]

    async def heartbeat(self, agent_id: str, token: str, *, in_flight: int = 0) -> httpx.Response:
        return await self.http.post(
            f"{self.url}/agents/{agent_id}/heartbeat", json={"in_flight": in_flight}, headers={"X-Agent-Token": token}
        )

    async def set_status(self, agent_id: str, token: str, status: str) -> httpx.Response:
        return await self.http.put(
            f"{self.url}/agents/{agent_id}/status", json={"status": status}, headers={"X-Agent-Token": token}
        )

    async def get(self, agent_id: str) -> httpx.Response:
        return await self.http.get(f"{self.url}/agents/{agent_id}", headers={"X-API-Key": API_KEY})

    async def discover(self, **params: Any) -> list[dict[str, Any]]:
        r = await self.http.get(f"{self.url}/agents", params=params, headers={"X-API-Key": API_KEY})
        assert r.status_code == 200, r.text
        result: list[dict[str, Any]] = r.json()
        return result


def registration(name: str, **fields: Any) -> dict[str, Any]:
    """A valid registration body for an agent ``name`` with one skill per entry of ``skills``."""
    skills = fields.pop("skills", ["work"])
    tags = fields.pop("tags", [])
    body: dict[str, Any] = {
        "name": name,
        "version": "1.0.0",
        "endpoint": "http://127.0.0.1:9999",
        "capabilities": [
            {"id": s, "name": s.replace("_", " "), "description": f"does {s}", "tags": tags} for s in skills
        ],
        "metadata": {"zone": "test"},
    }
    body.update(fields)
    return body


@contextlib.asynccontextmanager
async def serve_in_loop(app: Any, port: int, *, stop_within_s: float = 15) -> AsyncIterator[None]:
    """Serve ``app`` (its lifespan run) with uvicorn on ``port`` in this event loop until the
    block exits; a start-up failure is raised here."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(15):
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        async with asyncio.timeout(stop_within_s):
            await task


@contextlib.asynccontextmanager
async def serve_registry(settings_factory: Callable[..., Settings], **overrides: Any) -> AsyncIterator[RunningRegistry]:
    """Serve a registry app on a free port until the block exits."""
    settings = settings_factory(**overrides)
    port = free_port()
    async with serve_in_loop(create_app(settings), port), httpx.AsyncClient(timeout=10) as http:
        yield RunningRegistry(url=f"http://127.0.0.1:{port}", settings=settings, http=http)
