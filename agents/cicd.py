"""The cicd agent: RUN_PIPELINE (the test command in an isolated worktree),
VALIDATE_BUILD (every Python file compiles) and DEPLOY_ARTIFACT (``git archive``
into the artifact store under ``data_dir/artifacts``)."""

from __future__ import annotations

import shlex
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents.sdk.agent import Agent, skill
from agents.work.git import repository
from agents.work.pipeline import PipelineResult, package_revision, run_pipeline, validate_build

__all__ = ["CicdAgent", "DeployArtifactInput", "RunPipelineInput", "ValidateBuildInput"]


class _RepoRevision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_path: str = Field(min_length=1)
    revision: str = Field(default="HEAD", min_length=1, max_length=256)


class RunPipelineInput(_RepoRevision):
    command: str | list[str] | None = Field(
        default=None, description="test command; default: the repository's declared one, else pytest"
    )
    timeout_s: float | None = Field(default=None, gt=0, le=24 * 3600, allow_inf_nan=False)

    @field_validator("command")
    @classmethod
    def _a_command(cls, command: str | list[str] | None) -> str | list[str] | None:
        """An empty command is a mistake, not a request for the default (it ran pytest)."""
        if command is None:
            return None
        args = shlex.split(command) if isinstance(command, str) else command  # unbalanced quotes: a ValueError
        if not args or not args[0].strip():
            raise ValueError("give the command to run, or leave command out for the repository's own")
        return command


class ValidateBuildInput(_RepoRevision):
    pass


class DeployArtifactInput(_RepoRevision):
    pass


class CicdAgent(Agent):
    name = "cicd"
    version = "1.0.0"
    description = "Runs a repository's tests in an isolated worktree, validates builds and packages artifacts."

    @skill(
        "RUN_PIPELINE",
        description="Run the test command of a revision in an isolated git worktree, with a timeout; returns "
        "pass/fail, the passed and failed counts, the duration and the log tail.",
        tags=("ci", "tests", "git"),
        output=PipelineResult,
    )
    async def run_pipeline(self, payload: RunPipelineInput) -> dict[str, Any]:
        repo = await repository(payload.repo_path)
        timeout_s = payload.timeout_s or self.settings.pipeline_timeout_s
        result = await run_pipeline(repo, payload.revision, command=payload.command, timeout_s=timeout_s)
        return result.as_dict()

    @skill(
        "VALIDATE_BUILD",
        description="Compile every Python file of a revision and check its pyproject.toml parses.",
        tags=("ci", "build", "python"),
    )
    async def validate_build(self, payload: ValidateBuildInput) -> dict[str, Any]:
        repo = await repository(payload.repo_path)
        return (await validate_build(repo, payload.revision)).as_dict()

    @skill(
        "DEPLOY_ARTIFACT",
        description="Package a revision with git archive into the artifact store; returns its path and sha256.",
        tags=("ci", "artifact", "package"),
    )
    async def deploy_artifact(self, payload: DeployArtifactInput) -> dict[str, Any]:
        repo = await repository(payload.repo_path)
        store = self.settings.data_dir / "artifacts"
        return (await package_revision(repo, payload.revision, store=store)).as_dict()
