"""Wake-ups by key: tasks wait on an ``asyncio.Event`` registered under a key (a resource,
a workflow), and a notification for that key sets the events of its waiters only."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

__all__ = ["Wakeups"]


class Wakeups:
    """``with wakeups.waiting(key) as event:`` ... ``wakeups.wake(key)`` sets it."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    def __len__(self) -> int:
        """How many keys have a waiter right now."""
        return len(self._events)

    @contextlib.contextmanager
    def waiting(self, key: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(key)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[key]

    def wake(self, key: str) -> None:
        for event in self._events.get(key, ()):
            event.set()

    def wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()
