"""``parallel_docs``: one ``Send`` per unit (module or document type), spread over
the documentation agent's instances, then merged and written out.

A failed part fails only that part; the result lists it. The workflow fails only
when every part failed, or when the documentation cannot be written.

Each part goes to one flat file inside ``output_dir``, named from its unit: a unit is
the caller's text (a module dotted, ``pkg.util``, however it was spelled, or as given when
it is not inside the repository, ``../pkg/util.py``), so it never becomes a path.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Annotated, Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Send
from pydantic import Field, ValidationInfo, field_validator

from agent_orchestrator.workflows.base import AbsolutePath, WorkflowContext, WorkflowInput, WorkflowType
from shared.lib.connections import connection_lost
from shared.lib.errors import InvalidInput, NotFound, OrchestratorError
from shared.lib.multi_agent_state import MultiAgentState

__all__ = ["PARALLEL_DOCS", "ParallelDocsInput"]

_DOC_TYPES = ("api", "guide", "deployment")
#: The index's stem, which no part may take.
_INDEX_STEM = "index"
#: Longest stem kept whole; longer ones are cut and end in a hash of the unit, so that the
#: name, with ``-<n>.md``, stays far below the 255 bytes a file name may have (all ASCII).
_MAX_STEM_CHARS = 200
_SEPARATORS = re.compile(r"[/\\.]+")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")

_Unit = Annotated[str, Field(min_length=1, max_length=4096)]


class ParallelDocsInput(WorkflowInput):
    repo_path: AbsolutePath = Field(description="Absolute path of the repository to document.")
    modules: list[_Unit] | None = Field(
        default=None,
        description="Modules to document as API references (one part each), dotted or as paths; "
        "spellings of one module (calc.ops, calc/ops, calc/ops.py) are one, named dotted, and "
        "duplicates are dropped. Leave out to document every top-level module.",
    )
    doc_types: list[str] | None = Field(
        default=None, description=f"Document types (one part each), among {_DOC_TYPES}; not with modules."
    )
    output_dir: AbsolutePath | None = Field(
        default=None, description="Absolute directory to write to; default <repo>/docs/generated."
    )

    @field_validator("modules", "doc_types")
    @classmethod
    def _not_empty_each_once(cls, units: list[str] | None, info: ValidationInfo) -> list[str] | None:
        """An empty list is refused (it would read as "not given"); duplicates go, in order."""
        if units is not None and not units:
            raise ValueError(f"the list is empty; leave {info.field_name} out to document every top-level module")
        return None if units is None else list(dict.fromkeys(units))

    @field_validator("modules", mode="before")
    @classmethod
    def _dotted_modules(cls, modules: Any) -> Any:
        """Each module spelled dotted, so its spellings are one unit (then one part)."""
        return [_dotted(m) if isinstance(m, str) else m for m in modules] if isinstance(modules, list) else modules

    @field_validator("doc_types")
    @classmethod
    def _known_doc_types_alone(cls, doc_types: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if doc_types is not None and info.data.get("modules") is not None:
            raise ValueError(
                "give modules or doc_types, not both: modules are documented as API references; "
                "launch another run for the other document types"
            )
        unknown = sorted(set(doc_types or []) - set(_DOC_TYPES))
        if unknown:
            raise ValueError(f"unknown doc_types {unknown}; choose among {list(_DOC_TYPES)}")
        return doc_types


def _dotted(module: str) -> str:
    """``module``'s dotted name when it is spelled as a path or a file inside the repository
    (``calc/ops``, ``./calc/ops.py``, ``calc/ops/__init__.py`` -> ``calc.ops``), which the
    documentation agent resolves to the same file; as given otherwise (``../x.py``, ``/x.py``,
    ``a.b.py``: a file whose stem has a dot), left for the agent to resolve or refuse."""
    path = module
    while path.startswith("./"):
        path = path[2:]
    path = path.rstrip("/")
    path = path.removesuffix(".py") if path.endswith(".py") else path.replace(".", "/")
    parts = path.split("/")
    if len(parts) > 1 and parts[-1] == "__init__":
        parts.pop()
    if not all(p and "." not in p for p in parts):
        return module
    return ".".join(parts)


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
    if args.modules is not None:
        units = [{"doc_type": "api", "module": m} for m in args.modules]
    elif args.doc_types is not None:
        units = [{"doc_type": t} for t in args.doc_types]
    else:
        try:
            modules = await asyncio.to_thread(_discover_modules, Path(args.repo_path))
        except OSError as e:
            return _cannot_list(args.repo_path, e)
        units = [{"doc_type": "api", "module": m} for m in modules] or [{"doc_type": "guide"}]
    return {"current_step": "plan", "steps": {"plan": {"units": units}}}


def _cannot_list(repo_path: str, e: OSError) -> dict[str, Any]:
    """The plan of a run whose modules cannot be listed: no part, and the workflow fails naming
    ``repo_path`` (not a raw ``FileNotFoundError``). The modules are listed on the orchestrator's
    machine, which may not be the agents'; naming the modules leaves finding them to the agents."""
    missing = isinstance(e, FileNotFoundError | NotADirectoryError)
    why = "is not a directory" if missing else f"cannot be read ({e.strerror or e})"
    error = (NotFound if missing else InvalidInput)(
        f"repo_path: {repo_path} {why} on the orchestrator's machine, where parallel_docs lists the "
        "modules to document; pass the repository's absolute path there, or name the modules",
        field="input.repo_path",
    )
    return {
        "current_step": "plan",
        "steps": {"plan": {"units": []}},
        "outcome": "failed",
        "reason": error.message,
        "errors": [error.to_dict()],
    }


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
        if connection_lost(e):  # Redis or PostgreSQL out of reach: the run is handed back and resumes
            raise
        failed = {"unit": name, "ok": False, "error": e.message, "instance": e.details.get("served_by")}
        return {"parts": [failed]}
    part = {"unit": name, "ok": True, "instance": reply.instance, "markdown": reply.payload.get("markdown", "")}
    return {"parts": [part], "agents": [reply.instance]}


def _file_stem(unit: str) -> str:
    """``unit`` as one flat file's stem: path separators and dots become single dots, so no
    part is empty, ``.`` or ``..``; other characters than letters, digits, ``_`` and ``-``
    become ``_``; a trailing ``.py`` goes (``pkg/util.py`` -> ``pkg.util``)."""
    segments = (_UNSAFE_CHARS.sub("_", s) for s in _SEPARATORS.split(unit.removesuffix(".py")))
    stem = ".".join(s for s in segments if s) or "_"
    if len(stem) > _MAX_STEM_CHARS:
        stem = f"{stem[: _MAX_STEM_CHARS - 13]}-{hashlib.sha256(unit.encode()).hexdigest()[:12]}"
    return stem


def _file_names(units: list[str]) -> list[str]:
    """One file name per unit, in order, no two alike even on a case-insensitive file system:
    a stem already taken (or the index's) gets ``-2``, ``-3``... (``../r/pkg/util.py`` and
    ``r.pkg.util`` -> ``r.pkg.util.md`` and ``r.pkg.util-2.md``)."""
    taken = {_INDEX_STEM}
    names = []
    for unit in units:
        stem = candidate = _file_stem(unit)
        n = 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate.casefold())
        names.append(f"{candidate}.md")
    return names


def _inside(root: Path, name: str) -> Path:
    """``root / name``, refused when it resolves outside ``root`` (a symbolic link there)."""
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise InvalidInput(
            f"output_dir: {path} leads outside {root}; remove that link or choose another output_dir",
            field="output_dir",
        )
    return path


def _write(out_dir: Path, files: list[tuple[str, str, str]]) -> list[str]:
    """Write each ``(unit, file name, markdown)`` and an index linking them; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for _, name, markdown in files:
        path = _inside(out_dir, name)
        path.write_text(markdown, encoding="utf-8")
        written.append(str(path))
    index = _inside(out_dir, f"{_INDEX_STEM}.md")
    links = "".join(f"- [{unit}]({name})\n" for unit, name, _ in files)
    index.write_text("# Documentation\n\n" + links, encoding="utf-8")
    return [str(index), *written]


def _all_failed(failed: list[dict[str, Any]]) -> str:
    """The reason of a run whose every part failed: with their error when they share one (a
    ``repo_path`` that is no repository fails them all alike)."""
    errors = {str(f["error"]) for f in failed}
    return "every documentation part failed" + (f": {errors.pop()}" if len(errors) == 1 else "")


async def merge(state: MultiAgentState) -> dict[str, Any]:
    args = ParallelDocsInput.model_validate(state["input"])
    parts = sorted(state.get("parts", []), key=lambda p: p["unit"])
    names = _file_names([p["unit"] for p in parts])  # over every part: a name does not hang on another's failure
    ok = [(p["unit"], name, p["markdown"]) for p, name in zip(parts, names, strict=True) if p["ok"]]
    failed = [{"unit": p["unit"], "error": p["error"], "instance": p.get("instance")} for p in parts if not p["ok"]]
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.repo_path) / "docs" / "generated"
    files: list[str] = []
    reason = "" if ok else _all_failed(failed)
    try:
        files = await asyncio.to_thread(_write, out_dir, ok) if ok else []
    except InvalidInput as e:
        reason = e.message
    except OSError as e:
        reason = f"could not write the documentation: {e}; give an output_dir the orchestrator can write to"
    instances = sorted({p["instance"] for p in parts if p.get("instance")})  # every instance that answered
    result = {"files": files, "parts": len(parts), "failed_parts": failed, "instances": instances}
    outcome = "failed" if reason else "succeeded"
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
