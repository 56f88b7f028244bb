"""NodeEvents: a node's event is written when the next node starts; events released while a
write is in flight go together right after it, in order; the last ones are taken for the run's
outcome; a refused write stops the run at its next node. With a write-behind window, an event
waits for the outcome and is written on its own only when the window runs out first. A write
carries the step the workflow is at: the node running by then, else the last one reported."""

from __future__ import annotations

import asyncio

import pytest

from agent_orchestrator.node_events import NodeEvent, NodeEvents, merged_agents


def _event(i: int, *agents: str) -> NodeEvent:
    return NodeEvent(f"n{i}", list(agents), {"node": f"n{i}"})


class _Writes:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.batches: list[list[str]] = []
        self.steps: list[str] = []

    async def __call__(self, events: list[NodeEvent], step: str) -> None:
        await asyncio.sleep(self.delay)
        self.batches.append([e.node for e in events])
        self.steps.append(step)


async def test_an_event_is_written_when_the_next_node_starts() -> None:
    writes = _Writes()
    events = NodeEvents(writes)
    events.start("t", "n")  # the first node starts: nothing to write
    events.add(_event(0))
    await asyncio.sleep(0.01)
    assert writes.batches == []  # waits for the next start (or the outcome)
    events.start("t", "n")
    await events.drain()
    assert writes.batches == [["n0"]]


async def test_events_released_during_a_write_go_together_after_it() -> None:
    writes = _Writes(delay=0.03)
    events = NodeEvents(writes)
    events.add(_event(0))
    events.start("t", "n")
    await asyncio.sleep(0.01)  # n0 being written
    for i in (1, 2):
        events.add(_event(i))
        events.start("t", "n")
    await events.drain()
    assert writes.batches == [["n0"], ["n1", "n2"]]


async def test_the_last_ones_are_taken_not_written() -> None:
    writes = _Writes()
    events = NodeEvents(writes)
    events.add(_event(0, "a"))
    events.start("t", "n")
    events.add(_event(1, "b", "a"))
    events.add(_event(2, "c"))
    await events.drain()
    taken = events.take()
    assert writes.batches == [["n0"]]
    assert [e.node for e in taken] == ["n1", "n2"]
    assert merged_agents(taken) == ["b", "a", "c"]
    assert events.take() == []


async def test_flush_writes_what_waits_and_a_refused_write_stops_the_next_add() -> None:
    async def refuse(events: list[NodeEvent], step: str) -> None:
        raise RuntimeError("workflow cancelled")

    events = NodeEvents(refuse)
    events.add(_event(0))
    with pytest.raises(RuntimeError, match="cancelled"):
        await events.flush()
    with pytest.raises(RuntimeError, match="cancelled"):
        events.add(_event(1))


async def test_with_a_window_events_wait_for_the_outcome() -> None:
    """A run shorter than the window writes no node event on its own: all are taken."""
    writes = _Writes()
    events = NodeEvents(writes, window_s=0.05)
    for i in range(3):
        events.start("t", "n")  # the node starts: nothing is written before the window ran out
        events.add(_event(i))
    await events.drain()
    await asyncio.sleep(0.08)  # past the window: drained, nothing is written any more
    assert writes.batches == []
    assert [e.node for e in events.take()] == ["n0", "n1", "n2"]


async def test_with_a_window_events_are_written_once_it_ran_out() -> None:
    """The window runs from the first waiting event: those waiting then go in one write, and
    the next ones wait for a window of their own."""
    writes = _Writes()
    events = NodeEvents(writes, window_s=0.03)
    events.add(_event(0))
    await asyncio.sleep(0.01)
    events.start("t", "n")
    events.add(_event(1))
    await asyncio.sleep(0.04)  # the window of n0 ran out
    assert writes.batches == [["n0", "n1"]]
    events.add(_event(2))
    await events.drain()
    assert writes.batches == [["n0", "n1"]]
    assert [e.node for e in events.take()] == ["n2"]


async def test_a_refused_write_after_a_window_stops_the_next_add() -> None:
    async def refuse(events: list[NodeEvent], step: str) -> None:
        raise RuntimeError("workflow cancelled")

    events = NodeEvents(refuse, window_s=0.01)
    events.add(_event(0))
    await asyncio.sleep(0.03)
    with pytest.raises(RuntimeError, match="cancelled"):
        events.add(_event(1))


async def test_a_write_carries_the_node_running_by_then() -> None:
    """The step is the node of the task started last among those still running (n1, then n2
    once it started after n1's event waited), else the last node reported; a task that failed
    is the step from then on."""
    writes = _Writes(delay=0.03)
    events = NodeEvents(writes)
    events.start("t0", "n0")
    events.done("t0")
    events.add(_event(0))
    events.start("t1", "n1")  # n0's event is written while n1 runs
    await asyncio.sleep(0.01)
    events.done("t1")
    events.add(_event(1))
    events.start("t2", "n2")  # n1's event waits for the write in flight; n2 runs by the time it goes
    await events.drain()
    assert writes.batches == [["n0"], ["n1"]]
    assert writes.steps == ["n1", "n2"]
    events.done("t2")
    events.add(_event(2))
    assert events.step(events.take()) == "n2"  # nothing runs: the last node reported


async def test_parallel_tasks_the_step_is_one_still_running_and_a_failed_one_stays() -> None:
    """Two tasks run at once (a fan-out): when the one started last ends, the step is the other,
    still running, not the one that ended; a task that fails is the step the run ends at."""
    events = NodeEvents(_Writes())
    events.start("a", "A")
    events.start("b", "B")
    assert events.step() == "B"
    events.done("b")
    events.add(NodeEvent("B", [], {"node": "B"}))
    assert events.step(events.take()) == "A"  # A still runs
    events.start("c", "C")
    events.done("a", failed=True)
    assert events.step() == "A"  # A failed: the run ends at it, though C started after
    await events.flush()
