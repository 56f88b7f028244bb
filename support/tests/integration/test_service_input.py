"""What the services refuse at their HTTP edge, served for real over PostgreSQL and Redis: JSON
nested past the limit or holding an integer past 64 bits (the registry, an agent's
/agent-request, the orchestrator), malformed HEALTH_CHECK targets, a self_healing input the
agent would refuse, and a caller's long header echoed whole."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI

from agent_orchestrator.app import create_app as create_orchestrator_app
from agents.infrastructure import InfrastructureAgent
from agents.sdk.app import create_agent_app
from shared.lib.agent_events import AgentRequestEvent
from shared.lib.safe_input import MAX_JSON_DEPTH
from shared.lib.settings import Settings
from support.tests.procs import free_port
from support.tests.registry_support import API_KEY, SECRET, registration, serve_in_loop, serve_registry

JSON = {"Content-Type": "application/json"}


def _nested(depth: int) -> list[Any]:
    """A list ``depth`` levels deep: ``[[...]]``."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _refused(r: httpx.Response, status: int, field: str) -> str:
    """The message of an error answered ``status`` naming ``field``."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field, error
    return str(error["message"])


async def test_the_registry_refuses_deep_json_and_huge_integers_before_storing_anything(
    settings_factory: Callable[..., Settings], database_url: str
) -> None:
    """A registration whose metadata or capability schema nests 300 deep, or whose metadata holds
    10**30, is a 422 naming the field (it was asyncpg's DataError, a 500) and writes no row; one
    at the depth limit registers, on the same connection."""
    deep_schema = [{"id": "x", "name": "x", "input_schema": {"d": _nested(300)}}]
    huge = json.dumps(registration("huge-int", metadata={})).replace(
        '"metadata": {}', '"metadata": {"n": 1' + "0" * 30 + "}"
    )
    secret = {"X-Registration-Secret": SECRET}
    async with serve_registry(settings_factory) as registry:
        url = f"{registry.url}/agents/register"
        deep = await registry.http.post(
            url, json=registration("deep-meta", metadata={"d": _nested(300)}), headers=secret
        )
        assert "nested more than 128 levels deep" in _refused(deep, 422, "metadata.d")
        schema = await registry.http.post(
            url, json=registration("deep-schema", capabilities=deep_schema), headers=secret
        )
        _refused(schema, 422, "capabilities.0.input_schema.d")
        integer = await registry.http.post(url, content=huge.encode(), headers={**secret, **JSON})
        assert "64-bit range" in _refused(integer, 422, "metadata.n")
        # the body's root, metadata and d are 3 of the levels: d nests the rest
        at_limit = registration("at-limit", metadata={"d": _nested(MAX_JSON_DEPTH - 2), "n": 2**64 - 1})
        assert (await registry.http.post(url, json=at_limit, headers=secret)).status_code == 201
    conn = await asyncpg.connect(database_url)
    try:
        names = [r["name"] for r in await conn.fetch("SELECT name FROM agent_instances")]
    finally:
        await conn.close()
    assert names == ["at-limit"]


@contextlib.asynccontextmanager
async def _serving(make_app: Callable[[str], FastAPI]) -> AsyncIterator[str]:
    """The URL of ``make_app(url)`` served by uvicorn, its lifespan run, until the block exits."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with serve_in_loop(make_app(url), port):
        yield url


@contextlib.asynccontextmanager
async def _infrastructure_agent(settings_factory: Callable[..., Settings]) -> AsyncIterator[httpx.AsyncClient]:
    """A client (one keep-alive connection) of an infrastructure agent registered with a registry."""
    async with serve_registry(settings_factory) as registry:
        agent = InfrastructureAgent(settings_factory(registry_url=registry.url))

        def app(url: str) -> FastAPI:
            return create_agent_app(agent, instance_id="infrastructure-1", endpoint=url)

        async with (
            _serving(app) as url,
            httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_connections=1)) as http,
        ):
            yield http


def _envelope(request_type: str, payload: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """An unsigned envelope as a dict, ``payload`` and ``fields`` put in as given (the client's
    own model_dump cannot write what is nested 300 deep either)."""
    request = AgentRequestEvent.create(
        source_agent="tester", target_agent="infrastructure", request_type=request_type, payload={}
    )
    return {**request.to_dict(), "payload": payload, **fields}


async def test_agent_request_refuses_deep_json_and_huge_integers_before_the_route(
    settings_factory: Callable[..., Settings],
) -> None:
    """/agent-request with the API key and a payload or metadata nested 300 deep is a 422 naming
    it (signing it was a 500: pydantic's "maximum serialization depth exceeded"), so is a payload
    integer past 64 bits; the connection then serves the next request."""
    key = {"X-API-Key": API_KEY}
    health = {"targets": [], "agents": ["nobody"]}
    async with _infrastructure_agent(settings_factory) as http:
        deep = await http.post(
            "/agent-request", json=_envelope("HEALTH_CHECK", {**health, "x": _nested(300)}), headers=key
        )
        assert "nested more than" in _refused(deep, 422, "payload.x")
        meta = await http.post(
            "/agent-request", json=_envelope("HEALTH_CHECK", health, metadata={"d": _nested(300)}), headers=key
        )
        _refused(meta, 422, "metadata.d")
        raw = json.dumps(_envelope("HEALTH_CHECK", health)).replace(
            '"payload": {', '"payload": {"n": 1' + "0" * 30 + ", "
        )
        integer = await http.post("/agent-request", content=raw.encode(), headers={**key, **JSON})
        assert "64-bit range" in _refused(integer, 422, "payload.n")
        ok = await http.post("/agent-request", json=_envelope("HEALTH_CHECK", health), headers=key)
        assert ok.status_code == 200, ok.text
        assert ok.json()["payload"]["probes"][0]["target"] == "nobody"


async def test_health_check_refuses_malformed_targets_naming_them(settings_factory: Callable[..., Settings]) -> None:
    """HEALTH_CHECK over /agent-request with a host of a 64-letter label, an empty label, a bidi
    control, or a URL httpx cannot parse is a 422 naming targets.N.host or .url (each was a 500
    from the socket layer); a well-formed target nobody listens on is an unhealthy probe."""
    key = {"X-API-Key": API_KEY}
    closed = free_port()
    async with _infrastructure_agent(settings_factory) as http:
        for target, field in (
            ({"kind": "tcp", "host": "a" * 64, "port": 80}, "targets.1.host"),
            ({"kind": "tcp", "host": "a..b", "port": 80}, "targets.1.host"),
            ({"kind": "tcp", "host": "\u202e", "port": 80}, "targets.1.host"),
            ({"kind": "http", "url": "http://[::1"}, "targets.1.url"),
            ({"kind": "http", "url": f"http://{'a' * 64}.example/"}, "targets.1.url"),
            ({"kind": "http", "url": "http://localhost:99999/"}, "targets.1.url"),
        ):
            good = {"kind": "tcp", "host": "127.0.0.1", "port": closed}
            r = await http.post(
                "/agent-request", json=_envelope("HEALTH_CHECK", {"targets": [good, target]}), headers=key
            )
            _refused(r, 422, field)
        targets = [
            {"kind": "tcp", "host": "localhost", "port": closed},
            {"kind": "http", "url": f"http://[::1]:{closed}/health"},
        ]
        r = await http.post("/agent-request", json=_envelope("HEALTH_CHECK", {"targets": targets}), headers=key)
        assert r.status_code == 200, r.text
        report = r.json()["payload"]
        assert [p["healthy"] for p in report["probes"]] == [False, False]
        assert report["healthy"] is False


async def test_self_healing_input_is_checked_at_launch_as_the_agent_checks_it(
    settings_factory: Callable[..., Settings], database_url: str
) -> None:
    """POST /workflows self_healing with an environment or an agent that is no name, or a target
    the agent's Target refuses, is a 422 naming it and creates no workflow (it was accepted, and
    failed at detect); so is an input nested past the limit or holding 10**30 (the HTTP guard)."""
    async with serve_registry(settings_factory) as registry:
        settings = settings_factory(registry_url=registry.url)

        def app(url: str) -> FastAPI:
            return create_orchestrator_app(settings, port=int(url.rsplit(":", 1)[1]))

        async with _serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            for data, field in (
                ({"environment": "../../../../etc"}, "input.environment"),
                ({"agents": ["cicd", "../../x"]}, "input.agents.1"),
                ({"targets": [{"kind": "tcp", "host": "a" * 64, "port": 80}]}, "input.targets.0.host"),
                ({"targets": [{"kind": "http", "url": "http://[::1"}]}, "input.targets.0.url"),
                ({"targets": [{"kind": "tcp", "host": "h", "port": 80, "x": _nested(300)}]}, "input.targets.0.x"),
            ):
                r = await http.post(
                    "/workflows", json={"workflow_type": "self_healing", "input": data}, headers={"X-API-Key": API_KEY}
                )
                _refused(r, 422, field)
            raw = b'{"workflow_type": "self_healing", "input": {"max_iterations": 1' + b"0" * 30 + b"}}"
            r = await http.post("/workflows", content=raw, headers={"X-API-Key": API_KEY, **JSON})
            _refused(r, 422, "input.max_iterations")
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM workflows") == 0
    finally:
        await conn.close()


async def test_a_long_agent_id_header_is_not_echoed_whole(settings_factory: Callable[..., Settings]) -> None:
    """A 401 for an agent token of an X-Agent-Id of 8,000 characters repeats 80 of them and says
    how long it was (it echoed all 8,000)."""
    async with _infrastructure_agent(settings_factory) as http:
        headers = {"X-Agent-Id": "a" * 8000, "X-Agent-Token": "t"}
        r = await http.post("/agent-request", json=_envelope("HEALTH_CHECK", {}), headers=headers)
    message = _refused(r, 401, "X-Agent-Token")
    assert "a" * 80 + "... (8000 characters)" in message
    assert len(r.content) < 500, r.text


async def test_a_long_query_parameter_name_or_content_type_is_not_echoed_whole(
    settings_factory: Callable[..., Settings],
) -> None:
    """The registry's 422 for an unknown query parameter of 8,000 characters, and its 415 for a
    content type as long, repeat 80 of them and say how long it was."""
    long = "x" * 8000
    async with serve_registry(settings_factory) as registry:
        listed = await registry.http.get(f"{registry.url}/agents?{long}=1", headers={"X-API-Key": API_KEY})
        sent = await registry.http.post(
            f"{registry.url}/agents/register",
            content=b"{}",
            headers={"X-Registration-Secret": SECRET, "Content-Type": f"text/{long}"},
        )
    assert "x" * 80 + "... (8000 characters) is not a query parameter" in _refused(
        listed, 422, "x" * 80 + "... (8000 characters)"
    )
    assert "... (8005 characters)" in _refused(sent, 415, "content-type")
    assert max(len(listed.content), len(sent.content)) < 500
