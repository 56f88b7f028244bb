"""A workflow type's first node: the step a new run is at before any node has finished."""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel

from agent_orchestrator.workflows import WorkflowType, builtin_workflow_types
from shared.lib.multi_agent_state import MultiAgentState


def _node(state: MultiAgentState) -> dict[str, Any]:
    return {}


def _type(build: Any) -> WorkflowType:
    return WorkflowType(name="t", description="", input_model=BaseModel, build=build)


def test_the_built_in_types_start_at_their_first_node() -> None:
    """Each built-in graph starts at one fixed node, the step its runs show before any node ended."""
    firsts = {name: wtype.first_node for name, wtype in builtin_workflow_types().items()}
    assert firsts == {
        "agent_chain": "call_next",
        "parallel_docs": "plan",
        "pr_deployment": "lock_repo",
        "self_healing": "detect",
    }


def test_a_graph_that_chooses_its_first_node_or_starts_two_has_none() -> None:
    """No first node is claimed for a graph that picks it at run time or starts two at once."""

    def chosen() -> StateGraph[Any, Any, Any, Any]:
        g: StateGraph[Any, Any, Any, Any] = StateGraph(MultiAgentState)
        g.add_node("a", _node)
        g.add_node("b", _node)
        g.add_conditional_edges(START, lambda s: "a", ["a", "b"])
        g.add_edge("a", END)
        g.add_edge("b", END)
        return g

    def two() -> StateGraph[Any, Any, Any, Any]:
        g: StateGraph[Any, Any, Any, Any] = StateGraph(MultiAgentState)
        g.add_node("a", _node)
        g.add_node("b", _node)
        g.add_edge(START, "a")
        g.add_edge(START, "b")
        return g

    assert _type(chosen).first_node is None
    assert _type(two).first_node is None
