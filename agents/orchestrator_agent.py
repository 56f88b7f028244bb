"""The orchestrator's agent side: ROUTE_REQUEST (an instance chosen by
capability from the registry), DECOMPOSE_TASK (a task split into agent calls
with their dependencies) and AGGREGATE_RESULTS (agent responses merged into one
verdict)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agents.cicd import DeployArtifactInput, RunPipelineInput
from agents.code_review import ReviewCodeInput
from agents.documentation import GenerateDocsInput
from agents.feature_dev import GenerateCodeInput, RefactorCodeInput
from agents.infrastructure import DeployServiceInput, HealthCheckInput
from agents.sdk.agent import Agent, skill
from shared.lib.errors import AgentOffline, InvalidInput

__all__ = ["AggregateResultsInput", "DecomposeTaskInput", "OrchestratorAgent", "RouteRequestInput", "decompose"]


#: How long ROUTE_REQUEST retries an unreachable registry when no request deadline bounds it.
_DISCOVER_RETRY_S = 10.0


@dataclass(frozen=True)
class _Step:
    key: str
    agent: str
    request_type: str
    model: type[BaseModel]
    keywords: re.Pattern[str]
    after: tuple[str, ...]


#: Steps in pipeline order; a task gets every step one of its keywords names, plus what those steps need.
_STEPS: tuple[_Step, ...] = (
    _Step("generate", "feature-dev", "GENERATE_CODE", GenerateCodeInput,
          re.compile(r"\b(implement|scaffold|generate|feature|add)\w*", re.I), ()),
    _Step("refactor", "feature-dev", "REFACTOR_CODE", RefactorCodeInput,
          re.compile(r"\b(refactor|format|clean)\w*", re.I), ("generate",)),
    _Step("review", "code-review", "REVIEW_CODE", ReviewCodeInput,
          re.compile(r"\b(review|lint|audit|pr|pull request)\b", re.I), ("generate", "refactor")),
    _Step("test", "cicd", "RUN_PIPELINE", RunPipelineInput,
          re.compile(r"\b(test|pipeline|ci|verify)\w*", re.I), ("generate", "refactor")),
    _Step("docs", "documentation", "GENERATE_DOCS", GenerateDocsInput,
          re.compile(r"\b(doc|docs|documentation|readme)\w*", re.I), ("generate",)),
    _Step("package", "cicd", "DEPLOY_ARTIFACT", DeployArtifactInput,
          re.compile(r"\b(package|artifact|build|release|deploy)\w*", re.I), ("review", "test")),
    _Step("deploy", "infrastructure", "DEPLOY_SERVICE", DeployServiceInput,
          re.compile(r"\b(deploy|release|ship)\w*", re.I), ("package",)),
    _Step("health", "infrastructure", "HEALTH_CHECK", HealthCheckInput,
          re.compile(r"\b(health|incident|heal|outage|monitor|deploy)\w*", re.I), ("deploy",)),
)  # fmt: skip


class RouteRequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    capability: str = Field(min_length=1, max_length=128, description="a skill id such as REVIEW_CODE")
    name: str | None = Field(default=None, description="only instances of this agent name")
    exclude: list[str] = Field(default_factory=list, description="instance ids not to pick")


class DecomposeTaskInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=10000)
    context: dict[str, Any] = Field(default_factory=dict, description="values handed to the steps' payloads")


class ResultItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: str | None = None
    request_type: str | None = None
    status: Literal["success", "error", "timeout", "rejected"]
    payload: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, Any] | None = None


class AggregateResultsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: list[ResultItem] = Field(min_length=1, max_length=10000)


def _payload_for(model: type[BaseModel], context: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    payload = {k: v for k, v in context.items() if k in model.model_fields}
    missing = [n for n, f in model.model_fields.items() if f.is_required() and n not in payload]
    return payload, missing


def decompose(task: str, context: dict[str, Any]) -> list[dict[str, Any]]:
    """The agent calls ``task`` asks for, in pipeline order, each with the steps it depends on."""
    chosen = {s.key for s in _STEPS if s.keywords.search(task)}
    if not chosen:
        chosen = {"review", "test"}
    steps = []
    for step in _STEPS:
        if step.key not in chosen:
            continue
        payload, missing = _payload_for(step.model, context)
        depends = [k for k in step.after if k in chosen]
        steps.append({"id": step.key, "agent": step.agent, "request_type": step.request_type,
                      "payload": payload, "missing": missing, "depends_on": depends})  # fmt: skip
    return steps


def _aggregate(results: list[ResultItem]) -> dict[str, Any]:
    failed = [r for r in results if r.status != "success"]
    not_approved = [r for r in results if r.payload.get("approved") is False or r.payload.get("success") is False]
    findings = [f for r in results for f in r.payload.get("findings", []) if isinstance(f, dict)]
    issues = [i for r in results for i in r.payload.get("issues", []) if isinstance(i, dict)]
    errors = [{"agent": r.agent, "request_type": r.request_type, "status": r.status, "error": r.error} for r in failed]
    ok = not failed and not not_approved
    return {
        "status": "success" if ok else "failed",
        "total": len(results),
        "succeeded": len(results) - len(failed),
        "failed": len(failed),
        "rejected_by_checks": len(not_approved),
        "errors": errors,
        "findings": findings,
        "issues": issues,
    }


def _none_live(payload: RouteRequestInput, *, excluded: int) -> str:
    """Why no instance can take ``payload``'s capability, and what to do."""
    if excluded:
        return (
            f"every live instance with capability {payload.capability} is excluded ({excluded}, listed in "
            "exclude); exclude fewer, or start another instance"
        )
    return f"no live instance has capability {payload.capability}; start an agent that declares it"


class OrchestratorAgent(Agent):
    name = "orchestrator"
    version = "1.0.0"
    description = "Routes requests to agent instances by capability, decomposes tasks and aggregates results."

    @skill(
        "ROUTE_REQUEST",
        description="Pick the healthiest, least-loaded live instance that has a capability, from the registry.",
        tags=("routing", "registry", "discovery"),
    )
    async def route_request(self, payload: RouteRequestInput) -> dict[str, Any]:
        registry = self.require("registry")
        budget_s = self.time_left_s(default_s=_DISCOVER_RETRY_S)  # no retrying past the caller's deadline
        instances = await registry.discover(capability=payload.capability, name=payload.name, retry_for_s=budget_s)
        up = [a for a in instances if str(a.status) in ("active", "busy")]
        live = [a for a in up if a.id not in payload.exclude]
        if not live:
            raise AgentOffline(_none_live(payload, excluded=len(up)), field="exclude" if up else "capability")
        chosen = live[0]  # discovery orders healthiest and least loaded first
        return {"agent_id": chosen.id, "name": chosen.name, "endpoint": chosen.endpoint,
                "status": str(chosen.status), "in_flight": chosen.in_flight, "candidates": len(live)}  # fmt: skip

    @skill(
        "DECOMPOSE_TASK",
        description="Split a task described in words into agent calls in pipeline order, each with its payload "
        "filled from the context, the fields still missing, and the steps it depends on.",
        tags=("planning", "decomposition"),
    )
    async def decompose_task(self, payload: DecomposeTaskInput) -> dict[str, Any]:
        steps = decompose(payload.task, payload.context)
        if not steps:
            raise InvalidInput("task: nothing in it maps to an agent; name the work to do", field="task")
        return {"task": payload.task, "steps": steps}

    @skill(
        "AGGREGATE_RESULTS",
        description="Merge agent responses into one verdict: counts, errors, review findings and health issues.",
        tags=("aggregation", "results"),
    )
    async def aggregate_results(self, payload: AggregateResultsInput) -> dict[str, Any]:
        return _aggregate(payload.results)
