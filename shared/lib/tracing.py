"""LangSmith tracing across processes.

When ``LANGSMITH_TRACING=true`` and a key are set, LangGraph traces each
workflow run (one trace per workflow, with its id, type and correlation id as
metadata). An agent call becomes a child run; its headers travel in the
envelope's ``metadata["trace"]`` over Redis and the agent resumes them, so the
agent's own spans nest under the node that called it. With tracing off, every
function here is a cheap no-op.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langsmith import run_helpers, run_trees, utils

__all__ = [
    "agent_span",
    "child_span",
    "finish_workflow_trace",
    "start_workflow_trace",
    "trace_headers",
    "tracing_enabled",
    "workflow_context",
]


@functools.cache
def tracing_enabled() -> bool:
    """True when LangSmith tracing is switched on by the environment (not by a langsmith
    ``tracing_context`` around the call). Read once per process: langsmith reads the variables
    once too (``utils.get_env_var`` is cached), and asking it took ~9 us a call (it reads its
    context variables each time), several calls a workflow."""
    return bool(utils.tracing_is_enabled())


def trace_headers() -> dict[str, str]:
    """Headers naming the current run as parent, for a call that leaves this process."""
    run = run_helpers.get_current_run_tree()
    return dict(run.to_headers()) if run is not None else {}


def child_span(
    name: str, *, run_type: str = "tool", inputs: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None
) -> contextlib.AbstractAsyncContextManager[Any]:
    """A child run of the current run (an agent call seen from the caller); ``None`` untraced."""
    if not tracing_enabled():
        return contextlib.nullcontext()  # no generator to run per call
    return _traced(name, run_type=run_type, inputs=inputs or {}, metadata=metadata or {})


@contextlib.asynccontextmanager
async def _traced(name: str, *, run_type: str, inputs: dict[str, Any], metadata: dict[str, Any]) -> AsyncIterator[Any]:
    with run_helpers.trace(name, run_type=run_type, inputs=inputs, metadata=metadata) as run:  # type: ignore[arg-type]
        yield run


@contextlib.asynccontextmanager
async def agent_span(
    name: str, *, headers: dict[str, Any], inputs: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None
) -> AsyncIterator[Any]:
    """The agent's side of a call: a run nested under the caller's, resumed from ``headers``."""
    if not tracing_enabled() or not headers:
        yield None
        return
    with (
        run_helpers.tracing_context(parent=headers),
        run_helpers.trace(name, run_type="chain", inputs=inputs or {}, metadata=metadata or {}) as run,
    ):
        yield run


def start_workflow_trace(name: str, *, inputs: dict[str, Any], metadata: dict[str, Any]) -> dict[str, str]:
    """Open the root run of a workflow's trace; its headers are stored with the workflow so
    every later execution (after an interrupt, a retry or a takeover) nests under it."""
    if not tracing_enabled():
        return {}
    run = run_trees.RunTree(
        name=name,
        run_type="chain",
        inputs=inputs,
        extra={"metadata": metadata},
        tags=[str(metadata.get("workflow_type", ""))],
    )
    run.post()
    return dict(run.to_headers())


def finish_workflow_trace(
    headers: dict[str, str],
    *,
    name: str,
    outputs: dict[str, Any],
    metadata: dict[str, Any],
    error: str | None = None,
) -> None:
    """Close the root run opened by :func:`start_workflow_trace` with the workflow's outcome."""
    if not tracing_enabled() or not headers:
        return
    wire: dict[str | bytes, str | bytes] = {k: v for k, v in headers.items()}
    parent = run_trees.RunTree.from_headers(wire)
    if parent is None:
        return
    root = run_trees.RunTree(
        id=parent.id,
        trace_id=parent.trace_id,
        dotted_order=parent.dotted_order,
        name=name,
        run_type="chain",
        start_time=parent.start_time,
        extra={"metadata": metadata},
    )
    root.end(outputs=outputs, error=error)
    root.patch()


@contextlib.contextmanager
def workflow_context(headers: dict[str, str], *, metadata: dict[str, Any]) -> Iterator[None]:
    """Make the workflow's root run the parent of everything traced inside (the graph run)."""
    if not tracing_enabled() or not headers:
        yield
        return
    with run_helpers.tracing_context(parent=headers, metadata=metadata):
        yield
