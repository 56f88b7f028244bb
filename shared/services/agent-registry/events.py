"""The registry's one seam to the event bus: every instance transition goes out here.

Events are a side effect of a change already committed to the table, so a bus
that is slow or down must not fail the request that made the change: each emit
is bounded by a timeout, and a failure is logged and dropped. (Live watchers do
not depend on the bus: ``/agents/watch`` follows the table through LISTEN/NOTIFY.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from shared.lib.registry_models import AgentStatus

__all__ = ["AgentEvents", "EventSink"]

_log = logging.getLogger(__name__)

_EMIT_TIMEOUT_S = 2.0


class EventSink(Protocol):
    """What the registry needs of the bus (``shared.lib.event_bus.EventBus`` fits it)."""

    async def emit(self, event_type: str, data: dict[str, Any], *, aggregate_type: str, aggregate_id: str) -> Any: ...


class AgentEvents:
    """Emits ``agent.*`` events for registrations, status changes and removals."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink

    async def registered(self, agent_id: str, *, name: str, status: AgentStatus, version: str) -> None:
        await self._emit("agent.registered", agent_id, {"name": name, "status": status.value, "version": version})

    async def status_changed(
        self, agent_id: str, *, name: str, previous: AgentStatus, status: AgentStatus, reason: str | None
    ) -> None:
        data = {"name": name, "previous_status": previous.value, "status": status.value, "reason": reason}
        await self._emit("agent.status_changed", agent_id, data)

    async def removed(self, agent_id: str, *, name: str, reason: str) -> None:
        await self._emit("agent.removed", agent_id, {"name": name, "reason": reason})

    async def _emit(self, event_type: str, agent_id: str, data: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(_EMIT_TIMEOUT_S):
                await self._sink.emit(
                    event_type, {"agent_id": agent_id, **data}, aggregate_type="agent", aggregate_id=agent_id
                )
        except Exception:  # noqa: BLE001 - the change is committed; a lost event must not fail the request
            _log.warning("could not emit %s for agent %s; continuing", event_type, agent_id, exc_info=True)
