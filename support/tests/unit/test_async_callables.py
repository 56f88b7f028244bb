"""No thread hop on a hot path: the frameworks run a plain ``def`` in a thread pool.

FastAPI runs a plain ``def`` dependency (or endpoint) in its thread pool on every
request; LangGraph, in an async run, hands a plain ``def`` node or router to an
executor on every call. Every service's dependencies and every built-in
workflow's nodes and routers must therefore be ``async def``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from agent_orchestrator.app import create_app as create_orchestrator_app
from agent_orchestrator.workflows import builtin_workflow_types
from agent_registry import create_app as create_registry_app
from agents.catalogue import agent_class
from agents.sdk.app import create_agent_app
from shared.lib.settings import Settings


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, through included routers (FastAPI keeps those as wrappers of the router)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (router := getattr(route, "original_router", None)) is not None:
            yield from _api_routes(router.routes)


def _calls(dependant: Any) -> Iterator[Any]:
    if dependant.call is not None:
        yield dependant.call
    for sub in dependant.dependencies:
        yield from _calls(sub)


def _apps(settings: Settings) -> dict[str, FastAPI]:
    agent = agent_class("documentation")(settings)
    return {
        "orchestrator": create_orchestrator_app(settings, port=8001),
        "agent-registry": create_registry_app(settings),
        "documentation": create_agent_app(agent, instance_id="documentation-1", endpoint="http://127.0.0.1:1"),
    }


@pytest.mark.parametrize("service", ["orchestrator", "agent-registry", "documentation"])
def test_every_endpoint_and_dependency_is_async(service: str, tmp_path: Path) -> None:
    app = _apps(Settings(dev_mode=True, data_dir=tmp_path))[service]
    routes = list(_api_routes(app.routes))
    assert routes, f"{service} has no API routes"
    sync = {
        f"{route.path}: {getattr(call, '__qualname__', call)}"
        for route in routes
        for call in _calls(route.dependant)
        if not inspect.iscoroutinefunction(call) and not inspect.isclass(call)
    }
    assert not sync, f"plain def dependencies run in FastAPI's thread pool: {sorted(sync)}"


@pytest.mark.parametrize("name", sorted(builtin_workflow_types()))
def test_every_node_and_router_of_a_builtin_workflow_is_async(name: str) -> None:
    graph = builtin_workflow_types()[name].build()
    runnables = {f"node {n}": spec.runnable for n, spec in graph.nodes.items()}
    runnables |= {f"router {src}.{b}": br.path for src, bs in graph.branches.items() for b, br in bs.items()}
    sync = [label for label, r in runnables.items() if getattr(r, "func", None) is not None]
    assert not sync, f"{name}: plain def runs in an executor per call: {sync}"
