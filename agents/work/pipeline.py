"""CI work on a revision: run the test command in an isolated worktree, check
that the tree builds, and package it into the artifact store.

Choosing the test command, in order:

1. the ``command`` given with the request;
2. ``[tool.agent-orchestrator] test-command`` in the repository's ``pyproject.toml``;
3. ``make test`` when a ``Makefile`` has a ``test:`` target;
4. ``python -m pytest -q`` with the agent's own interpreter.

The command is split with :mod:`shlex` and run without a shell, in its own
process group, killed as a group when the timeout fires.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shlex
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, Field

from agents.work.atomic import temp_beside, write_atomically
from agents.work.git import archive, resolve_revision, worktree
from agents.work.process import run_process
from shared.lib.errors import InvalidInput

__all__ = [
    "Artifact",
    "BuildResult",
    "PipelineResult",
    "choose_test_command",
    "file_sha256",
    "package_revision",
    "run_pipeline",
    "validate_build",
]

_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)\b")
_LOG_TAIL_LINES = 60
_MAKE_TEST = re.compile(r"^test\s*:", re.MULTILINE)


class PipelineResult(BaseModel):
    """One pipeline run: the cicd agent's RUN_PIPELINE output (and its declared schema)."""

    status: str = Field(description="passed or failed")
    success: bool
    revision: str
    command: list[str]
    command_source: str
    exit_code: int
    passed: int
    failed: int
    errors: int
    skipped: int
    duration_s: float
    timed_out: bool
    log_tail: str

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass
class BuildResult:
    revision: str
    files_checked: int
    errors: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "valid": not self.errors}


@dataclass(frozen=True)
class Artifact:
    path: str
    sha256: str
    revision: str
    size_bytes: int
    created: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _declared_command(tree: Path) -> list[str] | None:
    pyproject = tree / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError:
        return None
    declared = data.get("tool", {}).get("agent-orchestrator", {}).get("test-command")
    if isinstance(declared, str) and declared.strip():
        return shlex.split(declared)
    if isinstance(declared, list) and declared and all(isinstance(p, str) for p in declared):
        return list(declared)
    return None


def choose_test_command(tree: Path, command: str | list[str] | None = None) -> tuple[list[str], str]:
    """The command to run in ``tree`` and where it came from (request, pyproject, makefile, default)."""
    if command:
        return (shlex.split(command) if isinstance(command, str) else list(command)), "request"
    if (declared := _declared_command(tree)) is not None:
        return declared, "pyproject"
    makefile = tree / "Makefile"
    if makefile.is_file() and _MAKE_TEST.search(makefile.read_text(encoding="utf-8", errors="replace")):
        return ["make", "test"], "makefile"
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], "default"


def _counts(log: str) -> dict[str, int]:
    """Counts from the last summary line (``1 failed, 2 passed in 0.12s``) of a pytest-style log."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    summary = next((line for line in reversed(log.splitlines()) if _COUNT.search(line)), "")
    for number, word in _COUNT.findall(summary):
        key = "errors" if word.startswith("error") else word
        if key in counts:
            counts[key] = int(number)
    return counts


def _child_env() -> dict[str, str]:
    """The agent's environment minus what would leak into the repository's own test run."""
    drop = ("PYTEST_", "AO_", "DATABASE_URL", "REDIS_URL", "REGISTRY_URL")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


async def run_pipeline(
    repo: Path, revision: str, *, command: str | list[str] | None = None, timeout_s: float = 600.0
) -> PipelineResult:
    """Run the test command of ``revision`` in a fresh worktree; a timeout is a failed run."""
    sha = await resolve_revision(repo, revision)
    async with worktree(repo, sha) as tree:
        args, source = choose_test_command(tree, command)
        started = time.monotonic()
        try:
            result = await run_process(
                args, cwd=tree, timeout_s=timeout_s, env=_child_env(), raise_on_timeout=False, merge_stderr=True
            )
        except FileNotFoundError as e:
            raise InvalidInput(f"command: {args[0]} was not found; give a command that exists", field="command") from e
        duration = time.monotonic() - started
    log = result.stdout.rstrip()  # stderr too, in the order written
    tail = "\n".join(log.splitlines()[-_LOG_TAIL_LINES:])
    counts = _counts(tail)
    success = result.returncode == 0 and not result.timed_out and counts["failed"] == counts["errors"] == 0
    return PipelineResult(
        status="passed" if success else "failed", success=success, revision=sha, command=args,
        command_source=source, exit_code=result.returncode, duration_s=round(duration, 3),
        timed_out=result.timed_out, log_tail=tail, **counts,
    )  # fmt: skip


def _compile_tree(tree: Path) -> tuple[int, list[dict[str, Any]]]:
    errors: list[dict[str, Any]] = []
    checked = 0
    for path in sorted(tree.rglob("*.py")):
        if ".git" in path.parts:
            continue
        checked += 1
        try:
            compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            line = getattr(e, "lineno", None) or 1
            errors.append({"file": str(path.relative_to(tree)), "line": line, "message": str(getattr(e, "msg", e))})
    return checked, errors


async def validate_build(repo: Path, revision: str) -> BuildResult:
    """Compile every Python file of ``revision`` (in a thread) and check its ``pyproject.toml`` parses."""
    sha = await resolve_revision(repo, revision)
    async with worktree(repo, sha) as tree:
        checked, errors = await asyncio.to_thread(_compile_tree, tree)
        pyproject = tree / "pyproject.toml"
        if pyproject.is_file():
            try:
                tomllib.loads(pyproject.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as e:
                errors.append({"file": "pyproject.toml", "line": 1, "message": str(e)})
    return BuildResult(sha, checked, errors)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _prepare_store(store: Path, target: Path) -> bool:
    """Create the store; whether ``target`` is already in it."""
    store.mkdir(parents=True, exist_ok=True)
    return target.exists()


def _write_manifest(artifact: Path, manifest: dict[str, Any], *, replace: bool) -> None:
    if not replace and artifact.with_name(artifact.name + ".json").exists():
        return
    write_atomically(artifact.with_name(artifact.name + ".json"), orjson.dumps(manifest, option=orjson.OPT_INDENT_2))


async def package_revision(repo: Path, revision: str, *, store: Path) -> Artifact:
    """``git archive`` ``revision`` into ``store``, atomically, with a JSON manifest beside it.

    Packaging the same revision twice returns the existing artifact (``created`` false).
    """
    sha = await resolve_revision(repo, revision)
    target = store / f"{repo.name}-{sha[:12]}.tar.gz"
    created = not await asyncio.to_thread(_prepare_store, store, target)
    if created:
        tmp = temp_beside(target)
        try:
            await archive(repo, sha, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    digest = await asyncio.to_thread(file_sha256, target)
    manifest = {"revision": sha, "sha256": digest, "repository": repo.name, "created_at": datetime.now(UTC).isoformat()}
    await asyncio.to_thread(_write_manifest, target, manifest, replace=created)
    size = await asyncio.to_thread(os.path.getsize, target)
    path = await asyncio.to_thread(os.path.realpath, target)
    return Artifact(path, digest, sha, size, created)
