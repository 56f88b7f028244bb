"""HTTP routes every agent serves: ``POST /agent-request`` and its A2A card.

``POST /agent-request`` takes an ``AgentRequestEvent`` and runs it through
``EventBus.execute``, the same checks and handler as a request off the bus, and
answers with the ``AgentResponseEvent``. The HTTP status follows the response:
200 on success, the error's own 4xx/5xx otherwise (``rejected`` is 422), with
the envelope as the body so ``error.field`` names the problem.

Authentication, outside development mode, is one of:

- a valid HMAC ``signature`` on the envelope (checked by the bus);
- an ``X-API-Key`` (or Bearer) of the deployment;
- an agent's ``X-Agent-Id`` and ``X-Agent-Token``, as issued by the registry.

An unsigned envelope from a caller authenticated by key or token is signed
here, so the bus's own verification holds on every path.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from agents.sdk.card import agent_card
from agents.sdk.runtime import AgentRuntime
from shared.lib.agent_events import parse_envelope, request_from_dict, sign, signing_key_for
from shared.lib.errors import InvalidInput, OrchestratorError, ServiceUnavailable, Unauthorized

__all__ = ["agent_routes", "status_for_error_code"]


def _error_classes(cls: type[OrchestratorError]) -> list[type[OrchestratorError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _error_classes(sub))]


def status_for_error_code(code: str | None) -> int:
    """The HTTP status of an error response's ``code`` (500 for a code no error class declares)."""
    by_code = {c.code: c.status_code for c in _error_classes(OrchestratorError)}
    return by_code.get(code or "", 500)


def _runtime(request: Request) -> AgentRuntime:
    runtime: AgentRuntime | None = getattr(request.app.state, "runtime", None)
    if runtime is None or runtime.draining:
        raise ServiceUnavailable("this agent instance is shutting down; send the request to another instance")
    return runtime


def _api_key_ok(runtime: AgentRuntime, request: Request) -> bool:
    presented = request.headers.get("x-api-key")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = presented or (token.strip() if scheme.lower() == "bearer" else None)
    if not presented:
        return False
    return any(hmac.compare_digest(presented.encode(), k.encode()) for k in runtime.settings.api_keys)


async def _agent_token_ok(runtime: AgentRuntime, agent_id: str | None, token: str | None) -> bool:
    if not agent_id or not token:
        return False
    from agent_registry.store import RegistryStore  # the registry's own token check, on the shared database

    try:
        await RegistryStore(runtime.ctx.pool).check_token(agent_id, token)
    except OrchestratorError as e:
        raise Unauthorized(f"agent token refused: {e.message}", field="X-Agent-Token") from e
    return True


async def _authenticate(runtime: AgentRuntime, request: Request, data: dict[str, Any]) -> dict[str, Any]:
    """The envelope to execute: as sent when signed (the bus verifies it), else signed here for a known caller."""
    if runtime.settings.dev_mode or data.get("signature"):
        return data
    agent_id, token = request.headers.get("x-agent-id"), request.headers.get("x-agent-token")
    if _api_key_ok(runtime, request) or await _agent_token_ok(runtime, agent_id, token):
        key = signing_key_for(runtime.settings, runtime.agent.name)
        return {**data, "signature": sign(data, key)}
    raise Unauthorized(
        "unauthenticated request: sign the envelope, or send X-API-Key, or X-Agent-Id with X-Agent-Token",
        field="signature",
    )


def _json(body: dict[str, Any], *, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


def agent_routes() -> APIRouter:
    """The agent-specific routes; the app keeps the :class:`AgentRuntime` at ``app.state.runtime``."""
    router = APIRouter(tags=["agent"])

    @router.post("/agent-request")
    async def agent_request(request: Request) -> Response:
        runtime = _runtime(request)
        data = parse_envelope(await request.body(), max_bytes=runtime.settings.max_payload_bytes)
        data = await _authenticate(runtime, request, data)
        envelope = request_from_dict(data, key=None)  # shape only; the bus verifies the signature
        if envelope.target_agent != runtime.agent.name:
            raise InvalidInput(
                f"target_agent is {envelope.target_agent!r} but this is {runtime.agent.name!r}", field="target_agent"
            )
        response = await runtime.bus.execute(envelope, runtime.agent.handle)
        status = 200 if response.ok else status_for_error_code((response.error or {}).get("code"))
        return _json(response.to_dict(), status_code=status)

    @router.get("/.well-known/agent-card.json")
    async def card(request: Request) -> Response:
        runtime: AgentRuntime = request.app.state.runtime
        return _json(agent_card(runtime.agent, url=runtime.endpoint))

    return router
