"""``pr_deployment``: lock the repository, review, test, ask a human, deploy under
a lock on the environment, verify health, roll back if it fails.

The approval is a LangGraph ``interrupt()``; the workflow is resumed through the
API or the CLI with ``{"decision": "approve"|"reject", "by": ..., "comment": ...}``.
An approval not given within ``approval_timeout_s`` is answered by the runner
with an ``expired`` rejection, and the reason is recorded.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import interrupt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_orchestrator.workflows.base import AbsolutePath, WorkflowContext, WorkflowInput, WorkflowType
from agents.work.health import Target
from shared.lib.errors import InvalidInput
from shared.lib.multi_agent_state import MultiAgentState

__all__ = ["PR_DEPLOYMENT", "ApprovalAnswer", "ApprovalDecision", "PrDeploymentInput"]

_REPO_LOCK_TTL_S = 3600.0
_ENV_LOCK_TTL_S = 600.0
_ENV_LOCK_WAIT_S = 120.0


class PrDeploymentInput(WorkflowInput):
    repo_path: AbsolutePath = Field(description="Absolute path of the git repository.")
    base: str = Field(min_length=1, description="Base revision of the change.")
    head: str = Field(min_length=1, description="Revision to review, test and deploy.")
    environment: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="Deploy environment name.")
    health_targets: list[Target] = Field(
        default_factory=list,
        max_length=256,
        description="Extra HEALTH_CHECK targets ({kind: http, url} or {kind: tcp, host, port}), checked at launch.",
    )
    approval_timeout_s: float | None = Field(default=None, gt=0, description="Override of AO_APPROVAL_TIMEOUT_S.")


class ApprovalAnswer(BaseModel):
    """What a person answers at the approval (checked by the API before it is queued)."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    by: str = Field(default="unknown", max_length=200)
    comment: str = Field(default="", max_length=4000)


class ApprovalDecision(ApprovalAnswer):
    """The answer the node reads: a person's, or the runner's ``expired`` rejection."""

    expired: bool = False


def _args(state: MultiAgentState) -> PrDeploymentInput:
    """The input as this release reads it; one stored by an earlier release that it refuses (a
    health target it no longer takes) fails the workflow naming the field, not with a traceback."""
    try:
        return PrDeploymentInput.model_validate(state["input"])
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(["input", *(str(p) for p in first["loc"])])
        raise InvalidInput(f"{field}: {first['msg']} (stored by an earlier release)", field=field) from e


def _revision(state: MultiAgentState) -> str:
    """The commit the review resolved ``head`` to: tests, approval and deploy all take this one,
    so a branch that moves while the workflow waits is not what gets deployed."""
    return str(state.get("steps", {}).get("review", {}).get("head") or _args(state).head)


def _fail(step: str, reason: str, output: dict[str, Any]) -> dict[str, Any]:
    return {"current_step": step, "steps": {step: output}, "outcome": "failed", "reason": reason}


async def lock_repo(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    resource = f"repo:{_args(state).repo_path}"
    token = await runtime.context.locks.hold(resource, ttl_s=_REPO_LOCK_TTL_S)
    return {
        "current_step": "lock_repo",
        "locks": [resource],
        "steps": {"lock_repo": {"resource": resource, "token": token}},
    }


async def review(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    args = _args(state)
    reply = await runtime.context.calls.call(
        "code-review",
        "REVIEW_CODE",
        {"repo_path": args.repo_path, "base": args.base, "head": args.head},
        label="review",
    )
    out = {**reply.payload, "instance": reply.instance}
    if not reply.payload.get("approved"):
        errors = [f for f in reply.payload.get("findings", []) if f.get("severity") == "error"]
        return {
            **_fail("review", f"code review did not approve: {len(errors)} error finding(s)", out),
            "agents": [reply.instance],
        }
    return {"current_step": "review", "steps": {"review": out}, "agents": [reply.instance]}


def _pipeline_passed(payload: dict[str, Any]) -> bool:
    if "success" in payload:
        return bool(payload["success"])
    return payload.get("exit_code") == 0 and not payload.get("failed")


def _pipeline_failure(payload: dict[str, Any]) -> str:
    """Why the pipeline failed, in a line (a timeout, or the exit code and the counts), then its log's tail."""
    if payload.get("timed_out"):
        why = f"the test command timed out after {payload.get('duration_s')} s"
    else:
        counts = ", ".join(f"{payload.get(k, 0)} {k}" for k in ("passed", "failed", "errors"))
        why = f"tests failed (exit code {payload.get('exit_code')}; {counts})"
    tail = str(payload.get("log_tail", ""))[-2000:]
    return f"{why}; log tail:\n{tail}"


async def test(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    args = _args(state)
    reply = await runtime.context.calls.call(
        "cicd",
        "RUN_PIPELINE",
        {"repo_path": args.repo_path, "revision": _revision(state)},
        label="pipeline",
        timeout_s=max(runtime.context.settings.request_timeout_s, 300.0),
    )
    out = {**reply.payload, "instance": reply.instance}
    if not _pipeline_passed(reply.payload):
        return {**_fail("test", _pipeline_failure(reply.payload), out), "agents": [reply.instance]}
    return {"current_step": "test", "steps": {"test": out}, "agents": [reply.instance]}


def _summary(state: MultiAgentState, timeout_s: float) -> dict[str, Any]:
    steps = state.get("steps", {})
    rv, tst = steps.get("review", {}), steps.get("test", {})
    args, revision = _args(state), _revision(state)
    return {
        "question": f"Deploy {args.head} ({revision[:12]}) to {args.environment}?",
        "revision": revision,
        "review": {"approved": rv.get("approved"), "findings": len(rv.get("findings", []))},
        "tests": {k: tst.get(k) for k in ("passed", "failed", "duration_s") if k in tst},
        "expires_at": (datetime.now(UTC) + timedelta(seconds=timeout_s)).isoformat(),
        "answer_with": {"decision": "approve|reject", "by": "name", "comment": "text"},
    }


async def approval(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    timeout_s = _args(state).approval_timeout_s or runtime.context.settings.approval_timeout_s
    answer = interrupt({"kind": "approval", "timeout_s": timeout_s, **_summary(state, timeout_s)})
    try:
        decision = ApprovalDecision.model_validate(answer)
    except ValidationError as e:
        return _fail("approval", f"approval answer was not understood: {e.errors()[0]['msg']}", {"answer": answer})
    out = decision.model_dump()
    if decision.decision == "reject":
        why = f"approval expired after {timeout_s:.0f}s" if decision.expired else f"rejected by {decision.by}"
        return _fail("approval", f"{why}{': ' + decision.comment if decision.comment else ''}", out)
    return {"current_step": "approval", "steps": {"approval": out}}


async def deploy(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    args, calls, revision = _args(state), runtime.context.calls, _revision(state)
    async with runtime.context.locks.scoped(
        f"env:{args.environment}", ttl_s=_ENV_LOCK_TTL_S, wait_s=_ENV_LOCK_WAIT_S
    ) as token:
        art = await calls.call(
            "cicd", "DEPLOY_ARTIFACT", {"repo_path": args.repo_path, "revision": revision}, label="artifact"
        )
        rel = await calls.call(
            "infrastructure",
            "DEPLOY_SERVICE",
            {"artifact": art.payload["path"], "sha256": art.payload["sha256"], "environment": args.environment},
            label="deploy",
        )
    out = {"artifact": art.payload, "release": rel.payload, "lock_token": token}
    return {
        "current_step": "deploy",
        "steps": {"deploy": out},
        "agents": [art.instance, rel.instance],
        "actions": [{"action": "deploy", "environment": args.environment, "revision": revision}],
    }


async def verify(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    args = _args(state)
    targets = [t.model_dump(mode="json", exclude_none=True) for t in args.health_targets]
    check = {"environment": args.environment, "targets": targets}
    reply = await runtime.context.calls.call("infrastructure", "HEALTH_CHECK", check, label="health")
    return {"current_step": "verify", "steps": {"verify": reply.payload}, "agents": [reply.instance]}


async def _after_verify(state: MultiAgentState) -> str:
    return "rollback" if state.get("steps", {}).get("verify", {}).get("issues") else "finish"


async def rollback(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    """Back to the release this deploy replaced (named: not whatever the environment's history
    holds before it); on an environment's first release there is none, and the workflow says so."""
    env, steps = _args(state).environment, state.get("steps", {})
    unhealthy = f"health check found {len(steps.get('verify', {}).get('issues', []))} issue(s)"
    previous = steps.get("deploy", {}).get("release", {}).get("previous")
    if not previous:
        why = f"{unhealthy}; nothing to roll back to: {_revision(state)[:12]} is the first release of {env}"
        return _fail("rollback", why, {"rolled_back": False})
    async with runtime.context.locks.scoped(f"env:{env}", ttl_s=_ENV_LOCK_TTL_S, wait_s=_ENV_LOCK_WAIT_S):
        payload = {"environment": env, "to": previous}
        reply = await runtime.context.calls.call("infrastructure", "ROLLBACK", payload, label="rollback")
    return {
        **_fail("rollback", f"{unhealthy}; rolled back to {previous[:12]}", {**reply.payload, "rolled_back": True}),
        "actions": [{"action": "rollback", "environment": env, "revision": previous}],
    }


async def finish(state: MultiAgentState) -> dict[str, Any]:
    steps = state.get("steps", {})
    return {
        "current_step": "finish",
        "outcome": "succeeded",
        "reason": "",
        "result": {
            "deployed": _revision(state),
            "head": state["input"]["head"],
            "environment": state["input"]["environment"],
            "steps": steps,
        },
    }


def _next_unless_failed(target: str) -> Any:
    async def route(state: MultiAgentState) -> str:
        return END if state.get("outcome") == "failed" else target

    return route


def build() -> StateGraph[Any, Any, Any, Any]:
    g = StateGraph(MultiAgentState, context_schema=WorkflowContext)
    g.add_node("lock_repo", lock_repo)
    g.add_node("review", review)
    g.add_node("test", test)
    g.add_node("approval", approval)
    g.add_node("deploy", deploy)
    g.add_node("verify", verify)
    g.add_node("rollback", rollback)
    g.add_node("finish", finish)
    g.add_edge(START, "lock_repo")
    g.add_edge("lock_repo", "review")
    g.add_conditional_edges("review", _next_unless_failed("test"), ["test", END])
    g.add_conditional_edges("test", _next_unless_failed("approval"), ["approval", END])
    g.add_conditional_edges("approval", _next_unless_failed("deploy"), ["deploy", END])
    g.add_edge("deploy", "verify")
    g.add_conditional_edges("verify", _after_verify, ["finish", "rollback"])
    g.add_edge("rollback", END)
    g.add_edge("finish", END)
    return g


PR_DEPLOYMENT = WorkflowType(
    name="pr_deployment",
    description="Review, test, approve (human), deploy under an environment lock, verify, roll back on failure.",
    input_model=PrDeploymentInput,
    build=build,
    durability="async",
    resume_model=ApprovalAnswer,
)
