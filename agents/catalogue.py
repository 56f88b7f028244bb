"""The reference agents by name, as ``agent-orchestrator agent NAME`` starts them."""

from __future__ import annotations

from agents.cicd import CicdAgent
from agents.code_review import CodeReviewAgent
from agents.documentation import DocumentationAgent
from agents.feature_dev import FeatureDevAgent
from agents.infrastructure import InfrastructureAgent
from agents.orchestrator_agent import OrchestratorAgent
from agents.sdk.agent import Agent
from shared.lib.errors import InvalidInput

__all__ = ["AGENTS", "agent_class"]

AGENTS: dict[str, type[Agent]] = {
    cls.name: cls
    for cls in (
        OrchestratorAgent,
        CodeReviewAgent,
        CicdAgent,
        InfrastructureAgent,
        DocumentationAgent,
        FeatureDevAgent,
    )
}


def agent_class(name: str) -> type[Agent]:
    """The agent class called ``name``, or an error listing the known ones."""
    try:
        return AGENTS[name]
    except KeyError:
        raise InvalidInput(f"unknown agent {name!r}; choose one of {', '.join(sorted(AGENTS))}", field="name") from None
