"""The code-review agent: REVIEW_CODE (ruff and a diff scan between two
revisions) and EXPLAIN_CODE (a structural summary of a module from its AST)."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agents.sdk.agent import Agent, skill
from agents.work.git import repository
from agents.work.paths import inside
from agents.work.python_ast import summarize_source
from agents.work.review import review_change
from shared.lib.errors import NotFound

__all__ = ["CodeReviewAgent", "ExplainCodeInput", "ReviewCodeInput", "ReviewCodeOutput"]

_REVISION = Field(min_length=1, max_length=256)
_SUMMARY_INSTRUCTIONS = (
    "You are a code reviewer. Summarise the review findings below for the author in at most five "
    "sentences: what blocks the merge, what is style only, and what to do first."
)


class ReviewCodeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_path: str = Field(min_length=1)
    base: str = _REVISION
    head: str = _REVISION
    max_file_bytes: int | None = Field(default=None, gt=0)


class FindingOut(BaseModel):
    file: str
    line: int
    rule: str
    severity: str
    message: str


class ReviewCodeOutput(BaseModel):
    approved: bool
    base: str
    head: str
    files_changed: list[str]
    python_files: list[str]
    counts: dict[str, int]
    findings: list[FindingOut]
    summary: str | None = None


class ExplainCodeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_path: str = Field(min_length=1)
    path: str = Field(min_length=1, description="the module's file, relative to the repository")


class CodeReviewAgent(Agent):
    name = "code-review"
    version = "1.0.0"
    description = "Reviews changes between two git revisions with ruff and a scan for secrets, and explains modules."

    @skill(
        "REVIEW_CODE",
        description="Lint the Python files changed between base and head with ruff, and scan the diff for "
        "secrets, oversized files and merge-conflict markers. approved = no error-level finding.",
        tags=("review", "lint", "security", "git"),
        output=ReviewCodeOutput,
    )
    async def review_code(self, payload: ReviewCodeInput) -> dict[str, Any]:
        repo = await repository(payload.repo_path)
        limit = payload.max_file_bytes or self.settings.review_max_file_bytes
        result = (await review_change(repo, payload.base, payload.head, max_file_bytes=limit)).as_dict()
        lines = [f"{f['severity']} {f['file']}:{f['line']} {f['rule']} {f['message']}" for f in result["findings"]]
        prompt = f"approved={result['approved']}\n" + "\n".join(lines[:200])
        result["summary"] = await self.think(_SUMMARY_INSTRUCTIONS, prompt) if lines else None
        return result

    @skill(
        "EXPLAIN_CODE",
        description="A structural summary of one Python module from its AST: docstring, imports, constants, "
        "classes with their methods, and functions with their signatures.",
        tags=("ast", "explain", "python"),
    )
    async def explain_code(self, payload: ExplainCodeInput) -> dict[str, Any]:
        repo = await repository(payload.repo_path)
        file = inside(repo, payload.path, field="path")
        if not file.is_file():
            raise NotFound(f"path: {payload.path} is not a file of {repo.name}", field="path")
        source = await asyncio.to_thread(file.read_text, encoding="utf-8", errors="replace")
        module = payload.path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        return summarize_source(source, module=module, path=payload.path).as_dict()
