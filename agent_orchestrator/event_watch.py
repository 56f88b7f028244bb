"""Live events for the workflow event streams of one process.

``GET /workflows/{id}/events`` replays the ``events`` table, then follows the
workflow's events as they are published. A launch that streams or waits for its
outcome opens its feed before the workflow exists, and reads no table. One Redis
subscription per process hands each published event to the streams of its
workflow only, as a
:class:`Feed`, so a live event costs no query. Events this process stores reach
its feeds at once, before they are published (``own_first``); their copy from
Redis is then a duplicate the stream drops. The subscription is closed once no
stream has followed for ``linger_s``, so a replica nobody watches does not
receive every event of every replica; the next stream opens it again (and, new,
reads the table first). The table stays the record: a
feed is marked *stale* when the subscription had to reconnect (what was
published meanwhile was missed), and its stream reads the table again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from shared.lib import metrics
from shared.lib.agent_events import Event
from shared.lib.event_bus import EventBus, Subscription
from shared.lib.tasks import cancel_and_wait

__all__ = ["Feed", "WorkflowWatch"]


class Feed:
    """The live events of one workflow for one stream, and whether the table must be read."""

    def __init__(self, *, stale: bool = True) -> None:
        self.arrived = asyncio.Event()
        self.stale = stale  # by default nothing is seen yet: the stream starts from the table
        self._events: list[Event] = []
        self._pushed: set[int] = set()

    def push(self, event: Event) -> None:
        """Keep ``event`` for the next take, once: this process's own events come twice."""
        if event.id in self._pushed:
            return
        self._pushed.add(event.id)
        self._events.append(event)
        self.arrived.set()

    def lost(self) -> None:
        self.stale = True
        self.arrived.set()

    def take(self) -> list[Event]:
        """The events published since the last take (the caller reads the table first if stale)."""
        events, self._events = self._events, []
        self.arrived.clear()
        return events


class WorkflowWatch:
    """``async with watch.follow(workflow_id) as feed:``; ``feed`` gets that workflow's events."""

    def __init__(self, bus: EventBus, *, linger_s: float = 5.0) -> None:
        self._bus = bus
        self._linger_s = linger_s
        self._sub: Subscription | None = None
        self._starting = asyncio.Lock()  # opening or closing the subscription
        self._feeds: dict[str, set[Feed]] = {}  # by workflow id
        self._idle: asyncio.Task[None] | None = None

    async def _ensure(self) -> None:
        if self._sub is not None:
            return
        async with self._starting:
            if self._sub is None:  # returns once subscribed
                self._sub = await self._bus.subscribe(
                    "workflow.*", self._on_event, on_resubscribed=self._on_lost, own_first=True
                )

    def _on_event(self, event: Event) -> None:
        for feed in self._feeds.get(event.aggregate_id or "", ()):
            feed.push(event)

    def _on_lost(self) -> None:
        for feeds in self._feeds.values():
            for feed in feeds:
                feed.lost()

    @contextlib.asynccontextmanager
    async def follow(self, workflow_id: str, *, new: bool = False) -> AsyncIterator[Feed]:
        """With ``new``, the workflow does not exist yet (its launch comes after this returns):
        every event it will have reaches the feed live, so the stream need not read the table
        unless the subscription is lost."""
        await self._ensure()
        feed = Feed(stale=not new)
        self._feeds.setdefault(workflow_id, set()).add(feed)
        metrics.WORKFLOW_EVENT_STREAMS.inc()
        try:
            yield feed
        finally:
            metrics.WORKFLOW_EVENT_STREAMS.dec()
            feeds = self._feeds[workflow_id]
            feeds.discard(feed)
            if not feeds:
                del self._feeds[workflow_id]
            if not self._feeds and (self._idle is None or self._idle.done()):
                self._idle = asyncio.create_task(self._close_when_idle(), name="workflow-watch-idle")

    async def _close_when_idle(self) -> None:
        await asyncio.sleep(self._linger_s)
        async with self._starting:
            if self._feeds or self._sub is None:
                return  # followed again meanwhile
            sub, self._sub = self._sub, None
            await sub.close()

    @property
    def following(self) -> int:
        """How many workflows have a stream following them right now."""
        return len(self._feeds)

    @property
    def subscribed(self) -> bool:
        return self._sub is not None

    async def close(self) -> None:
        await cancel_and_wait(self._idle)
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close()
