"""The orchestrator as an agent: the reference ``orchestrator`` agent's skills plus
``START_WORKFLOW``, which launches a workflow exactly as ``POST /workflows`` does."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agents.orchestrator_agent import OrchestratorAgent
from agents.sdk.agent import skill
from shared.lib.errors import ServiceUnavailable

__all__ = ["StartWorkflowInput", "WorkflowOrchestratorAgent"]


class StartWorkflowInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow_type: str = Field(min_length=1, max_length=100)
    input: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class WorkflowOrchestratorAgent(OrchestratorAgent):
    """``orchestrator`` served by an orchestrator replica, which can start workflows."""

    @skill(
        "START_WORKFLOW",
        description="Launch a workflow; same validation and idempotency as POST /workflows.",
        tags=("workflow",),
    )
    async def start_workflow(self, payload: StartWorkflowInput) -> dict[str, Any]:
        orch = self.services.extras.get("orchestrator")
        if orch is None:
            raise ServiceUnavailable("this orchestrator replica is still starting; retry in a moment")
        record, created = await orch.launch(
            payload.workflow_type, payload.input, idempotency_key=payload.idempotency_key
        )
        return {"workflow_id": record.workflow_id, "status": record.status, "created": created}
