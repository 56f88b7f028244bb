"""The ``/agents`` resource: registration, heartbeats, status, removal, discovery, watch.

Status semantics:

- a heartbeat refreshes liveness and load and never touches a status the agent
  set; only an instance the reaper marked ``offline`` for missed heartbeats gets
  its earlier status back when it heartbeats again. An instance that declared
  itself ``offline`` stays so until it registers again;
- ``PUT /agents/{id}/status`` follows the transitions of DESIGN and answers an
  illegal one with 409 naming both statuses; an instance marked offline for
  missed heartbeats is judged by the status it had before;
- registering under an existing id replaces that registration and its token:
  it is how an instance the registry forgot comes back under the same id. An id
  therefore belongs to one running process; two sharing one would keep taking
  it from each other.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Body, Depends, Query, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from agent_registry.deps import (
    AgentIdPath,
    AgentToken,
    OperatorOrInstance,
    RegistryDep,
    require_registration_secret,
)
from agent_registry.store import Discovery
from agent_registry.watch import ChangeFeed
from shared.lib.errors import InvalidInput, ServiceUnavailable
from shared.lib.http_service import ApiKeyDep
from shared.lib.metrics import REGISTRY_HEARTBEAT_LAG, REGISTRY_HEARTBEATS
from shared.lib.registry_models import (
    INITIAL_STATUSES,
    AgentChange,
    AgentInstance,
    AgentStatus,
    Heartbeat,
    HeartbeatAck,
    Registered,
    Registration,
    StatusChange,
)
from shared.lib.settings import AGENT_ID_PATTERN

__all__ = ["router"]

router = APIRouter(prefix="/agents", tags=["agents"])

_SSE_PING_S = 15
#: On shutdown, open watch streams get this long to end cleanly before they are cancelled.
_SSE_SHUTDOWN_GRACE_S = 1.0


def _new_agent_id(name: str) -> str:
    return f"{name[:55]}-{secrets.token_hex(4)}"


@router.post("/register", status_code=201, dependencies=[Depends(require_registration_secret)])
async def register(body: Registration, registry: RegistryDep) -> Registered:
    """Register an instance (or re-register it under its old id) and issue its token."""
    if body.status not in INITIAL_STATUSES:
        raise InvalidInput(
            f"an instance registers as initializing, active or busy, not {body.status.value}", field="status"
        )
    token = secrets.token_urlsafe(32)
    agent = await registry.store.register(body, agent_id=body.agent_id or _new_agent_id(body.name), token=token)
    await registry.events.registered(agent.id, name=agent.name, status=agent.status, version=agent.version)
    return Registered(agent=agent, token=token, heartbeat_ttl_s=registry.settings.agent_stale_after_s)


@router.post("/{agent_id}/heartbeat")
async def heartbeat(
    agent_id: AgentIdPath, token: AgentToken, registry: RegistryDep, body: Annotated[Heartbeat | None, Body()] = None
) -> HeartbeatAck:
    """Refresh liveness and load: one UPDATE, no status overwritten. Every field has a default,
    so no body at all is a heartbeat with the defaults."""
    body = body or Heartbeat()
    beat = await registry.store.heartbeat(agent_id, token, in_flight=body.in_flight)
    REGISTRY_HEARTBEATS.inc()
    REGISTRY_HEARTBEAT_LAG.observe(beat.lag_s)
    if beat.revived_from is not None:
        await registry.events.status_changed(
            agent_id, name=beat.name, previous=AgentStatus.OFFLINE, status=beat.status, reason="heartbeat resumed"
        )
    return HeartbeatAck(agent_id=agent_id, status=beat.status, in_flight=body.in_flight)


@router.put("/{agent_id}/status")
async def set_status(
    agent_id: AgentIdPath, body: StatusChange, token: AgentToken, registry: RegistryDep
) -> AgentInstance:
    """Change the instance's status; 409 for a transition DESIGN does not allow."""
    change = await registry.store.set_status(agent_id, token, body.status, reason=body.reason)
    if change.previous != change.status:
        await registry.events.status_changed(
            agent_id, name=change.name, previous=change.previous, status=change.status, reason=body.reason
        )
    return await registry.store.get(agent_id)


@router.delete("/{agent_id}", status_code=204, dependencies=[OperatorOrInstance])
async def deregister(agent_id: AgentIdPath, registry: RegistryDep) -> Response:
    """Remove an instance: by the instance itself (its token) or by an operator (an API key)."""
    removed = await registry.store.delete(agent_id)
    await registry.events.removed(agent_id, name=removed.name, reason="deregistered")
    return Response(status_code=204)


@router.get("", dependencies=[ApiKeyDep])
async def discover(
    registry: RegistryDep,
    capability: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    tag: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    status: Annotated[list[AgentStatus] | None, Query(description="repeat for any of several")] = None,
    name: Annotated[str | None, Query(pattern=AGENT_ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AgentInstance]:
    """Instances matching every given filter, healthiest and least loaded first."""
    query = Discovery(capability=capability, tag=tag, statuses=tuple(status or ()), name=name, limit=limit)
    return await registry.store.discover(query)


@router.get("/watch", dependencies=[ApiKeyDep])
async def watch(
    registry: RegistryDep, name: Annotated[str | None, Query(pattern=AGENT_ID_PATTERN)] = None
) -> EventSourceResponse:
    """Server-sent events: one per registration, status change or removal, from any replica."""
    if not registry.feed.listening:
        raise ServiceUnavailable(
            "the registry is not following changes right now (its PostgreSQL connection is being made again); "
            "retry in a few seconds"
        )
    shutdown = anyio.Event()
    return EventSourceResponse(
        _changes(registry.feed, name=name, shutdown=shutdown),
        ping=_SSE_PING_S,
        shutdown_event=shutdown,
        shutdown_grace_period=_SSE_SHUTDOWN_GRACE_S,
    )


@router.get("/{agent_id}", dependencies=[ApiKeyDep])
async def get_agent(agent_id: AgentIdPath, registry: RegistryDep) -> AgentInstance:
    return await registry.store.get(agent_id)


async def _changes(feed: ChangeFeed, *, name: str | None, shutdown: anyio.Event) -> AsyncIterator[ServerSentEvent]:
    """The stream's events; it ends cleanly when the server shuts down or the feed drops it."""
    async with feed.subscribe() as queue:
        yield ServerSentEvent(comment="watching")
        while (change := await _next_change(queue, shutdown)) is not None:
            if name is None or change.name == name:
                yield ServerSentEvent(data=change.model_dump_json(), event=change.kind)


async def _next_change(queue: asyncio.Queue[AgentChange | None], shutdown: anyio.Event) -> AgentChange | None:
    """The next change, or None once the server is shutting down (SSE keep-alive pings bound the wait)."""
    get = asyncio.ensure_future(queue.get())
    stop = asyncio.ensure_future(shutdown.wait())
    try:
        await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (get, stop):
            task.cancel()
    return get.result() if get.done() and not get.cancelled() else None
