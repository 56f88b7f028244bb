"""Workflow types: the built-in ones and those registered by installed packages.

A package adds its own workflow by exposing a :class:`WorkflowType` (or a
zero-argument callable returning one) in the ``agent_orchestrator.workflows``
entry-point group; see docs/MULTI_AGENT_WORKFLOWS.md.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import traceback
from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import NamedTuple

from langgraph.graph import StateGraph
from langgraph.graph.state import CompiledStateGraph

from agent_orchestrator.workflows.base import (
    AbsolutePath,
    AgentCalls,
    AgentReply,
    Durability,
    LockHolder,
    WorkflowContext,
    WorkflowInput,
    WorkflowType,
)
from shared.lib.errors import InvalidInput
from shared.lib.safe_input import clipped
from shared.lib.workflow_state import WORKFLOW_TYPE_PATTERN

__all__ = [
    "ENTRY_POINT_GROUP",
    "AbsolutePath",
    "AgentCalls",
    "AgentReply",
    "Durability",
    "LoadedTypes",
    "LockHolder",
    "WorkflowContext",
    "WorkflowInput",
    "WorkflowType",
    "builtin_workflow_types",
    "load_workflow_types",
    "unknown_workflow_type",
]

ENTRY_POINT_GROUP = "agent_orchestrator.workflows"
_log = logging.getLogger(__name__)
#: Code that is not the plug-in's: where it failed is the innermost frame outside these.
_NOT_PLUGIN = ("<", str(Path(importlib.__file__).parent), str(Path(inspect.getfile(StateGraph)).parents[1]), __file__)
#: The longest reason a skipped entry point gets, so one line stays one readable line.
_MAX_REASON_CHARS = 300
_NAME_RE = re.compile(WORKFLOW_TYPE_PATTERN)


class LoadedTypes(NamedTuple):
    """What :func:`load_workflow_types` found."""

    types: dict[str, WorkflowType]
    """The types this process runs, by name."""
    failed: dict[str, str]
    """Why each skipped entry point was skipped (one line), by the names a launch of it would
    give: the entry point's and its type's, when it gave one; never a name in ``types``."""


class _Skipped(Exception):
    """An entry point that gives no usable workflow type; its message says why, in one line."""


def builtin_workflow_types() -> dict[str, WorkflowType]:
    from agent_orchestrator.workflows.agent_chain import AGENT_CHAIN
    from agent_orchestrator.workflows.parallel_docs import PARALLEL_DOCS
    from agent_orchestrator.workflows.pr_deployment import PR_DEPLOYMENT
    from agent_orchestrator.workflows.self_healing import SELF_HEALING

    return {t.name: t for t in (PR_DEPLOYMENT, PARALLEL_DOCS, SELF_HEALING, AGENT_CHAIN)}


def load_workflow_types() -> LoadedTypes:
    """Built-in types plus every valid entry point. A broken plug-in (it does not load, its type's
    name is taken or malformed, or its ``build()`` gives no graph the orchestrator can compile)
    is skipped with one error line naming it and saying why: it must not take the orchestrator
    down, nor replace a type loaded before it. What was skipped, and why, is kept for the API."""
    types = builtin_workflow_types()
    owners = dict.fromkeys(types, "the built-in type")
    failed: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        label = f"{ep.name} ({ep.value})"
        wf: WorkflowType | None = None
        try:
            wf = _load(ep)
            _check_name(wf.name, owners)
            _check_graph(wf)
        except _Skipped as e:
            _log.error("workflow entry point %s skipped: %s", label, e)
            for name in {ep.name, str(getattr(wf, "name", ep.name))}:
                failed.setdefault(name, f"its entry point {label} was skipped at start: {e}")
            continue
        types[wf.name] = wf
        owners[wf.name] = f"entry point {label}"
    return LoadedTypes(types, {name: why for name, why in failed.items() if name not in types})


def unknown_workflow_type(name: str, known: Iterable[str], failed: Mapping[str, str]) -> InvalidInput:
    """The error of a launch of ``name``, a type this process does not run: it names the known
    ones and, when an entry point of that name was skipped (``LoadedTypes.failed``), why."""
    why = f": {failed[name]}; fix the plug-in and restart the orchestrator" if name in failed else ""
    shown = clipped(repr(name))  # a name sent over the bus is not bounded as the API's is
    return InvalidInput(f"unknown workflow_type {shown}{why}; known types: {sorted(known)}", field="workflow_type")


def _load(ep: EntryPoint) -> WorkflowType:
    try:
        obj = ep.load()
        wf = obj if isinstance(obj, WorkflowType) else obj()
    except Exception as e:  # any: a broken plug-in must not take the orchestrator down
        raise _Skipped(f"failed to load: {_why(e)}") from e
    if not isinstance(wf, WorkflowType):
        raise _Skipped(
            f"gave an object of type {type(wf).__name__}, "
            "not a WorkflowType (or a zero-argument callable returning one)"
        )
    return wf


def _check_name(name: str, owners: dict[str, str]) -> None:
    """``name`` can be launched and is no other type's (the first to take a name keeps it)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _Skipped(f"its type name {name!r} does not match {WORKFLOW_TYPE_PATTERN}, so it could never be launched")
    if name in owners:
        raise _Skipped(f"its type name {name!r} is already taken by {owners[name]}, which is kept; rename this type")


def _check_graph(wf: WorkflowType) -> None:
    """``wf.build()`` gives an uncompiled ``StateGraph`` that compiles: the orchestrator compiles
    it itself, with its checkpointer, and reads its nodes and edges to list and draw it."""
    try:
        graph = wf.build()
    except Exception as e:
        raise _Skipped(f"build() raised {_why(e)}") from e
    if isinstance(graph, CompiledStateGraph):
        raise _Skipped(
            "build() returned a compiled graph; return the StateGraph itself, without .compile() "
            "(the orchestrator compiles it with its checkpointer)"
        )
    if not isinstance(graph, StateGraph):
        raise _Skipped(f"build() returned an object of type {type(graph).__name__}, not a langgraph StateGraph")
    try:
        graph.compile().get_graph().draw_mermaid()
    except Exception as e:
        raise _Skipped(f"its graph does not compile: {_why(e)}") from e


def _why(e: BaseException) -> str:
    """``e`` in one line: its type, its message and, when it is in the plug-in's code, where."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}".rstrip(": ")
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_NOT_PLUGIN)]
    return f"{text} ({frames[-1].filename}:{frames[-1].lineno})" if frames else text
