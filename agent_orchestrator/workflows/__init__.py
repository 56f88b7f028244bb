"""Workflow types: the built-in ones and those registered by installed packages.

A package adds its own workflow by exposing a :class:`WorkflowType` (or a
zero-argument callable returning one) in the ``agent_orchestrator.workflows``
entry-point group; see docs/MULTI_AGENT_WORKFLOWS.md.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

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

__all__ = [
    "ENTRY_POINT_GROUP",
    "AbsolutePath",
    "AgentCalls",
    "AgentReply",
    "Durability",
    "LockHolder",
    "WorkflowContext",
    "WorkflowInput",
    "WorkflowType",
    "builtin_workflow_types",
    "load_workflow_types",
]

ENTRY_POINT_GROUP = "agent_orchestrator.workflows"
_log = logging.getLogger(__name__)


def builtin_workflow_types() -> dict[str, WorkflowType]:
    from agent_orchestrator.workflows.agent_chain import AGENT_CHAIN
    from agent_orchestrator.workflows.parallel_docs import PARALLEL_DOCS
    from agent_orchestrator.workflows.pr_deployment import PR_DEPLOYMENT
    from agent_orchestrator.workflows.self_healing import SELF_HEALING

    return {t.name: t for t in (PR_DEPLOYMENT, PARALLEL_DOCS, SELF_HEALING, AGENT_CHAIN)}


def load_workflow_types() -> dict[str, WorkflowType]:
    """Built-in types plus every valid entry point; a broken plug-in is logged and skipped."""
    types = builtin_workflow_types()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            wf = obj if isinstance(obj, WorkflowType) else obj()
        except Exception:  # noqa: BLE001 - a broken plug-in must not take the orchestrator down
            _log.exception("workflow entry point %s failed to load; skipped", ep.name)
            continue
        if not isinstance(wf, WorkflowType):
            _log.error("workflow entry point %s gave %r, not a WorkflowType; skipped", ep.name, type(wf))
            continue
        types[wf.name] = wf
    return types
