"""A run's node events: written as the next node starts, the last with the run's outcome.

Every finished node is reported as a ``workflow.node`` event, and the workflow's
current step and agents are updated with it. The step written is the node running at the
time of the write (of the tasks started and not finished, the last one started), else the
last node reported: a workflow shows the node it is in, not the one before it. A task that
failed is the step from then on (the run ends at it). A node's event is written when the
next node starts (:meth:`NodeEvents.send`), in the background while the graph
goes on. With a write-behind window (a workflow at durability ``async``) it waits
instead, up to the window, for the statement of the run's outcome, and is written
on its own only when the window runs out first: a run shorter than the window
writes its node events and its outcome in one statement. Events released while a
write is in flight go together, in one statement, right after it: their events in
order, the step of the last one, the agents of all. The ones still waiting when
the run ends (the last node's) are taken (:meth:`NodeEvents.take`, once the ones
sent are written: :meth:`NodeEvents.drain`) and go in the statement of the run's
outcome, ahead of its terminal event.

Writes run one after another (:class:`~shared.lib.tasks.InOrder`). A statement
the database refuses (the workflow finished meanwhile: cancelled) stops the run
at its next node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.lib.tasks import InOrder

__all__ = ["NodeEvent", "NodeEvents", "merged_agents"]


@dataclass(frozen=True)
class NodeEvent:
    """A finished node: its name, the agents it called and its event's data."""

    node: str
    agents: list[str]
    data: dict[str, Any]


def merged_agents(events: Sequence[NodeEvent]) -> list[str]:
    """The agents of ``events``, each once, in the order they first came."""
    return list(dict.fromkeys(a for e in events for a in e.agents))


class NodeEvents:
    """The node events of one run; ``write(events, step)`` stores a batch in one statement, with
    the step the workflow is at. ``window_s`` (0: none) is how long a node's event may wait for
    the run's outcome."""

    def __init__(self, write: Callable[[list[NodeEvent], str], Awaitable[Any]], *, window_s: float = 0.0) -> None:
        self._write = write
        self._window_s = window_s
        self._timer: asyncio.TimerHandle | None = None
        self._running: dict[str, str] = {}  # task id -> node, of the tasks started and not finished
        self._failed: str | None = None  # the node of a task that failed
        self._waiting: list[NodeEvent] = []
        self._released: list[NodeEvent] = []
        self._queued = False  # a write of the released events is queued and has not started
        self._writes = InOrder()

    def add(self, event: NodeEvent) -> None:
        """Report a finished node; raises the failure of an earlier write (the run stops)."""
        self._writes.check()
        self._waiting.append(event)
        if self._window_s and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window_s, self._window_ran_out)

    def start(self, task_id: str, node: str) -> None:
        """A task of ``node`` starts: write the waiting events (with no window), now or together
        right after the write in flight; raises the failure of an earlier write."""
        self._running.pop(task_id, None)  # a retried task starts again: it is the last started
        self._running[task_id] = node
        if not self._window_s:
            self._release()

    def done(self, task_id: str, failed: bool = False) -> None:
        """A task ended (before its node is reported with :meth:`add`); ``failed``: with an error."""
        node = self._running.pop(task_id, None)
        if failed and node is not None:
            self._failed = node

    def step(self, events: Sequence[NodeEvent] = ()) -> str | None:
        """The step the workflow is at: the node that failed, else the node running (started
        last), else the last of ``events``."""
        running = next(reversed(self._running.values()), None)
        return self._failed or running or (events[-1].node if events else None)

    def _window_ran_out(self) -> None:
        self._timer = None
        with contextlib.suppress(Exception):  # an earlier write's failure: raised at the next add or drain
            self._release()

    def _stop_window(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release(self) -> None:
        self._released += self._waiting
        self._waiting = []
        if self._released and not self._queued:
            self._queued = True
            self._writes.add(self._write_released())

    async def _write_released(self) -> None:
        self._queued = False  # events released from now on go in the next write
        batch, self._released = self._released, []
        if batch:
            await self._write(batch, self.step(batch) or batch[-1].node)

    async def drain(self) -> None:
        """Wait until the events sent are written (the waiting ones stay, for :meth:`take`);
        raises the failure of a write."""
        self._stop_window()
        await self._writes.drain()

    def take(self) -> list[NodeEvent]:
        """The events not sent, for the caller to write in its own statement (after :meth:`drain`)."""
        batch, self._waiting = self._waiting, []
        return batch

    async def flush(self) -> None:
        """Write the waiting events and wait until every one is written."""
        self._stop_window()
        self._release()
        await self.drain()
