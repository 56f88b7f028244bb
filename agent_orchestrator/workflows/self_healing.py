"""``self_healing``: detect, diagnose, fix, verify, looping at most ``max_iterations``.

Detection and verification are the infrastructure agent's ``HEALTH_CHECK``; the
diagnosis maps each issue to the remediation the infrastructure agent offers for
it; the fix runs those remediations. The final result is
``{is_resolved, iterations, actions}``.
"""

from __future__ import annotations

from typing import Annotated, Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from pydantic import Field

from agent_orchestrator.workflows.base import WorkflowContext, WorkflowInput, WorkflowType
from agents.work.health import Environment, Target
from shared.lib.errors import OrchestratorError
from shared.lib.multi_agent_state import MultiAgentState
from shared.lib.settings import AGENT_ID_PATTERN

__all__ = ["SELF_HEALING", "SelfHealingInput"]


class SelfHealingInput(WorkflowInput):
    """Checked at launch as HEALTH_CHECK checks it (the same models and patterns), so a bad
    target, environment or agent is a 422 naming it, not a workflow that fails at its first step."""

    targets: list[Target] = Field(
        default_factory=list,
        max_length=256,
        description="HTTP/TCP probes: {kind: http, url} or {kind: tcp, host, port}.",
    )
    environment: Environment | None = Field(
        default=None, description="Check the release this environment serves: a name or an absolute path."
    )
    agents: list[Annotated[str, Field(pattern=AGENT_ID_PATTERN)]] = Field(
        default_factory=list, max_length=256, description="Agents whose pending requests to check."
    )
    registry: bool = Field(default=False, description="Look for stale instances in the registry.")
    locks: bool = Field(default=False, description="Look for expired or abandoned lock leases.")
    max_iterations: int = Field(default=3, ge=1, le=20, description="Diagnose-fix-verify rounds at most.")

    def health_check(self) -> dict[str, Any]:
        return self.model_dump(exclude={"max_iterations"}, exclude_none=True)


async def _health(runtime: Runtime[WorkflowContext], state: MultiAgentState, label: str) -> dict[str, Any]:
    check = SelfHealingInput.model_validate(state["input"]).health_check()
    reply = await runtime.context.calls.call("infrastructure", "HEALTH_CHECK", check, label=label)
    return reply.payload


async def detect(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    report = await _health(runtime, state, "detect")
    return {"current_step": "detect", "iteration": 0, "steps": {"detect": report, "verify": report}}


def _open_issues(state: MultiAgentState) -> list[dict[str, Any]]:
    issues: list[dict[str, Any]] = state.get("steps", {}).get("verify", {}).get("issues", [])
    return issues


async def diagnose(state: MultiAgentState) -> dict[str, Any]:
    plan = []
    for issue in _open_issues(state):
        remediation = issue.get("remediation")
        if remediation:
            plan.append(
                {"issue": issue.get("kind", "issue"), "target": issue.get("target"), "remediation": remediation}
            )
    return {
        "current_step": "diagnose",
        "iteration": state.get("iteration", 0) + 1,
        "steps": {"diagnose": {"plan": plan, "unfixable": len(_open_issues(state)) - len(plan)}},
    }


async def fix(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    actions = []
    iteration = state.get("iteration", 1)
    for n, item in enumerate(state["steps"]["diagnose"]["plan"]):
        remediation = item["remediation"]
        try:
            reply = await runtime.context.calls.call(
                "infrastructure", "REMEDIATE", dict(remediation), label=f"fix:{iteration}:{n}"
            )
            actions.append({"iteration": iteration, **item, "ok": True, "result": reply.payload})
        except OrchestratorError as e:
            actions.append({"iteration": iteration, **item, "ok": False, "error": e.message})
    return {"current_step": "fix", "actions": actions}


async def verify(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    report = await _health(runtime, state, f"verify:{state.get('iteration', 1)}")
    return {"current_step": "verify", "steps": {"verify": report}}


async def conclude(state: MultiAgentState) -> dict[str, Any]:
    remaining = _open_issues(state)
    resolved = not remaining
    result = {
        "is_resolved": resolved,
        "iterations": state.get("iteration", 0),
        "actions": state.get("actions", []),
        "remaining_issues": remaining,
        "detected": state.get("steps", {}).get("detect", {}).get("issues", []),
    }
    reason = "" if resolved else f"{len(remaining)} issue(s) remain after {result['iterations']} iteration(s)"
    return {
        "current_step": "conclude",
        "result": result,
        "outcome": "succeeded" if resolved else "failed",
        "reason": reason,
    }


async def _after_check(state: MultiAgentState) -> str:
    if not _open_issues(state):
        return "conclude"
    limit = SelfHealingInput.model_validate(state["input"]).max_iterations
    return "diagnose" if state.get("iteration", 0) < limit else "conclude"


def build() -> StateGraph[Any, Any, Any, Any]:
    g = StateGraph(MultiAgentState, context_schema=WorkflowContext)
    g.add_node("detect", detect)
    g.add_node("diagnose", diagnose)
    g.add_node("fix", fix)
    g.add_node("verify", verify)
    g.add_node("conclude", conclude)
    g.add_edge(START, "detect")
    g.add_conditional_edges("detect", _after_check, ["diagnose", "conclude"])
    g.add_edge("diagnose", "fix")
    g.add_edge("fix", "verify")
    g.add_conditional_edges("verify", _after_check, ["diagnose", "conclude"])
    g.add_edge("conclude", END)
    return g


SELF_HEALING = WorkflowType(
    name="self_healing",
    description="Detect, diagnose, fix and verify infrastructure issues, looping at most max_iterations times.",
    input_model=SelfHealingInput,
    build=build,
    durability="async",
)
