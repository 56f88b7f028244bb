"""``MultiAgentState``: the state every workflow graph runs over.

A ``TypedDict`` because LangGraph wants a dict; each field says what it holds and,
where several nodes write it in one superstep (fan-out with ``Send``), the
reducer that merges their writes so parallel updates never raise
``InvalidUpdateError``.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

__all__ = ["MultiAgentState", "merge_dicts", "union_list"]


def merge_dicts(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    """Reducer: later writes win key by key."""
    return {**(left or {}), **(right or {})}


def union_list(left: list[str] | None, right: list[str] | None) -> list[str]:
    """Reducer: an ordered set; keeps the first occurrence of each item."""
    out = list(left or [])
    out.extend(item for item in (right or []) if item not in out)
    return out


class MultiAgentState(TypedDict, total=False):
    workflow_id: str
    """The workflow, also the LangGraph thread id."""
    workflow_type: str
    """The registered workflow type that built the graph."""
    correlation_id: str
    """Carried into every agent call and every trace span of this workflow."""
    input: dict[str, Any]
    """The validated launch input."""
    current_step: str
    """The last node that finished."""
    steps: Annotated[dict[str, Any], merge_dicts]
    """Each step's output, by step name; the final result is built from it."""
    agents: Annotated[list[str], union_list]
    """Agent instances that took part, in order of first appearance."""
    locks: Annotated[list[str], union_list]
    """Resources the workflow holds for its whole run; re-acquired when a run resumes."""
    parts: Annotated[list[dict[str, Any]], operator.add]
    """Results of fan-out tasks (one entry per ``Send``), merged after the fan-out."""
    unit: dict[str, Any]
    """The unit of work a fan-out task receives in its ``Send``; never written back."""
    iteration: int
    """Loop counter of iterative workflows (``self_healing``)."""
    actions: Annotated[list[dict[str, Any]], operator.add]
    """Remediation or side-effecting actions taken, in order."""
    errors: Annotated[list[dict[str, Any]], operator.add]
    """Problems met along the way: {step, code, message}."""
    outcome: str
    """``succeeded`` or ``failed`` once the graph reaches its end."""
    reason: str
    """Why the workflow failed, in one sentence; empty on success."""
    result: dict[str, Any]
    """The final result the API returns."""
