"""Documentation generated from a repository: an API reference from the AST, a
user guide from the README and the command-line help, a deployment guide from
``deploy/``, and a generated section kept up to date inside the README.

Everything is deterministic: the same tree gives the same Markdown.

Every file read or written is inside the repository (:func:`agents.work.paths.inside`):
a symbolic link that leaves it (a README linked to ``/etc/passwd``, a module linked
to another project's file) refuses the request with a 422 naming the link, as
EXPLAIN_CODE and REFACTOR_CODE do; it is never read, published or written through.
Refused rather than skipped: a module list or README that silently lacks a file
looks complete, and a link leaving a repository is a mistake (or a probe) its
owner should see. Links to files that stay inside are followed. A link to a directory is
not walked into when the tree is listed (``Path.rglob`` does not follow one), so the files
under it are left out, wherever it points.
"""

from __future__ import annotations

import asyncio
import re
import sys
import tomllib
from pathlib import Path

from agents.work.atomic import write_atomically
from agents.work.paths import inside
from agents.work.process import run_process
from agents.work.python_ast import ClassInfo, FunctionInfo, ModuleSummary, summarize_module
from shared.lib.errors import NotFound

__all__ = [
    "README_MARKERS",
    "api_reference",
    "deployment_guide",
    "find_modules",
    "update_readme",
    "user_guide",
]

#: The README section this project owns; everything outside the markers is left alone.
README_MARKERS = ("<!-- agent-orchestrator:api:start -->", "<!-- agent-orchestrator:api:end -->")
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist", ".tox", ".data"}
_CLI_HELP_TIMEOUT_S = 20.0
#: What a refusal of a link leaving the repository tells the caller to do.
_LINK_ADVICE = "it is a symbolic link to a file outside; remove the link or point it inside the repository"


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0] if doc and doc.strip() else ""


def find_modules(root: Path, modules: list[str] | None = None) -> list[Path]:
    """Python files of ``root`` (tests and virtualenvs left out), or the ones named in ``modules``."""
    if modules:
        return [_resolve_module(root, m) for m in modules]
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if _SKIP_DIRS.intersection(rel) or rel[0] in {"tests", "test"} or path.name.startswith("test_"):
            continue
        inside(root, path.relative_to(root), field="repo_path", advice=_LINK_ADVICE)
        files.append(path)
    return files


def _resolve_module(root: Path, module: str) -> Path:
    candidates = [root / module] if module.endswith(".py") else []
    dotted = Path(*module.split("."))
    candidates += [root / f"{dotted}.py", root / dotted / "__init__.py", root / "src" / f"{dotted}.py"]
    for candidate in candidates:
        if candidate.is_file():
            shown = candidate.relative_to(root) if candidate.is_relative_to(root) else candidate  # "/x.py" as given
            inside(root, shown, field="modules", advice="name a module of the repository")
            return candidate
    raise NotFound(f"modules: {module!r} is not a module of {root.name}; name it dotted or as a path", field="modules")


def _function_md(fn: FunctionInfo, level: str) -> list[str]:
    lines = [f"{level} `{fn.name}`", "", "```python", fn.signature, "```", ""]
    return lines + ([fn.docstring, ""] if fn.docstring else [])


def _class_md(cls: ClassInfo, summary: ModuleSummary) -> list[str]:
    bases = f"({', '.join(cls.bases)})" if cls.bases else ""
    lines = [f"### class `{cls.name}{bases}`", ""]
    lines += [cls.docstring, ""] if cls.docstring else []
    for method in cls.methods:
        if not method.name.startswith("_") or method.name == "__init__":
            lines += _function_md(method, "####")
    return lines


def _module_md(summary: ModuleSummary) -> list[str]:
    lines = [f"## `{summary.module}`", "", f"*{summary.path}*, {summary.lines} lines", ""]
    lines += [summary.docstring, ""] if summary.docstring else []
    for cls in summary.classes:
        lines += _class_md(cls, summary) if summary.public(cls.name) else []
    for fn in summary.functions:
        lines += _function_md(fn, "###") if summary.public(fn.name) else []
    return lines


def _summaries(root: Path, modules: list[str] | None) -> list[ModuleSummary]:
    return [summarize_module(root, path) for path in find_modules(root, modules)]


def _api_reference_sync(root: Path, modules: list[str] | None) -> tuple[str, list[ModuleSummary]]:
    summaries = _summaries(root, modules)
    lines = [f"# API reference: {root.name}", ""]
    lines += [f"- `{s.module}`: {_first_line(s.docstring)}".rstrip(": ") for s in summaries]
    lines.append("")
    for summary in summaries:
        lines += _module_md(summary)
    return "\n".join(lines).rstrip() + "\n", summaries


async def api_reference(root: Path, *, modules: list[str] | None = None) -> tuple[str, list[ModuleSummary]]:
    """Markdown reference of the public classes and functions of ``root`` (or of ``modules``)."""
    return await asyncio.to_thread(_api_reference_sync, root, modules)


def _scripts(root: Path) -> dict[str, str]:
    if not (root / "pyproject.toml").is_file():
        return {}
    pyproject = inside(root, "pyproject.toml", field="repo_path", advice=_LINK_ADVICE)
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError:
        return {}
    scripts = data.get("project", {}).get("scripts", {})
    return {str(k): str(v) for k, v in scripts.items()}


async def _cli_help(root: Path, target: str) -> str:
    module, _, attr = target.partition(":")
    if not re.fullmatch(r"[\w.]+", module) or not re.fullmatch(r"[\w.]*", attr):
        return ""
    code = f"import sys; sys.argv=['prog','--help']; import {module} as m; m.{attr or 'main'}()"
    env = {"PYTHONPATH": f"{root}:{root / 'src'}", "PATH": "/usr/bin:/bin", "NO_COLOR": "1", "COLUMNS": "100"}
    result = await run_process([sys.executable, "-c", code], cwd=root, env=env, timeout_s=_CLI_HELP_TIMEOUT_S)
    return result.stdout.strip() if result.returncode == 0 else ""


async def user_guide(root: Path) -> str:
    """A user guide: the README, then the ``--help`` of each command the project declares."""
    name = next((n for n in ("README.md", "README.rst", "README.txt", "README") if (root / n).is_file()), None)
    readme = inside(root, name, field="repo_path", advice=_LINK_ADVICE) if name is not None else None
    lines = [f"# User guide: {root.name}", ""]
    if readme is not None:
        lines += [readme.read_text(encoding="utf-8", errors="replace").strip(), ""]
    scripts = _scripts(root)
    if scripts:
        lines += ["## Commands", ""]
    for name, target in sorted(scripts.items()):
        help_text = await _cli_help(root, target)
        lines += [f"### `{name}`", "", f"Entry point `{target}`.", ""]
        lines += ["```text", help_text, "```", ""] if help_text else []
    if readme is None and not scripts:
        message = f"doc_type: {root.name} has neither a README nor declared commands to build a guide from"
        raise NotFound(message, field="doc_type")
    return "\n".join(lines).rstrip() + "\n"


def _dockerfile_md(path: Path, root: Path) -> list[str]:
    keep = ("FROM", "EXPOSE", "CMD", "ENTRYPOINT", "HEALTHCHECK", "ENV", "USER")
    directives = [
        line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip().upper().startswith(keep)
    ]
    return [f"### `{path.relative_to(root)}`", "", "```dockerfile", *directives, "```", ""]


def _manifest_md(path: Path, root: Path) -> list[str]:
    text = path.read_text(errors="replace")
    kinds = sorted(set(re.findall(r"^kind:\s*(\S+)", text, re.MULTILINE)))
    services = re.findall(r"^  ([A-Za-z0-9_.-]+):\s*$", text, re.MULTILINE) if "services:" in text else []
    lines = [f"### `{path.relative_to(root)}`", ""]
    lines += [f"Kubernetes kinds: {', '.join(kinds)}.", ""] if kinds else []
    lines += [f"Compose services: {', '.join(services)}.", ""] if services else []
    return lines


def _deployment_guide_sync(root: Path) -> str:
    deploy = root / "deploy"
    if not deploy.is_dir():
        raise NotFound(f"repo_path: {root.name} has no deploy/ directory to document", field="doc_type")
    inside(root, "deploy", field="repo_path", advice=_LINK_ADVICE)
    lines = [f"# Deployment guide: {root.name}", "", "Files under `deploy/`:", ""]
    files = sorted(p for p in deploy.rglob("*") if p.is_file())
    for path in files:
        inside(root, path.relative_to(root), field="repo_path", advice=_LINK_ADVICE)
    lines += [f"- `{p.relative_to(root)}`" for p in files] + [""]
    for path in files:
        if path.name.startswith("Dockerfile") or path.suffix == ".dockerfile":
            lines += _dockerfile_md(path, root)
        elif path.suffix in {".yml", ".yaml"}:
            lines += _manifest_md(path, root)
    return "\n".join(lines).rstrip() + "\n"


async def deployment_guide(root: Path) -> str:
    """A deployment guide from the Dockerfiles, compose files and manifests under ``deploy/``."""
    return await asyncio.to_thread(_deployment_guide_sync, root)


def _section(summaries: list[ModuleSummary]) -> str:
    lines = [README_MARKERS[0], "## Modules", ""]
    for s in summaries:
        public = [f.name for f in s.functions if s.public(f.name)] + [c.name for c in s.classes if s.public(c.name)]
        doc = _first_line(s.docstring)
        lines.append(f"- `{s.module}`" + (f": {doc}" if doc else "") + (f" ({', '.join(public)})" if public else ""))
    return "\n".join([*lines, "", README_MARKERS[1]])


def _update_readme_sync(root: Path, write: bool) -> tuple[str, bool]:
    readme = root / "README.md"
    if readme.is_symlink() or readme.exists():  # written through a link that stays inside, not over it
        readme = inside(root, "README.md", field="repo_path", advice=_LINK_ADVICE)
    old = readme.read_text(encoding="utf-8") if readme.is_file() else f"# {root.name}\n"
    section = _section(_summaries(root, None))
    start, end = (re.escape(m) for m in README_MARKERS)
    pattern = re.compile(f"{start}.*?{end}", re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _: section, old, count=1)
    else:
        new = old.rstrip() + "\n\n" + section + "\n"
    changed = new != old
    if changed and write:
        write_atomically(readme, new.encode("utf-8"))
    return new, changed


async def update_readme(root: Path, *, write: bool = True) -> tuple[str, bool]:
    """Regenerate the module list between :data:`README_MARKERS` in README.md; returns (text, changed)."""
    return await asyncio.to_thread(_update_readme_sync, root, write)
