"""Running one workflow's graph from wherever its checkpoint left it.

The graph is streamed in ``tasks`` mode at its type's durability (``sync``: every
finished node is checkpointed before the next starts; ``async``: while the next
runs, the checkpoints of ``AO_CHECKPOINT_WRITE_BEHIND_MS`` together, and all before
the run's outcome is taken). Every finished node is reported as a
``workflow.node`` event and timed in ``workflow_node_duration_seconds``. What comes out is an
:class:`Outcome`: finished (with status and result) or waiting on an interrupt.
It is taken from the stream's ``values`` chunks, so the state is not read back
from the checkpointer; only a run in which nothing ran reads it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command

from agent_orchestrator.agent_calls import KEYS_OUTLIVE_CHECKPOINTS
from agent_orchestrator.checkpointer import NEW_THREAD_KEY, WRITE_BEHIND_KEY, PooledPostgresSaver
from agent_orchestrator.workflows.base import Durability, WorkflowContext
from shared.lib import metrics
from shared.lib.settings import Settings

__all__ = ["Outcome", "run_graph", "write_behind_s"]

#: How a ``values`` chunk carries the interrupts raised in its superstep (LangGraph's stream format).
_INTERRUPTS_KEY = "__interrupt__"

NodeCallback = Callable[[str, dict[str, Any], float], Awaitable[None]]


@dataclass
class Outcome:
    status: str
    """``succeeded``, ``failed`` or ``interrupted``."""
    result: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    errors: list[dict[str, Any]] = field(default_factory=list)
    interrupt: dict[str, Any] | None = None
    interrupted_node: str | None = None
    """The node waiting on ``interrupt`` (when the stream or the snapshot tells)."""
    values: dict[str, Any] = field(default_factory=dict)


def _initial_state(
    context: WorkflowContext, workflow_type: str, data: dict[str, Any], correlation_id: str
) -> dict[str, Any]:
    return {
        "workflow_id": context.workflow_id,
        "workflow_type": workflow_type,
        "input": data,
        "correlation_id": correlation_id,
        "steps": {},
        "iteration": 0,
    }


async def _graph_input(
    graph: CompiledStateGraph[Any, Any, Any, Any],
    config: dict[str, Any],
    resume_value: Any,
    fresh: dict[str, Any],
    *,
    new_thread: bool,
) -> Any:
    if resume_value is not None:
        return Command(resume=resume_value)
    if new_thread:
        return fresh
    snapshot = await graph.aget_state(config)  # type: ignore[arg-type]
    return fresh if snapshot.created_at is None else None


def write_behind_s(settings: Settings, durability: Durability) -> float:
    """How long a step's checkpoint may be held for a statement the run writes anyway (0: none)."""
    return settings.checkpoint_write_behind_ms / 1000 if durability == "async" else 0.0


async def run_graph(
    graph: CompiledStateGraph[Any, Any, Any, Any],
    *,
    context: WorkflowContext,
    config: dict[str, Any],
    workflow_type: str,
    data: dict[str, Any],
    correlation_id: str,
    resume_value: Any,
    on_node: NodeCallback,
    new_thread: bool = False,
    durability: Durability = "sync",
    on_task_start: Callable[[str, str], None] | None = None,
    on_task_end: Callable[[str, bool], None] | None = None,
) -> Outcome:
    """Stream the graph to its end or its next interrupt, reporting each finished node.

    ``new_thread`` says no checkpoint can exist yet (the run's first attempt), so neither
    this function nor the saver reads one before the first write. ``on_task_start(task_id,
    node)`` is called as each task starts, ``on_task_end(task_id, failed)`` as it ends (not
    at an interrupt). Checkpoints the saver still holds when the run stops are stored here
    before an interrupt or a failure; a finished run's are left for the caller to store with its
    outcome (``PooledPostgresSaver.take_held``), or else for the saver's write-behind window.
    """
    fresh = _initial_state(context, workflow_type, data, correlation_id)
    graph_input = await _graph_input(graph, config, resume_value, fresh, new_thread=new_thread)
    window_s = write_behind_s(context.settings, durability)
    flags = {NEW_THREAD_KEY: new_thread, KEYS_OUTLIVE_CHECKPOINTS: durability != "sync", WRITE_BEHIND_KEY: window_s}
    stream_config = {**config, "configurable": {**config["configurable"], **{k: v for k, v in flags.items() if v}}}
    stream = graph.astream(  # type: ignore[call-overload]
        graph_input, stream_config, context=context, stream_mode=["tasks", "values"], durability=durability
    )
    try:
        final = await _consume(
            stream, workflow_type, on_node=on_node, on_task_start=on_task_start, on_task_end=on_task_end
        )
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own failure is the one to report
            await _flush(graph, config)
        raise
    if final.values is None:  # nothing ran (a thread already at its end): read what it holds
        await _flush(graph, config)
        return await _outcome(graph, config)
    outcome = _outcome_of(final.values, final.interrupts, final.interrupted_node)
    if outcome.status == "interrupted":  # stored before the run is parked on it
        await _flush(graph, config)
    return outcome


async def _consume(
    stream: AsyncIterator[tuple[str, dict[str, Any]]],
    workflow_type: str,
    *,
    on_node: NodeCallback,
    on_task_start: Callable[[str, str], None] | None,
    on_task_end: Callable[[str, bool], None] | None = None,
) -> _Final:
    """Consume the stream: time and report each finished node; what the ``values`` chunks said last."""
    started: dict[str, float] = {}
    final = _Final()
    async for mode, chunk in stream:
        if mode == "values":
            final.see(chunk)
        elif "input" in chunk:
            started[chunk["id"]] = time.perf_counter()
            if on_task_start is not None:
                on_task_start(chunk["id"], chunk["name"])
        else:
            elapsed = time.perf_counter() - started.pop(chunk["id"], time.perf_counter())
            metrics.labels(metrics.WORKFLOW_NODE_DURATION, workflow_type, chunk["name"]).observe(elapsed)
            if chunk.get("interrupts"):
                final.interrupted_node = final.interrupted_node or chunk["name"]
                continue
            failed = chunk.get("error") is not None
            if on_task_end is not None:
                on_task_end(chunk["id"], failed)
            if not failed:
                await on_node(chunk["name"], chunk.get("result") or {}, elapsed)
    return final


async def _flush(graph: CompiledStateGraph[Any, Any, Any, Any], config: dict[str, Any]) -> None:
    if isinstance(graph.checkpointer, PooledPostgresSaver):
        await graph.checkpointer.flush(config["configurable"]["thread_id"])


@dataclass
class _Final:
    """What the stream's ``values`` chunks said last: the state, and the first interrupts seen
    (a chunk after the interrupt may repeat the state without them)."""

    values: dict[str, Any] | None = None
    interrupts: tuple[Any, ...] = ()
    interrupted_node: str | None = None

    def see(self, chunk: dict[str, Any]) -> None:
        values = dict(chunk)
        interrupts = values.pop(_INTERRUPTS_KEY, ())
        self.values = values
        if interrupts and not self.interrupts:
            self.interrupts = tuple(interrupts)


async def _outcome(graph: CompiledStateGraph[Any, Any, Any, Any], config: dict[str, Any]) -> Outcome:
    snapshot = await graph.aget_state(config)  # type: ignore[arg-type]
    waiting = next((task.name for task in snapshot.tasks if task.interrupts), None)
    return _outcome_of(dict(snapshot.values), snapshot.interrupts, waiting)


def _outcome_of(values: dict[str, Any], interrupts: Sequence[Any], interrupted_node: str | None = None) -> Outcome:
    if len(interrupts) > 1:
        return _invalid(f"{len(interrupts)} interrupts at once (parallel tasks); a workflow waits on one at a time")
    if interrupts:
        value = interrupts[0].value
        payload = value if isinstance(value, dict) else {"value": value}  # interrupt("Deploy?") shows as {"value": ...}
        try:
            orjson.dumps(payload)
        except TypeError as e:
            return _invalid(f"the interrupt's payload is not JSON: {e}")
        return Outcome(status="interrupted", interrupt=payload, interrupted_node=interrupted_node, values=values)
    status = values.get("outcome") or "succeeded"
    result = values.get("result") or {"steps": values.get("steps", {})}
    if status not in ("succeeded", "failed"):
        return _invalid(f"the graph's outcome {status!r} is neither 'succeeded' nor 'failed'")
    return Outcome(
        status=status,
        result=result,
        reason=values.get("reason", ""),
        errors=list(values.get("errors", [])),
        values=values,
    )


def _invalid(reason: str) -> Outcome:
    """A run that ended where the orchestrator cannot follow it (a graph's mistake): it fails, saying why."""
    return Outcome(status="failed", reason=reason, errors=[{"code": "invalid_outcome", "message": reason}])
