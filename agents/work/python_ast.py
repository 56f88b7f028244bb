"""A structural summary of a Python module, read from its AST without importing it.

Both the code-review agent (EXPLAIN_CODE) and the documentation agent (the API
reference) build on :func:`summarize_module`; nothing here executes the code.
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.lib.errors import InvalidInput

__all__ = ["ClassInfo", "FunctionInfo", "ModuleSummary", "module_name", "summarize_module", "summarize_source"]


@dataclass(frozen=True)
class FunctionInfo:
    name: str
    signature: str
    line: int
    is_async: bool
    docstring: str | None
    decorators: list[str]


@dataclass(frozen=True)
class ClassInfo:
    name: str
    bases: list[str]
    line: int
    docstring: str | None
    methods: list[FunctionInfo]


@dataclass
class ModuleSummary:
    """What a module defines, in source order."""

    module: str
    path: str
    lines: int
    docstring: str | None
    imports: list[str] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)
    classes: list[ClassInfo] = field(default_factory=list)
    functions: list[FunctionInfo] = field(default_factory=list)
    exports: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public(self, name: str) -> bool:
        """Whether ``name`` belongs to the public API (``__all__`` when the module declares one)."""
        return name in self.exports if self.exports is not None else not name.startswith("_")


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}"


def _function(node: ast.FunctionDef | ast.AsyncFunctionDef) -> FunctionInfo:
    return FunctionInfo(
        name=node.name,
        signature=_signature(node),
        line=node.lineno,
        is_async=isinstance(node, ast.AsyncFunctionDef),
        docstring=ast.get_docstring(node),
        decorators=[ast.unparse(d) for d in node.decorator_list],
    )


def _class(node: ast.ClassDef) -> ClassInfo:
    methods = [_function(n) for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    bases = [ast.unparse(b) for b in node.bases]
    return ClassInfo(node.name, bases, node.lineno, ast.get_docstring(node), methods)


def _imports(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = "." * node.level + (node.module or "")
    sep = "." if base and not base.endswith(".") else ""
    return [f"{base}{sep}{alias.name}" for alias in node.names]


def _exports(node: ast.Assign | ast.AnnAssign) -> list[str] | None:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if not any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) or node.value is None:
        return None
    try:
        value = ast.literal_eval(node.value)
    except ValueError:
        return None
    return [str(v) for v in value] if isinstance(value, list | tuple) else None


def _constants(node: ast.Assign | ast.AnnAssign) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]


def _visit(summary: ModuleSummary, node: ast.stmt) -> None:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        summary.functions.append(_function(node))
    elif isinstance(node, ast.ClassDef):
        summary.classes.append(_class(node))
    elif isinstance(node, ast.Import | ast.ImportFrom):
        summary.imports.extend(_imports(node))
    elif isinstance(node, ast.Assign | ast.AnnAssign):
        summary.constants.extend(_constants(node))
        exports = _exports(node)
        summary.exports = exports if exports is not None else summary.exports


def summarize_source(source: str, *, module: str, path: str, field_name: str = "path") -> ModuleSummary:
    """Summarize ``source``; a syntax error is an :class:`InvalidInput` naming ``field_name``."""
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise InvalidInput(f"{field_name}: {path} line {e.lineno}: {e.msg}", field=field_name) from e
    summary = ModuleSummary(module=module, path=path, lines=len(source.splitlines()), docstring=ast.get_docstring(tree))
    for node in tree.body:
        _visit(summary, node)
    return summary


def module_name(root: Path, file: Path) -> str:
    """The dotted module name of ``file`` relative to ``root`` (``pkg/__init__.py`` is ``pkg``)."""
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts and parts[0] == "src":
        parts = parts[1:]
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or file.stem


def summarize_module(root: Path, file: Path) -> ModuleSummary:
    """Summarize the module at ``file`` (inside ``root``)."""
    source = file.read_text(encoding="utf-8", errors="replace")
    return summarize_source(source, module=module_name(root, file), path=str(file.relative_to(root)))
