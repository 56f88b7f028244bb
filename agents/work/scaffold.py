"""Feature work on a repository: scaffold a module and its test from templates,
and refactor files with ``ruff check --fix`` and ``ruff format``.

Generated files never overwrite existing ones, and every path stays inside the
repository: a path that escapes it is refused, naming the field.
"""

from __future__ import annotations

import ast
import asyncio
import difflib
import keyword
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template
from typing import Any

from agents.work.paths import inside
from agents.work.process import run_process
from shared.lib.errors import Conflict, InvalidInput

__all__ = ["GeneratedFiles", "RefactorResult", "refactor_files", "render_scaffold", "write_scaffold"]

_MODULE_TEMPLATE = Template('''"""${description}"""

from __future__ import annotations

__all__ = [${exports}]
${functions}''')

_FUNCTION_TEMPLATE = Template('''

def ${name}(*args: object, **kwargs: object) -> dict[str, object]:
    """${name}: ${description}

    Returns the arguments it was called with, so callers can be wired before
    the behaviour is written.
    """
    return {"function": "${name}", "args": list(args), "kwargs": dict(kwargs)}
''')

_TEST_TEMPLATE = Template('''"""Tests of ${module}."""

from __future__ import annotations

${imports}
${tests}''')

_TEST_FUNCTION_TEMPLATE = Template('''

def test_${name}_echoes_its_arguments() -> None:
    """${name} returns the arguments it was called with."""
    assert ${name}(1, key="value") == {"function": "${name}", "args": [1], "kwargs": {"key": "value"}}
''')

_IMPORT_TEST_TEMPLATE = Template('''

def test_module_imports() -> None:
    """${module} imports."""
    assert ${module} is not None
''')

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class GeneratedFiles:
    module_path: str
    test_path: str
    module_source: str
    test_source: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RefactorResult:
    files: list[str]
    changed: list[str]
    diff: str
    remaining: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_names(module: str, functions: list[str]) -> None:
    parts = module.split(".")
    if not all(_IDENTIFIER.match(p) and not keyword.iskeyword(p) for p in parts):
        raise InvalidInput(f"module: {module!r} is not a dotted Python module name", field="module")
    for name in functions:
        if not _IDENTIFIER.match(name) or keyword.iskeyword(name):
            raise InvalidInput(f"functions: {name!r} is not a Python identifier", field="functions")


def render_scaffold(module: str, functions: list[str], *, description: str, body: str | None = None) -> GeneratedFiles:
    """The module ``module`` with ``functions`` and its pytest file; ``body`` replaces the templated module."""
    _check_names(module, functions)
    doc = description.replace('"""', "'''").strip() or f"The {module} module."
    exports = ", ".join(f'"{f}"' for f in functions)
    rendered = "".join(_FUNCTION_TEMPLATE.substitute(name=f, description=doc) for f in functions)
    source = body or _MODULE_TEMPLATE.substitute(description=doc, exports=exports, functions=rendered)
    ast.parse(source)  # the templates always parse; a generated body must too (the caller checks first)
    imports = f"from {module} import {', '.join(functions)}" if functions else f"import {module}  # noqa: F401"
    tests = "".join(_TEST_FUNCTION_TEMPLATE.substitute(name=f) for f in functions) if body is None else ""
    if not tests:
        tests = _IMPORT_TEST_TEMPLATE.substitute(module=module)
    test_source = _TEST_TEMPLATE.substitute(module=module, imports=imports, tests=tests)
    leaf = module.split(".")[-1]
    return GeneratedFiles(f"{module.replace('.', '/')}.py", f"tests/test_{leaf}.py", source, test_source)


def write_scaffold(root: Path, files: GeneratedFiles) -> list[str]:
    """Write the module, its test, and any missing package ``__init__.py``; refuses to overwrite."""
    module = inside(root, files.module_path, field="module")
    test = inside(root, files.test_path, field="module")
    for path in (module, test):
        if path.exists():
            message = f"module: {path.relative_to(root.resolve())} already exists; choose another name"
            raise Conflict(message, field="module")
    written = []
    for directory in list(module.relative_to(root.resolve()).parents)[:-1]:
        init = root / directory / "__init__.py"
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text("")
            written.append(str(init.relative_to(root)))
    for path, text in ((module, files.module_source), (test, files.test_source)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(str(path.relative_to(root.resolve())))
    return written


async def _ruff(root: Path, *args: str, timeout_s: float) -> str:
    result = await run_process([sys.executable, "-m", "ruff", *args], cwd=root, timeout_s=timeout_s)
    if result.returncode not in (0, 1):
        raise InvalidInput(f"files: ruff {args[0]} failed: {result.stderr.strip()[-500:]}", field="files")
    return result.stdout


async def refactor_files(root: Path, files: list[str], *, timeout_s: float = 120.0) -> RefactorResult:
    """``ruff check --fix`` then ``ruff format`` on ``files``; returns the unified diff of what changed."""
    before = await asyncio.to_thread(_read_sources, root, files)
    rel = list(before)
    await _ruff(root, "check", "--fix", "--no-cache", "--exit-zero", "--", *rel, timeout_s=timeout_s)
    await _ruff(root, "format", "--no-cache", "--", *rel, timeout_s=timeout_s)
    concise = ("check", "--no-cache", "--exit-zero", "--output-format=concise")
    remaining = await _ruff(root, *concise, "--", *rel, timeout_s=timeout_s)
    after = await asyncio.to_thread(_read_sources, root, rel)
    diff: list[str] = []
    for name in rel:
        if after[name] != before[name]:
            a, b = before[name].splitlines(keepends=True), after[name].splitlines(keepends=True)
            diff += difflib.unified_diff(a, b, f"a/{name}", f"b/{name}")
    changed = [name for name in rel if after[name] != before[name]]
    return RefactorResult(rel, changed, "".join(diff), remaining.strip())


def _read_sources(root: Path, files: list[str]) -> dict[str, str]:
    """The text of each Python file, keyed by its path relative to the repository."""
    sources = {}
    for name in files:
        path = inside(root, name, field="files")
        if not path.is_file() or path.suffix not in {".py", ".pyi"}:
            raise InvalidInput(f"files: {name} is not a Python file of the repository", field="files")
        sources[str(path.relative_to(root.resolve()))] = path.read_text(encoding="utf-8")
    return sources
