"""HTTP routes every agent serves: ``POST /agent-request`` and its A2A card.

``POST /agent-request`` takes an ``AgentRequestEvent`` and runs it through
``EventBus.execute``, the same checks and handler as a request off the bus, and
answers with the ``AgentResponseEvent``. The envelope is JSON sent as such: a body with
another content type, or none, is a 415 naming ``content-type``. The HTTP status follows the response:
200 on success, the error's own 4xx/5xx otherwise (``rejected`` is 422), with
the envelope as the body so ``error.field`` names the problem.

Authentication, outside development mode, is one of:

- a valid HMAC ``signature`` on the envelope (checked by the bus);
- an ``X-API-Key`` (or Bearer) of the deployment;
- an agent's ``X-Agent-Id`` and ``X-Agent-Token``, as issued by the registry.

A token proves which agent calls, so it binds ``source_agent``: an unsigned
envelope sent with the token of an instance of ``caller`` must say
``"source_agent": "caller"``, else it is a 403 naming ``source_agent`` (a token
of any agent passed itself off as the orchestrator, and was served and counted
as such). Refused rather than rewritten: a caller that names another agent is
mistaken or lying, and either way should hear it. An API key is the
deployment's own credential and may name any source, as may a signer of the
envelope (the HMAC key is the deployment's too).

An unsigned envelope from a caller authenticated by key or token is first
validated into the model (defaults filled: ``reply_to``, ``metadata``,
``created_at``...; numbers normalised: ``1764547200`` becomes ``1764547200.0``)
and then signed here in that canonical form, which is what the bus verifies, so
its own verification holds on every path. Signing the caller's raw dict instead
made every envelope not already in the normalised form fail as ``bad_signature``
(and be dead-lettered as forged). A malformed one is a 422 naming the field, and
a ``created_at`` outside the replay window is a 422 naming it too: no signature
of the caller's is being replayed. A signed envelope is never re-signed: the bus
verifies the caller's signature as sent.

The instance runs at most ``AO_AGENT_CONCURRENCY`` requests at once, off the bus and
over HTTP together; one that comes over HTTP while all are running is a 503 ``busy``
with ``Retry-After``, at once: nothing runs, nothing is stored, and the same request
(idempotency key) may be sent again. It is not held until a slot frees: callers
waiting on a full instance pile up without bound, each holding its body.

``/ready`` (the service's check of PostgreSQL and Redis) answers 503 with a ``bus`` check
naming the error once the instance no longer serves its requests on the bus
(:class:`ServingReadiness`): it is not ready for what it is there to do.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from agents.sdk.card import agent_card
from agents.sdk.runtime import AgentRuntime
from shared.lib.agent_events import (
    AgentRequestEvent,
    parse_envelope,
    request_from_dict,
    signing_key_for,
    window_skew_s,
)
from shared.lib.errors import Busy, Forbidden, InvalidInput, OrchestratorError, ServiceUnavailable, Unauthorized
from shared.lib.http_service import non_json_body

__all__ = ["ServingReadiness", "agent_routes", "status_for_error_code"]


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


def _presented_key(request: Request) -> tuple[str | None, str]:
    """The API key the caller sent, and the header it came in (``X-API-Key`` or ``Authorization``)."""
    if presented := request.headers.get("x-api-key"):
        return presented, "X-API-Key"
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None if scheme.lower() == "bearer" else None), "Authorization"


def _api_key_ok(runtime: AgentRuntime, presented: str | None) -> bool:
    if not presented:
        return False
    return any(hmac.compare_digest(presented.encode(), k.encode()) for k in runtime.settings.api_keys)


def _unauthenticated(key_header: str | None) -> Unauthorized:
    """The 401 of a caller that proved nothing: naming the API key it sent, if it sent a wrong one."""
    if key_header is not None:
        return Unauthorized(
            f"{key_header} is not an API key of this deployment; send one of AO_API_KEYS, or sign the envelope",
            field=key_header,
        )
    return Unauthorized(
        "unauthenticated request: sign the envelope, or send X-API-Key, or X-Agent-Id with X-Agent-Token",
        field="signature",
    )


async def _token_agent(runtime: AgentRuntime, request: Request) -> str | None:
    """The agent name of the instance whose registry-issued token came with ``request`` (None
    when none came); a wrong token, or one of an instance no longer registered, is a 401."""
    agent_id, token = request.headers.get("x-agent-id"), request.headers.get("x-agent-token")
    if not agent_id or not token:
        return None
    from agent_registry.store import RegistryStore  # the registry's own token check, on the shared database

    store = RegistryStore(runtime.ctx.pool)
    try:
        return await store.check_token(agent_id, token)
    except OrchestratorError as e:
        raise Unauthorized(f"agent token refused: {e.message}", field="X-Agent-Token") from e


def _check_source(envelope: AgentRequestEvent, caller: str, agent_id: str) -> None:
    """A token's agent may only speak for itself: ``source_agent`` must be its name."""
    if envelope.source_agent != caller:
        raise Forbidden(
            f"source_agent is {envelope.source_agent!r}, but the X-Agent-Token of {agent_id} is an instance of "
            f"{caller!r}; send source_agent {caller!r}",
            field="source_agent",
        )


def _check_fresh(runtime: AgentRuntime, envelope: AgentRequestEvent) -> None:
    """Refuse an unsigned envelope's ``created_at`` outside the replay window as the caller's
    input error (422), before it is signed: signed, the bus would take it for a replay."""
    skew_s = window_skew_s(envelope.created_at, runtime.settings.replay_window_s)
    if skew_s is not None:
        raise InvalidInput(
            f"created_at is {skew_s:.0f} s off this agent's clock, outside the "
            f"{runtime.settings.replay_window_s:.0f} s replay window; send the current Unix time or leave it out",
            field="created_at",
        )


async def _authenticate(runtime: AgentRuntime, request: Request, data: dict[str, Any]) -> AgentRequestEvent:
    """The envelope to execute: as sent when signed (the bus verifies it), else validated
    and signed here, in its canonical form, for a caller known by API key or agent token."""
    if runtime.settings.dev_mode or data.get("signature"):
        return request_from_dict(data, key=None)  # shape only; the bus verifies the signature as sent
    key, key_header = _presented_key(request)
    caller = None  # an API key may name any source
    if not _api_key_ok(runtime, key) and (caller := await _token_agent(runtime, request)) is None:
        raise _unauthenticated(key_header if key else None)
    envelope = request_from_dict(data, key=None)  # defaults filled, numbers normalised; 422 naming a bad field
    if caller is not None:
        _check_source(envelope, caller, request.headers.get("x-agent-id", ""))
    _check_fresh(runtime, envelope)
    return envelope.signed(signing_key_for(runtime.settings, envelope.target_agent))


def _json(body: dict[str, Any], *, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json", headers=headers)


def _busy(exc: Busy) -> Response:
    """The 503 of a full instance, with ``Retry-After``."""
    retry_after = {"Retry-After": str(exc.details.get("retry_after_s", 1))}
    return _json({"error": exc.to_dict()}, status_code=exc.status_code, headers=retry_after)


class ServingReadiness:
    """ASGI middleware: ``/ready`` is a 503 naming the bus once the agent's runtime stopped
    serving it (:attr:`AgentRuntime.serving_error`); otherwise the service's own ``/ready``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_ready = scope["type"] == "http" and scope["path"] == "/ready"
        runtime: AgentRuntime | None = getattr(scope["app"].state, "runtime", None) if is_ready else None
        if runtime is None or runtime.serving_error is None:
            await self.app(scope, receive, send)
            return
        error = runtime.serving_error
        body = {"status": "unavailable", "service": runtime.agent.name, "checks": {"bus": f"error: {error}"}}
        await JSONResponse(body, status_code=503)(scope, receive, send)


def agent_routes() -> APIRouter:
    """The agent-specific routes; the app keeps the :class:`AgentRuntime` at ``app.state.runtime``."""
    router = APIRouter(tags=["agent"])

    @router.post("/agent-request")
    async def agent_request(request: Request) -> Response:
        runtime = _runtime(request)
        if (refused := non_json_body(request.headers)) is not None:
            raise refused
        data = parse_envelope(await request.body(), max_bytes=runtime.settings.max_payload_bytes)
        envelope = await _authenticate(runtime, request, data)
        if envelope.target_agent != runtime.agent.name:
            raise InvalidInput(
                f"target_agent is {envelope.target_agent!r} but this is {runtime.agent.name!r}", field="target_agent"
            )
        try:
            response = await runtime.bus.execute(envelope, runtime.agent.handle)
        except Busy as e:
            return _busy(e)
        status = 200 if response.ok else status_for_error_code((response.error or {}).get("code"))
        return _json(response.to_dict(), status_code=status)

    @router.get("/.well-known/agent-card.json")
    async def card(request: Request) -> Response:
        runtime: AgentRuntime = request.app.state.runtime
        return _json(agent_card(runtime.agent, url=runtime.endpoint))

    return router
