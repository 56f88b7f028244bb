"""Reviewing a change between two revisions: ruff on the changed Python files,
and a scan of the added lines for secrets, conflict markers and oversized files.

A finding is error-level when it should block a merge: a leaked secret, a
conflict marker, an oversized file, or a ruff rule that signals a bug rather
than a style preference (see :func:`_ruff_severity`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agents.work.git import (
    AddedLine,
    added_lines,
    changed_files,
    file_sizes,
    link_targets,
    resolve_revision,
    worktree,
)
from agents.work.process import run_process

_log = logging.getLogger(__name__)

__all__ = ["Finding", "ReviewResult", "review_change", "scan_added_lines"]

#: Style-only rule prefixes: reported, but they never block approval.
_STYLE_PREFIXES = ("W", "E1", "E2", "E3", "E5", "I", "D", "UP", "N", "C4", "C90", "SIM", "RUF", "PT", "Q", "COM")

_SECRET_PATTERNS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("secret/aws-access-key-id", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b"), "AWS access key id"),
    (
        "secret/private-key",
        re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----"),
        "private key block",
    ),
    ("secret/github-token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"), "GitHub token"),
    ("secret/slack-token", re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}\b"), "Slack token"),
    ("secret/api-key", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"), "API secret key"),
    (
        "secret/generic-token",
        re.compile(
            r"(?i)\b[\w.-]*(?:api[_-]?key|secret|token|passw(?:or)?d|auth)[\w.-]*\s*[:=]\s*"
            r"[\"']([A-Za-z0-9_\-/+=.]{16,})[\"']"
        ),
        "hard-coded credential",
    ),
)
_CONFLICT_MARKER = re.compile(r"^(?:<{7}|>{7})(?: |$)|^={7}$")


@dataclass(frozen=True)
class Finding:
    """One problem, located in a file of the new revision."""

    file: str
    line: int
    rule: str
    severity: str  # "error" blocks approval; "warning" and "info" do not
    message: str


@dataclass
class ReviewResult:
    """Findings over the change and whether it may be merged as is."""

    base: str
    head: str
    files_changed: list[str]
    python_files: list[str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def approved(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for f in self.findings if f.severity == s) for s in ("error", "warning", "info")}
        return {
            "base": self.base,
            "head": self.head,
            "approved": self.approved,
            "files_changed": self.files_changed,
            "python_files": self.python_files,
            "counts": counts,
            "findings": [asdict(f) for f in self.findings],
        }


def _ruff_findings(stdout: str, tree: Path) -> list[Finding]:
    findings = []
    for item in json.loads(stdout or "[]"):
        path = Path(item["filename"])
        file = str(path.relative_to(tree)) if path.is_relative_to(tree) else str(path)
        line = int((item.get("location") or {}).get("row") or 1)
        code = item.get("code")
        findings.append(Finding(file, line, f"ruff/{code or 'syntax'}", _ruff_severity(code), item["message"]))
    return findings


def _ruff_severity(code: str | None) -> str:
    if not code:  # ruff reports a syntax error without a code
        return "error"
    return "warning" if code.startswith(_STYLE_PREFIXES) else "error"


async def _ruff(tree: Path, files: list[str], *, timeout_s: float) -> list[Finding]:
    if not files:
        return []
    args = [sys.executable, "-m", "ruff", "check", "--no-cache", "--exit-zero", "--output-format=json", "--", *files]
    result = await run_process(args, cwd=tree, timeout_s=timeout_s)
    if result.returncode != 0:
        # Its message stays in the log: ruff quotes the file it could not read, and a repository's
        # configuration may point it at any file the agent can read (a link, an `extend`).
        _log.warning("ruff exited with %s in %s: %s", result.returncode, tree, result.stderr.strip()[-2000:])
        message = (
            f"ruff could not run (exit {result.returncode}): check the repository's ruff configuration "
            "(ruff.toml, .ruff.toml, pyproject.toml); the code-review agent's log has ruff's message"
        )
        return [Finding(files[0], 1, "ruff/failed", "error", message)]
    return _ruff_findings(result.stdout, tree)


def scan_added_lines(lines: list[AddedLine]) -> list[Finding]:
    """Secrets and merge-conflict markers among the lines a change adds."""
    findings: list[Finding] = []
    for added in lines:
        for rule, pattern, label in _SECRET_PATTERNS:
            if pattern.search(added.text):
                message = f"possible {label} added; remove it and rotate the credential"
                findings.append(Finding(added.file, added.line, rule, "error", message))
                break
        if _CONFLICT_MARKER.match(added.text):
            message = "merge-conflict marker left in the file; resolve the conflict"
            findings.append(Finding(added.file, added.line, "conflict-marker", "error", message))
    return findings


def _oversized(sizes: dict[str, int], *, max_file_bytes: int) -> list[Finding]:
    return [
        Finding(path, 1, "file-too-large", "error", f"{size} bytes exceeds the limit of {max_file_bytes} bytes")
        for path, size in sorted(sizes.items())
        if size > max_file_bytes
    ]


def _leaves_repository(path: str, target: str) -> bool:
    """Whether a link at ``path`` (relative to the top) to ``target`` points out of the repository."""
    if posixpath.isabs(target):
        return True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return resolved == ".." or resolved.startswith("../")


def _outside_links(links: dict[str, str]) -> list[Finding]:
    return [
        Finding(path, 1, "symlink-outside-repo", "error",
                f"symbolic link to {target}, outside the repository; commit the file itself or point inside")
        for path, target in sorted(links.items())
        if _leaves_repository(path, target)
    ]  # fmt: skip


async def review_change(
    repo: Path, base: str, head: str, *, max_file_bytes: int = 1024 * 1024, timeout_s: float = 120.0
) -> ReviewResult:
    """Review what ``head`` changes over ``base`` in ``repo``; ruff runs in a worktree of ``head``.

    Symbolic links are not linted: their blob is a path, not Python, and ruff, given the
    checked-out link, would read the file it points at (``/etc/passwd``, say) from outside
    the repository. A link that leaves the repository is an error-level finding instead."""
    base_sha = await resolve_revision(repo, base, field="base")
    head_sha = await resolve_revision(repo, head, field="head")
    files = await changed_files(repo, base_sha, head_sha)
    links = await link_targets(repo, head_sha, files)
    python = [f for f in files if f.endswith((".py", ".pyi"))]
    result = ReviewResult(base_sha, head_sha, files, python)
    result.findings.extend(scan_added_lines(await added_lines(repo, base_sha, head_sha)))
    result.findings.extend(_oversized(await file_sizes(repo, head_sha, files), max_file_bytes=max_file_bytes))
    result.findings.extend(_outside_links(links))
    if lint := [f for f in python if f not in links]:
        async with worktree(repo, head_sha) as tree:
            result.findings.extend(await _ruff(tree, lint, timeout_s=timeout_s))
    result.findings.sort(key=lambda f: (f.file, f.line, f.rule))
    return result
