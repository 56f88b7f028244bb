"""Typed dependencies of the registry's routes: its parts, and the three kinds of credentials.

- the registration secret (``X-Registration-Secret``) lets an agent register;
- the per-instance token (``X-Agent-Token``) issued at registration proves an
  instance on every later call it makes about itself;
- an API key (``X-API-Key`` or Bearer) lets readers and operators in (open in
  development mode).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Path, Request

from agent_registry.events import AgentEvents
from agent_registry.store import RegistryStore
from agent_registry.watch import ChangeFeed
from shared.lib.errors import Unauthorized
from shared.lib.http_service import check_api_key
from shared.lib.settings import AGENT_ID_PATTERN, Settings

__all__ = [
    "AgentIdPath",
    "AgentToken",
    "OperatorOrInstance",
    "Registry",
    "RegistryDep",
    "require_registration_secret",
]


@dataclass(frozen=True)
class Registry:
    """The registry's parts, built once in the lifespan."""

    settings: Settings
    store: RegistryStore
    events: AgentEvents
    feed: ChangeFeed


async def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.ctx.extras["registry"]
    return registry


RegistryDep = Annotated[Registry, Depends(_registry)]

AgentIdPath = Annotated[str, Path(pattern=AGENT_ID_PATTERN, description="the instance id")]


async def _agent_token(x_agent_token: Annotated[str | None, Header()] = None) -> str:
    if not x_agent_token:
        raise Unauthorized(
            "missing agent token; send the token your registration returned in the X-Agent-Token header",
            field="X-Agent-Token",
        )
    return x_agent_token


AgentToken = Annotated[str, Depends(_agent_token)]


async def require_registration_secret(
    registry: RegistryDep, x_registration_secret: Annotated[str | None, Header()] = None
) -> None:
    """Refuse a registration without the shared secret (development mode with no secret set is open)."""
    expected = registry.settings.registration_secret
    if registry.settings.dev_mode and not expected:
        return
    if not x_registration_secret:
        raise Unauthorized(
            "missing registration secret; send AO_REGISTRATION_SECRET in the X-Registration-Secret header",
            field="X-Registration-Secret",
        )
    if not hmac.compare_digest(x_registration_secret.encode(), expected.encode()):
        raise Unauthorized("wrong registration secret", field="X-Registration-Secret")


async def _operator_or_instance(
    request: Request,
    agent_id: AgentIdPath,
    registry: RegistryDep,
    x_agent_token: Annotated[str | None, Header()] = None,
) -> None:
    """The instance's own token when one is sent; otherwise an operator's API key."""
    if x_agent_token:
        await registry.store.check_token(agent_id, x_agent_token)
    else:
        check_api_key(request)


OperatorOrInstance = Depends(_operator_or_instance)
