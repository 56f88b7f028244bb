"""Wire shapes of the agent registry, shared by the service and its client.

One module for both sides keeps them from drifting: the registry validates
request bodies with these models and the client parses responses with them.
Capabilities follow the A2A skill shape (id, name, description, tags, input and
output schema), so an agent card and a registry entry describe a skill alike.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.lib.settings import AGENT_ID_PATTERN

__all__ = [
    "DISCOVERY_ORDER",
    "INITIAL_STATUSES",
    "AgentChange",
    "AgentInstance",
    "AgentStatus",
    "Heartbeat",
    "HeartbeatAck",
    "Registered",
    "Registration",
    "Skill",
    "StatusChange",
    "transition_allowed",
]


class AgentStatus(StrEnum):
    """Lifecycle of an instance (DESIGN, Registry API)."""

    INITIALIZING = "initializing"
    ACTIVE = "active"
    BUSY = "busy"
    ERROR = "error"
    OFFLINE = "offline"


#: Statuses an instance may register with: a re-registering instance resumes where it was.
INITIAL_STATUSES = frozenset({AgentStatus.INITIALIZING, AgentStatus.ACTIVE, AgentStatus.BUSY})

#: Discovery puts the healthiest first; the registry's SQL ORDER BY follows this order.
DISCOVERY_ORDER = (
    AgentStatus.ACTIVE,
    AgentStatus.BUSY,
    AgentStatus.INITIALIZING,
    AgentStatus.ERROR,
    AgentStatus.OFFLINE,
)

_ALLOWED: dict[AgentStatus, frozenset[AgentStatus]] = {
    AgentStatus.INITIALIZING: frozenset({AgentStatus.ACTIVE}),
    AgentStatus.ACTIVE: frozenset({AgentStatus.BUSY}),
    AgentStatus.BUSY: frozenset({AgentStatus.ACTIVE}),
    AgentStatus.ERROR: frozenset(),
    AgentStatus.OFFLINE: frozenset(),
}


def transition_allowed(current: AgentStatus, new: AgentStatus) -> bool:
    """``initializing -> active``, ``active <-> busy``, anything -> ``error``/``offline``; same -> same is a no-op."""
    if new in (AgentStatus.ERROR, AgentStatus.OFFLINE) or new == current:
        return True
    return new in _ALLOWED[current]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Skill(_Wire):
    """One capability of an agent, in the A2A AgentSkill shape."""

    id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=4000)
    tags: list[str] = Field(default_factory=list, max_length=64)
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None


class Registration(_Wire):
    """Body of ``POST /agents/register``; an instance that re-registers passes its old ``agent_id``."""

    name: str = Field(pattern=AGENT_ID_PATTERN)
    version: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(min_length=1, max_length=2048, pattern=r"^https?://\S+$")
    capabilities: list[Skill] = Field(default_factory=list, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict)
    agent_id: str | None = Field(default=None, pattern=AGENT_ID_PATTERN)
    status: AgentStatus = AgentStatus.INITIALIZING


class AgentInstance(_Wire):
    """One registered instance, as discovery and ``GET /agents/{agent_id}`` return it."""

    id: str
    name: str
    version: str
    endpoint: str
    capabilities: list[Skill]
    metadata: dict[str, Any]
    status: AgentStatus
    in_flight: int
    last_heartbeat: datetime
    registered_at: datetime
    status_changed_at: datetime
    status_reason: str | None = None


class Registered(_Wire):
    """Answer to a registration: the instance and the token every later call of it must carry."""

    agent: AgentInstance
    token: str
    heartbeat_ttl_s: float


class Heartbeat(_Wire):
    """Body of ``POST /agents/{agent_id}/heartbeat``: proof of life and the current load."""

    in_flight: int = Field(default=0, ge=0, le=1_000_000)


class HeartbeatAck(_Wire):
    agent_id: str
    status: AgentStatus
    in_flight: int


class StatusChange(_Wire):
    """Body of ``PUT /agents/{agent_id}/status``."""

    status: AgentStatus
    reason: str | None = Field(default=None, max_length=1000)


class AgentChange(_Wire):
    """One event of ``GET /agents/watch``: what changed, for which instance."""

    kind: str  # registered | status | removed
    agent_id: str
    name: str
    status: AgentStatus | None
    previous_status: AgentStatus | None = None
    at: datetime
