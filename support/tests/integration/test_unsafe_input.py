"""Input PostgreSQL cannot take, off the bus and at the edges of the library, against real
Redis and PostgreSQL: text with NUL or unpaired surrogates gets an error response naming the
field (never a crash or a redelivery loop), integers past bigint an error naming the input."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn

from agents.code_review import CodeReviewAgent
from agents.orchestrator_agent import OrchestratorAgent
from shared.lib.agent_events import AgentRequestEvent, signing_key_for
from shared.lib.embedded import free_port
from shared.lib.errors import InvalidInput, OrchestratorError, ServiceUnavailable
from shared.lib.registry_client import RegistryClient
from shared.lib.settings import Settings
from support.tests.integration.conftest import BusFactory, run_cli, serve_on
from support.tests.registry_support import API_KEY, SECRET, serve_registry


def _req(target: str, request_type: str, payload: dict[str, Any], *, timeout_s: float = 10) -> AgentRequestEvent:
    return AgentRequestEvent.create(
        source_agent="tester", target_agent=target, request_type=request_type, payload=payload, timeout_s=timeout_s
    )


async def test_unsafe_text_in_a_payload_is_an_error_response_naming_the_field(
    make_bus: BusFactory, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """EXPLAIN_CODE with NUL in its path, off the bus and over execute(), is answered invalid_input
    naming payload.path (it was an internal error from open()); nothing is dead-lettered."""
    server, client = await make_bus(), await make_bus()
    agent = CodeReviewAgent(settings_factory())
    task = await serve_on(server, "code-review", agent.handle)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    payload = {"repo_path": str(tmp_path), "path": "a\x00b.py"}
    try:
        response = await client.request_agent(_req("code-review", "EXPLAIN_CODE", payload), timeout_s=10)
        signed = _req("code-review", "EXPLAIN_CODE", payload).signed(signing_key_for(server.settings, "code-review"))
        http = await server.execute(signed, agent.handle)
    finally:
        await server.stop_serving(grace_s=1)
        await task
    for answer in (response, http):
        assert answer.status == "error"
        assert answer.error is not None
        assert (answer.error["code"], answer.error["field"]) == ("invalid_input", "payload.path")
        assert "NUL" in answer.error["message"]
    assert await client.dead_letters("code-review", limit=10) == []


async def test_route_request_with_unsafe_text_answers_at_once(
    make_bus: BusFactory, settings_factory: Callable[..., Settings]
) -> None:
    """ROUTE_REQUEST {"capability": "A\\u0000"} is refused in well under its deadline, naming the field
    (it hung 31 s while the registry client retried the registry's 500)."""
    async with serve_registry(settings_factory) as registry:
        server, client = await make_bus(), await make_bus()
        agent = OrchestratorAgent(settings_factory())
        async with RegistryClient(registry.url, registration_secret=SECRET, api_key=API_KEY, timeout_s=5) as rc:
            agent.services.registry = rc
            task = await serve_on(server, "orchestrator", agent.handle)
            started = time.monotonic()
            try:
                request = _req("orchestrator", "ROUTE_REQUEST", {"capability": "A\x00"})
                response = await client.request_agent(request, timeout_s=10)
            finally:
                await server.stop_serving(grace_s=1)
                await task
    assert time.monotonic() - started < 3
    assert response.error is not None
    assert (response.error["code"], response.error["field"]) == ("invalid_input", "payload.capability")


@contextlib.asynccontextmanager
async def _registry_answering(status: int, body: dict[str, Any], calls: list[float]) -> AsyncIterator[str]:
    """The URL of a real HTTP server answering every call with ``status`` and ``body``: a
    misbehaving registry, which a real one cannot be made into on demand."""

    async def app(scope: dict[str, Any], _receive: Any, send: Any) -> None:
        calls.append(time.monotonic())
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": orjson.dumps({"error": body})})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize(
    ("status", "body", "retried"),
    [
        (500, {"code": "internal", "message": "internal error", "retryable": True}, False),
        (503, {"code": "unavailable", "message": "down", "retryable": False}, False),
        (503, {"code": "unavailable", "message": "down", "retryable": True}, True),
    ],
)
async def test_registry_client_retries_only_what_may_succeed_and_within_its_budget(
    status: int, body: dict[str, Any], retried: bool
) -> None:
    """A 500 or an answer marked not retryable is raised at once; a retryable one is retried only
    within the budget the caller gives (ROUTE_REQUEST gives its deadline)."""
    calls: list[float] = []
    async with _registry_answering(status, body, calls) as url:
        client = RegistryClient(url, registration_secret=SECRET, retry_for_s=30)
        started = time.monotonic()
        try:
            with pytest.raises(OrchestratorError) as caught:
                await client.discover(capability="X", retry_for_s=1.0)
        finally:
            await client.aclose()
    assert time.monotonic() - started < 2.5
    assert (len(calls) > 1) is retried
    assert isinstance(caught.value, ServiceUnavailable) is (status == 503)


async def test_event_ids_past_bigint_are_refused_naming_the_input(
    make_bus: BusFactory, service_env: dict[str, str]
) -> None:
    """events_since past int64 or with NUL in a filter is InvalidInput (it was asyncpg's DataError);
    `events replay --since` past int64, or with an empty --aggregate or --type part, exits 2
    with one line."""
    bus = await make_bus()
    assert await bus.events_since(2**63 - 1) == []
    with pytest.raises(InvalidInput) as caught:
        await bus.events_since(2**63)
    assert caught.value.field == "after_id"
    with pytest.raises(InvalidInput) as caught:
        await bus.events_since(0, aggregate_id="a\x00")
    assert caught.value.field == "aggregate_id"
    refused = [
        *((("--since", since), "--since") for since in ("99999999999999999999999", "0001-01-01T00:00:00+14:00")),
        # an empty filter is refused, not read as "every event"
        *((("--aggregate", aggregate), "--aggregate") for aggregate in (":", "", "workflow:", ":abc")),
        (("--type", ""), "--type"),
    ]
    for args, named in refused:
        code, out = await run_cli(service_env, "events", "replay", *args)
        assert code == 2, (args, out)
        assert named in out, (args, out)
        assert "Traceback" not in out
        assert len(out.strip().splitlines()) == 1, out
