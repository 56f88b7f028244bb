"""Git operations the agents need: revisions, diffs, worktrees and archives.

Everything runs the real ``git`` binary through :func:`run_process`, so a huge
repository never blocks the event loop and every call has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from agents.work.process import ProcessResult, run_process
from shared.lib.errors import InvalidInput, NotFound, OrchestratorError

__all__ = [
    "AddedLine",
    "GitError",
    "added_lines",
    "archive",
    "changed_files",
    "file_sizes",
    "git",
    "link_targets",
    "repository",
    "resolve_revision",
    "worktree",
]

_log = logging.getLogger(__name__)

#: Default bound of one git call; archives and worktrees of big repositories take longer.
_GIT_TIMEOUT_S = 60.0
_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,\d+)? @@")


class GitError(OrchestratorError):
    """git refused the operation; the message carries its own explanation."""

    status_code = 422
    code = "git_error"


@dataclass(frozen=True)
class AddedLine:
    """One line a diff adds, with its number in the new file."""

    file: str
    line: int
    text: str


async def git(repo: Path, *args: str, timeout_s: float = _GIT_TIMEOUT_S) -> ProcessResult:
    """Run ``git -C repo args...``; a non-zero exit raises :class:`GitError` with git's message."""
    result = await run_process(["git", "-c", "core.quotepath=off", "-C", str(repo), *args], timeout_s=timeout_s)
    if not result.ok:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise GitError(f"git {args[0]} failed: {message[-1] if message else 'exit ' + str(result.returncode)}")
    return result


async def repository(path: str | Path, *, field: str = "repo_path") -> Path:
    """The top level of the git repository at ``path`` (absolute: a relative one would be read in
    this agent's directory, not the caller's), or an error naming ``field``."""
    repo = Path(path)
    if not repo.is_absolute():
        raise InvalidInput(f"{field}: {str(path)!r} is relative; give the repository's absolute path", field=field)
    if not await asyncio.to_thread(os.path.isdir, repo):
        raise NotFound(f"{field}: {path} is not a directory; pass the path of a git repository", field=field)
    try:
        top = await git(repo, "rev-parse", "--show-toplevel")
    except GitError as e:
        raise InvalidInput(f"{field}: {path} is not a git repository ({e.message})", field=field) from e
    return Path(top.stdout.strip())


async def resolve_revision(repo: Path, revision: str, *, field: str = "revision") -> str:
    """The full commit id of ``revision``, or an error naming ``field``."""
    if revision.startswith("-"):
        raise InvalidInput(f"{field}: a revision cannot start with '-'", field=field)
    try:
        result = await git(repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    except GitError as e:
        raise InvalidInput(f"{field}: {revision!r} is not a commit of {repo}", field=field) from e
    return result.stdout.strip()


async def changed_files(repo: Path, base: str, head: str) -> list[str]:
    """Paths added, copied, modified or renamed between ``base`` and ``head`` (deleted ones left out)."""
    result = await git(repo, "diff", "--name-only", "--no-renames", "--diff-filter=d", base, head, "--")
    return [line for line in result.stdout.splitlines() if line]


async def added_lines(repo: Path, base: str, head: str) -> list[AddedLine]:
    """Every line ``head`` adds over ``base``, with its file and line number in ``head``."""
    result = await git(repo, "diff", "--unified=0", "--no-color", "--no-renames", "--no-ext-diff", base, head, "--")
    lines: list[AddedLine] = []
    file: str | None = None
    number = 0
    for raw in result.stdout.splitlines():
        if raw.startswith("+++ "):
            file = raw[6:] if raw.startswith("+++ b/") else None
        elif (hunk := _HUNK.match(raw)) is not None:
            number = int(hunk.group(1))
        elif raw.startswith("+") and file is not None:
            lines.append(AddedLine(file, number, raw[1:]))
            number += 1
    return lines


async def file_sizes(repo: Path, revision: str, paths: list[str]) -> dict[str, int]:
    """Size in bytes of each of ``paths`` at ``revision`` (submodules left out)."""
    if not paths:
        return {}
    result = await git(repo, "ls-tree", "-l", "-z", revision, "--", *paths)
    sizes: dict[str, int] = {}
    for entry in result.stdout.split("\0"):
        meta, _, path = entry.partition("\t")
        parts = meta.split()
        if len(parts) == 4 and parts[1] == "blob" and parts[3].isdigit():
            sizes[path] = int(parts[3])
    return sizes


async def link_targets(repo: Path, revision: str, paths: list[str]) -> dict[str, str]:
    """The target of each of ``paths`` that is a symbolic link at ``revision`` (git mode 120000)."""
    if not paths:
        return {}
    result = await git(repo, "ls-tree", "-z", revision, "--", *paths)
    targets: dict[str, str] = {}
    for entry in result.stdout.split("\0"):
        meta, _, path = entry.partition("\t")
        parts = meta.split()
        if len(parts) == 3 and parts[0] == "120000":
            targets[path] = (await git(repo, "cat-file", "blob", parts[2])).stdout
    return targets


@contextlib.asynccontextmanager
async def worktree(repo: Path, revision: str, *, timeout_s: float = _GIT_TIMEOUT_S) -> AsyncIterator[Path]:
    """A detached, throw-away ``git worktree`` of ``revision``, removed on exit whatever happens."""
    parent = Path(await asyncio.to_thread(_scratch_dir))
    path = parent / "tree"
    try:
        await git(repo, "worktree", "add", "--detach", "--force", str(path), revision, timeout_s=timeout_s)
        yield path
    finally:
        await _remove_worktree(repo, path)
        shutil.rmtree(parent, ignore_errors=True)


def _scratch_dir() -> str:
    """A fresh temporary directory, symlinks resolved (tools report resolved paths)."""
    return os.path.realpath(tempfile.mkdtemp(prefix="ao-worktree-"))


async def _remove_worktree(repo: Path, path: Path) -> None:
    try:
        await git(repo, "worktree", "remove", "--force", str(path))
    except OrchestratorError as e:
        _log.warning("could not remove worktree %s (%s); pruning instead", path, e.message)
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OrchestratorError):
            await git(repo, "worktree", "prune")


async def archive(repo: Path, revision: str, destination: Path, *, timeout_s: float = 300.0) -> None:
    """Write ``revision`` as a ``.tar.gz`` to ``destination`` (git archive, gzip level 6)."""
    await git(repo, "archive", "--format=tar.gz", f"--output={destination}", revision, timeout_s=timeout_s)
