"""``parallel_docs``: one ``Send`` per unit (module or document type), spread over
the documentation agent's instances, then merged and written out.

A failed part fails only that part; the result lists it. The workflow fails only
when every part failed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Send
from pydantic import BaseModel, Field, model_validator

from agent_orchestrator.workflows.base import RepoPath, WorkflowContext, WorkflowType
from shared.lib.errors import OrchestratorError
from shared.lib.multi_agent_state import MultiAgentState

__all__ = ["PARALLEL_DOCS", "ParallelDocsInput"]

_DOC_TYPES = ("api", "guide", "deployment")


class ParallelDocsInput(BaseModel):
    repo_path: RepoPath = Field(description="Absolute path of the repository to document.")
    modules: list[str] | None = Field(default=None, description="Modules to document (one part each).")
    doc_types: list[str] | None = Field(default=None, description=f"Document types, among {_DOC_TYPES}.")
    output_dir: str | None = Field(default=None, description="Where to write; default <repo>/docs/generated.")

    @model_validator(mode="after")
    def _known_doc_types(self) -> ParallelDocsInput:
        unknown = sorted(set(self.doc_types or []) - set(_DOC_TYPES))
        if unknown:
            raise ValueError(f"unknown doc_types {unknown}; choose among {list(_DOC_TYPES)}")
        return self


def _discover_modules(repo: Path) -> list[str]:
    """Top-level Python modules and packages of ``repo`` (tests and hidden folders skipped)."""
    found: list[str] = []
    for path in sorted(repo.iterdir()):
        if path.name.startswith((".", "_")) or path.name in {"tests", "test", "docs"}:
            continue
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            found.append(path.stem if path.suffix == ".py" else path.name)
    return found


async def plan(state: MultiAgentState) -> dict[str, Any]:
    args = ParallelDocsInput.model_validate(state["input"])
    if args.modules:
        units = [{"doc_type": "api", "module": m} for m in args.modules]
    elif args.doc_types:
        units = [{"doc_type": t} for t in args.doc_types]
    else:
        modules = await asyncio.to_thread(_discover_modules, Path(args.repo_path))
        units = [{"doc_type": "api", "module": m} for m in modules] or [{"doc_type": "guide"}]
    return {"current_step": "plan", "steps": {"plan": {"units": units}}}


async def fan_out(state: MultiAgentState) -> list[Send]:
    repo = state["input"]["repo_path"]
    return [Send("document", {"unit": {**u, "repo_path": repo}}) for u in state["steps"]["plan"]["units"]]


def _unit_name(unit: dict[str, Any]) -> str:
    return str(unit.get("module") or unit["doc_type"])


async def document(state: MultiAgentState, runtime: Runtime[WorkflowContext]) -> dict[str, Any]:
    unit = state["unit"]
    payload: dict[str, Any] = {"repo_path": unit["repo_path"], "doc_type": unit["doc_type"]}
    if unit.get("module"):
        payload["modules"] = [unit["module"]]
    name = _unit_name(unit)
    try:
        reply = await runtime.context.calls.call("documentation", "GENERATE_DOCS", payload, label=f"docs:{name}")
    except OrchestratorError as e:  # the instance that failed the part, when one answered
        failed = {"unit": name, "ok": False, "error": e.message, "instance": e.details.get("served_by")}
        return {"parts": [failed]}
    part = {"unit": name, "ok": True, "instance": reply.instance, "markdown": reply.payload.get("markdown", "")}
    return {"parts": [part], "agents": [reply.instance]}


def _write(out_dir: Path, parts: list[dict[str, Any]]) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for part in parts:
        path = out_dir / f"{part['unit']}.md"
        path.write_text(part["markdown"])
        written.append(str(path))
    index = out_dir / "index.md"
    index.write_text("# Documentation\n\n" + "".join(f"- [{p['unit']}]({p['unit']}.md)\n" for p in parts))
    return [str(index), *written]


async def merge(state: MultiAgentState) -> dict[str, Any]:
    args = ParallelDocsInput.model_validate(state["input"])
    parts = sorted(state.get("parts", []), key=lambda p: p["unit"])
    ok = [p for p in parts if p["ok"]]
    failed = [{"unit": p["unit"], "error": p["error"], "instance": p.get("instance")} for p in parts if not p["ok"]]
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.repo_path) / "docs" / "generated"
    files = await asyncio.to_thread(_write, out_dir, ok) if ok else []
    instances = sorted({p["instance"] for p in parts if p.get("instance")})  # every instance that answered
    result = {"files": files, "parts": len(parts), "failed_parts": failed, "instances": instances}
    outcome = "succeeded" if ok else "failed"
    reason = "" if ok else "every documentation part failed"
    return {"current_step": "merge", "steps": {"merge": result}, "result": result, "outcome": outcome, "reason": reason}


def build() -> StateGraph[Any, Any, Any, Any]:
    graph = StateGraph(MultiAgentState, context_schema=WorkflowContext)
    graph.add_node("plan", plan)
    graph.add_node("document", document)
    graph.add_node("merge", merge)
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", fan_out, ["document"])
    graph.add_edge("document", "merge")
    graph.add_edge("merge", END)
    return graph


PARALLEL_DOCS = WorkflowType(
    name="parallel_docs",
    description="Generate documentation in parallel across the documentation agent's instances, then merge it.",
    input_model=ParallelDocsInput,
    build=build,
    durability="async",
)
