"""What a workflow type is, and the context its nodes receive at run time.

A workflow type pairs an input model with a graph builder. Nodes receive a
:class:`WorkflowContext` through LangGraph's runtime (``Runtime[WorkflowContext]``):
it carries the agent caller and the lock manager, so nodes hold no globals and
user workflows get the same tools as the built-in ones.

Nodes and routers (the functions of ``add_conditional_edges``) are ``async def``:
the orchestrator runs graphs with ``astream``, where LangGraph hands a plain ``def``
to a thread pool, a thread hop per call.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from langgraph.graph import START, StateGraph
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from shared.lib.settings import Settings

__all__ = [
    "AbsolutePath",
    "AgentCalls",
    "AgentReply",
    "Durability",
    "LockHolder",
    "WorkflowContext",
    "WorkflowInput",
    "WorkflowType",
]

Durability = Literal["sync", "async"]


def _absolute(path: str) -> str:
    if not os.path.isabs(path):
        raise ValueError(
            f"{path!r} is relative; give an absolute path (the orchestrator and its agents use it "
            "on their machines, not in the caller's directory)"
        )
    return path


#: A path in a workflow's input: absolute, as the orchestrator and the agents resolve it, not the caller.
AbsolutePath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_absolute)]


def _strict(model: type[BaseModel], data: Any) -> dict[str, Any]:
    """``data``, parsed from JSON, validated as the JSON it came as, in pydantic's strict mode: a
    wrong type is refused (``"2"`` or ``2.0`` for an integer, ``1`` for a boolean), while what
    JSON can only spell as a string (a timestamp, a UUID, a path) is still read from one. A value
    JSON cannot hold (NaN or Infinity, which the body parser takes) is a ValueError, as a bad
    field is, and so is nesting past the depth pydantic's parser reads."""
    try:
        raw = json.dumps(data, allow_nan=False)  # one pass; orjson would write NaN as null
    except (ValueError, RecursionError) as e:
        raise ValueError(f"cannot be read as JSON: {e}") from e
    return model.model_validate_json(raw, strict=True).model_dump(mode="json")


class WorkflowInput(BaseModel):
    """The base of a workflow's input model: a field it does not know is a 422 naming it, not
    silently dropped (a misspelt ``max_iteration`` would otherwise run with the default)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class AgentReply:
    """A successful agent answer: its payload and the instance that produced it."""

    payload: dict[str, Any]
    agent: str
    instance: str


class AgentCalls(Protocol):
    """How nodes call agents; the idempotency key comes from the thread, the task and ``label``."""

    async def call(
        self, agent: str, request_type: str, payload: dict[str, Any], *, label: str, timeout_s: float | None = None
    ) -> AgentReply: ...


class LockHolder(Protocol):
    """Locks held by the workflow across nodes (``hold``) or for one block (``scoped``)."""

    async def hold(self, resource_id: str, *, ttl_s: float) -> int: ...

    def scoped(self, resource_id: str, *, ttl_s: float, wait_s: float) -> AbstractAsyncContextManager[int]: ...


@dataclass
class WorkflowContext:
    """Run-time services for nodes, built by the runner for each run."""

    workflow_id: str
    settings: Settings
    calls: AgentCalls
    locks: LockHolder
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkflowType:
    """A launchable workflow: its name, input model and graph builder.

    User workflows expose one of these through the ``agent_orchestrator.workflows``
    entry-point group.

    ``durability`` is when a node's checkpoint is written. ``sync``: before the next node
    starts. ``async``: while the next node runs; the run's outcome is still recorded only
    once every checkpoint is stored. A crash may then lose the last step, which runs again
    and gets its agents' stored answers: call keys name the step and the task, not the
    checkpoint. That holds for the nodes of the workflow's own graph; a graph whose nodes
    run subgraphs that call agents must stay ``sync`` (the call is refused otherwise).
    """

    name: str
    description: str
    input_model: type[BaseModel]
    build: Callable[[], StateGraph[Any, Any, Any, Any]]
    durability: Durability = "sync"
    resume_model: type[BaseModel] | None = None
    """The answer its interrupts take (``POST /workflows/{id}/resume``'s ``decision``), checked
    before the answer is queued; ``None``: any JSON value, for the graph to judge."""

    def input_schema(self) -> dict[str, Any]:
        return self.input_model.model_json_schema()

    def resume_schema(self) -> dict[str, Any] | None:
        return self.resume_model.model_json_schema() if self.resume_model is not None else None

    def validate_input(self, data: Any) -> dict[str, Any]:
        """``data`` (parsed JSON) as ``input_model`` reads it, strictly (:func:`_strict`)."""
        return _strict(self.input_model, data)

    def validate_resume(self, answer: Any) -> Any:
        """``answer`` as ``resume_model`` reads it (pydantic's ``ValidationError`` if it does not)."""
        if self.resume_model is None:
            return answer
        return _strict(self.resume_model, answer)

    @functools.cached_property
    def first_node(self) -> str | None:
        """The node every run starts at (its step while it runs); ``None`` when the graph chooses
        its first node at run time or starts several."""
        graph = self.build()
        if graph.branches.get(START):
            return None
        firsts = [end for start, end in graph.edges if start == START]
        return firsts[0] if len(firsts) == 1 else None

    def mermaid(self) -> str:
        return self.build().compile().get_graph().draw_mermaid()
