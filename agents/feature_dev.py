"""The feature-dev agent: GENERATE_CODE (a module and its test from templates,
or from the LLM when one is configured) and REFACTOR_CODE (``ruff check --fix``
and ``ruff format``, returning the diff)."""

from __future__ import annotations

import ast
import asyncio
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agents.sdk.agent import Agent, skill
from agents.work.git import repository
from agents.work.scaffold import refactor_files, render_scaffold, write_scaffold

__all__ = ["FeatureDevAgent", "GenerateCodeInput", "RefactorCodeInput"]

_CODE_INSTRUCTIONS = (
    "You write Python 3.11 modules. Answer with the complete source of the module only, in one "
    "```python fenced block. Define every function named in the request, with a docstring."
)
_FENCE = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)


class GenerateCodeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_path: str = Field(min_length=1)
    module: str = Field(min_length=1, max_length=200, description="dotted module name, e.g. app.billing")
    functions: list[str] = Field(default_factory=list, max_length=100)
    description: str = Field(default="", max_length=4000)
    write: bool = Field(default=True, description="write the files; false only returns them")


class RefactorCodeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_path: str = Field(min_length=1)
    files: list[str] = Field(min_length=1, max_length=1000)


def _code_from(answer: str | None, functions: list[str]) -> str | None:
    """The LLM's module, only if it parses and defines every requested function."""
    if not answer:
        return None
    match = _FENCE.search(answer)
    source = (match.group(1) if match else answer).strip() + "\n"
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    return source if set(functions) <= defined else None


class FeatureDevAgent(Agent):
    name = "feature-dev"
    version = "1.0.0"
    description = "Scaffolds modules with their tests and refactors code with ruff."

    @skill(
        "GENERATE_CODE",
        description="Scaffold a module and its pytest file from templates (the LLM writes the module when "
        "configured, kept only if it parses and defines the requested functions). Never overwrites.",
        tags=("codegen", "scaffold", "python"),
    )
    async def generate_code(self, payload: GenerateCodeInput) -> dict[str, Any]:
        repo = await repository(payload.repo_path)
        prompt = f"Module {payload.module}: {payload.description}\nFunctions: {', '.join(payload.functions)}"
        body = _code_from(await self.think(_CODE_INSTRUCTIONS, prompt), payload.functions)
        files = render_scaffold(payload.module, payload.functions, description=payload.description, body=body)
        written = await asyncio.to_thread(write_scaffold, repo, files) if payload.write else []
        return {**files.as_dict(), "written": written, "generator": "llm" if body else "template"}

    @skill(
        "REFACTOR_CODE",
        description="Run ruff check --fix and ruff format on the given files of a repository; returns the "
        "unified diff of what changed and the findings ruff could not fix.",
        tags=("refactor", "ruff", "format"),
    )
    async def refactor_code(self, payload: RefactorCodeInput) -> dict[str, Any]:
        repo = await repository(payload.repo_path)
        return (await refactor_files(repo, payload.files)).as_dict()
