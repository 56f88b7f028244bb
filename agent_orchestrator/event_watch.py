"""Live wake-ups for the workflow event streams of one process.

``GET /workflows/{id}/events`` reads the ``events`` table and sleeps until the next
event of its workflow is published. Each stream used to open its own pattern
subscription on Redis and wake on every workflow event of the system, re-reading
the table each time: with many streams open, every event cost one query per stream.
Here one subscription per process wakes only the streams of the workflow an event
belongs to. The table stays the record: a wake-up missed (Redis reconnecting) only
delays a stream until its next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from shared.lib.agent_events import Event
from shared.lib.event_bus import EventBus, Subscription
from shared.lib.wakeups import Wakeups

__all__ = ["WorkflowWatch"]


class WorkflowWatch:
    """``async with watch.follow(workflow_id) as wake:``; ``wake`` is set by that workflow's events."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._sub: Subscription | None = None
        self._starting = asyncio.Lock()
        self._wakeups = Wakeups()  # by workflow id

    async def _ensure(self) -> None:
        if self._sub is not None:
            return
        async with self._starting:
            if self._sub is None:
                self._sub = await self._bus.subscribe("workflow.*", self._on_event)  # returns once subscribed

    def _on_event(self, event: Event) -> None:
        if event.aggregate_id:
            self._wakeups.wake(event.aggregate_id)

    @contextlib.asynccontextmanager
    async def follow(self, workflow_id: str) -> AsyncIterator[asyncio.Event]:
        await self._ensure()
        with self._wakeups.waiting(workflow_id) as wake:
            yield wake

    @property
    def following(self) -> int:
        """How many workflows have a stream waiting on them right now."""
        return len(self._wakeups)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close()
