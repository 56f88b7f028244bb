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

__all__ = ["WorkflowWatch"]


class WorkflowWatch:
    """``async with watch.follow(workflow_id) as wake:``; ``wake`` is set by that workflow's events."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._sub: Subscription | None = None
        self._starting = asyncio.Lock()
        self._waiters: dict[str, set[asyncio.Event]] = {}

    async def _ensure(self) -> None:
        if self._sub is not None:
            return
        async with self._starting:
            if self._sub is None:
                self._sub = await self._bus.subscribe("workflow.*", self._on_event)  # returns once subscribed

    def _on_event(self, event: Event) -> None:
        for wake in self._waiters.get(event.aggregate_id or "", ()):
            wake.set()

    @contextlib.asynccontextmanager
    async def follow(self, workflow_id: str) -> AsyncIterator[asyncio.Event]:
        await self._ensure()
        wake = asyncio.Event()
        self._waiters.setdefault(workflow_id, set()).add(wake)
        try:
            yield wake
        finally:
            waiters = self._waiters.get(workflow_id)
            if waiters is not None:
                waiters.discard(wake)
                if not waiters:
                    del self._waiters[workflow_id]

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close()
