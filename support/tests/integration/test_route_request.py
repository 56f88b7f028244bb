"""ROUTE_REQUEST picks an instance from a live registry by capability."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agents.orchestrator_agent import OrchestratorAgent
from shared.lib.errors import AgentOffline
from shared.lib.registry_client import RegistryClient
from shared.lib.settings import Settings
from support.tests.registry_support import API_KEY, SECRET, serve_registry


async def test_route_request_picks_the_least_loaded_live_instance(settings_factory: Callable[..., Settings]) -> None:
    """Among live instances with the capability, the least loaded one is chosen; others are skipped."""
    async with serve_registry(settings_factory) as registry:
        busy_id, busy_token = await registry.register("cicd", skills=["RUN_PIPELINE"], agent_id="cicd-busy")
        idle_id, idle_token = await registry.register("cicd", skills=["RUN_PIPELINE"], agent_id="cicd-idle")
        down_id, down_token = await registry.register("cicd", skills=["RUN_PIPELINE"], agent_id="cicd-down")
        await registry.register("documentation", skills=["GENERATE_DOCS"], agent_id="docs-1")
        for agent_id, token in ((busy_id, busy_token), (idle_id, idle_token), (down_id, down_token)):
            assert (await registry.set_status(agent_id, token, "active")).status_code == 200
        assert (await registry.heartbeat(busy_id, busy_token, in_flight=5)).status_code == 200
        assert (await registry.heartbeat(idle_id, idle_token, in_flight=0)).status_code == 200
        assert (await registry.set_status(down_id, down_token, "offline")).status_code == 200
        agent = OrchestratorAgent(settings_factory())
        async with RegistryClient(registry.url, registration_secret=SECRET, api_key=API_KEY, timeout_s=5) as client:
            agent.services.registry = client
            chosen = await agent.run("ROUTE_REQUEST", {"capability": "RUN_PIPELINE"})
            assert chosen["agent_id"] == "cicd-idle"
            assert chosen["candidates"] == 2
            other = await agent.run("ROUTE_REQUEST", {"capability": "RUN_PIPELINE", "exclude": ["cicd-idle"]})
            assert other["agent_id"] == "cicd-busy"
            with pytest.raises(AgentOffline) as all_excluded:  # it said to start an agent, as if there were none
                await agent.run("ROUTE_REQUEST", {"capability": "RUN_PIPELINE", "exclude": ["cicd-idle", "cicd-busy"]})
            assert all_excluded.value.field == "exclude"
            assert "every live instance" in all_excluded.value.message
            with pytest.raises(AgentOffline) as missing:
                await agent.run("ROUTE_REQUEST", {"capability": "DEPLOY_SERVICE"})
            assert missing.value.field == "capability"
