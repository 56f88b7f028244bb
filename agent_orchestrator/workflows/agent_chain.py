"""``agent_chain``: call agents one after another and return their outputs, in order.

Input ``{calls: [{agent, request_type, payload}]}``. Each call is its own
superstep, so a chain interrupted by a crash resumes at the call it was making
(whose idempotency key makes the agent answer it once). The last call also
writes the result, so a chain of n calls is n supersteps. The first failed call
fails the workflow, naming it (``call <i>``, counted from 0), with the agent's error
code. The result is ``{outputs: [...], calls: [{agent, request_type, instance,
output}]}``.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Command
from pydantic import Field

from agent_orchestrator.workflows.base import WorkflowContext, WorkflowInput, WorkflowType
from shared.lib.errors import OrchestratorError
from shared.lib.multi_agent_state import MultiAgentState
from shared.lib.settings import AGENT_ID_PATTERN

__all__ = ["AGENT_CHAIN", "AgentChainInput", "ChainCall"]

MAX_CALLS = 50


class ChainCall(WorkflowInput):
    agent: str = Field(pattern=AGENT_ID_PATTERN, description="Name of the agent to call.")
    request_type: str = Field(min_length=1, max_length=64, description="One of the agent's request types.")
    payload: dict[str, Any] = Field(default_factory=dict, description="The request's payload.")


class AgentChainInput(WorkflowInput):
    calls: list[ChainCall] = Field(min_length=1, max_length=MAX_CALLS, description="The calls, made in order.")


def _calls(state: MultiAgentState) -> list[ChainCall]:
    return AgentChainInput.model_validate(state["input"]).calls


async def call_next(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> Command[str]:
    i = state.get("iteration", 0)
    calls = _calls(state)
    call = calls[i]
    try:
        reply = await runtime.context.calls.call(call.agent, call.request_type, call.payload, label=f"call:{i}")
    except OrchestratorError as e:
        raise _call_failed(e, i, call) from e
    part = {"agent": call.agent, "request_type": call.request_type, "instance": reply.instance, "output": reply.payload}
    update = {"current_step": f"call:{i}", "iteration": i + 1, "parts": [part], "agents": [reply.instance]}
    if i + 1 == len(calls):
        update |= _finished([*state.get("parts", []), part])
        return Command(update=update, goto=END)
    return Command(update=update, goto="call_next")


def _call_failed(e: OrchestratorError, i: int, call: ChainCall) -> OrchestratorError:
    """``e`` naming call ``i`` (counted from 0), of its class and with its code: the workflow's
    error is the agent's (``rejected`` for a request type it does not handle, ``invalid_input``
    for a bad payload), not ``internal``."""
    failed = type(e)(
        f"call {i} ({call.agent} {call.request_type}) failed: {e.message}",
        field=e.field,
        resource=e.resource,
        details=e.details,
    )
    failed.code, failed.retryable = e.code, e.retryable
    return failed


def _finished(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"result": {"outputs": [p["output"] for p in parts], "calls": parts}, "outcome": "succeeded", "reason": ""}


def build() -> StateGraph[Any, Any, Any, Any]:
    g = StateGraph(MultiAgentState, context_schema=WorkflowContext)
    # the node says where to go (Command): no router to run between the calls
    g.add_node("call_next", call_next, destinations=("call_next", END))
    g.add_edge(START, "call_next")
    return g


AGENT_CHAIN = WorkflowType(
    name="agent_chain",
    description="Call agents one after another and return their outputs in order.",
    input_model=AgentChainInput,
    build=build,
    durability="async",
)
