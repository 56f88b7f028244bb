"""The documentation agent: GENERATE_DOCS (an API reference from the AST, a user
guide from the README and the command-line help, a deployment guide from
``deploy/``) and UPDATE_README (a generated module list inside README.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agents.sdk.agent import Agent, skill
from agents.work.docs import api_reference, deployment_guide, update_readme, user_guide
from agents.work.git import repository

__all__ = ["DocumentationAgent", "GenerateDocsInput", "UpdateReadmeInput"]

_PROSE_INSTRUCTIONS = (
    "You are a technical writer. Write a short introduction (at most two paragraphs) for the "
    "document below, for a developer new to the project. Do not repeat the reference itself."
)


class GenerateDocsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_path: str = Field(min_length=1)
    doc_type: Literal["api", "guide", "deployment"] = "api"
    modules: list[str] | None = Field(default=None, max_length=1000, description="dotted names or paths (api only)")


class GenerateDocsOutput(BaseModel):
    doc_type: str
    markdown: str
    modules: list[str]
    functions: list[str]
    prose: str | None = None


class UpdateReadmeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_path: str = Field(min_length=1)
    write: bool = Field(default=True, description="write README.md; false only returns the new text")


class DocumentationAgent(Agent):
    name = "documentation"
    version = "1.0.0"
    description = "Generates Markdown documentation from Python sources, READMEs, command help and deploy files."

    @skill(
        "GENERATE_DOCS",
        description="doc_type api: a Markdown API reference from the AST (modules, classes, functions, "
        "signatures, docstrings); guide: from the README and the CLI help; deployment: from deploy/.",
        tags=("docs", "markdown", "ast"),
        output=GenerateDocsOutput,
    )
    async def generate_docs(self, payload: GenerateDocsInput) -> dict[str, Any]:
        repo = await repository(payload.repo_path)
        modules: list[str] = []
        functions: list[str] = []
        if payload.doc_type == "api":
            markdown, summaries = await api_reference(repo, modules=payload.modules)
            modules = [s.module for s in summaries]
            functions = [f"{s.module}.{f.name}" for s in summaries for f in s.functions if s.public(f.name)]
        elif payload.doc_type == "guide":
            markdown = await user_guide(repo)
        else:
            markdown = await deployment_guide(repo)
        prose = await self.think(_PROSE_INSTRUCTIONS, markdown[:20000])
        return {"doc_type": payload.doc_type, "markdown": markdown, "modules": modules, "functions": functions,
                "prose": prose}  # fmt: skip

    @skill(
        "UPDATE_README",
        description="Regenerate the module list between the agent-orchestrator markers of README.md "
        "(appended when absent); the rest of the README is left as it is.",
        tags=("docs", "readme"),
    )
    async def update_readme(self, payload: UpdateReadmeInput) -> dict[str, Any]:
        repo = await repository(payload.repo_path)
        text, changed = await update_readme(repo, write=payload.write)
        return {"path": str(repo / "README.md"), "changed": changed, "written": changed and payload.write,
                "readme": text}  # fmt: skip
