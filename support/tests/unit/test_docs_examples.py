"""Every ```python example in docs/*.md and README.md runs, so the docs stay true to the code.

An example that needs running services carries the comment ``# needs: servers``;
it is compiled and its imports are executed, but it is not run.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
NEEDS_SERVERS = "# needs: servers"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def examples() -> list[tuple[str, str]]:
    """(``file:line``, source) of every fenced python block."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 2
            found.append((f"{path.relative_to(ROOT)}:{line}", m.group(1)))
    return found


def imports_only(source: str) -> str:
    """The example's import statements alone, to check what it imports exists."""
    tree = ast.parse(source)
    return ast.unparse([n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)])


EXAMPLES = examples()


def test_the_docs_have_examples() -> None:
    """The operations guide carries at least one runnable example and one that needs servers."""
    assert any(NEEDS_SERVERS not in src for _, src in EXAMPLES)
    assert any(NEEDS_SERVERS in src for _, src in EXAMPLES)


@pytest.mark.parametrize(("where", "source"), EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_python_example_runs(where: str, source: str, tmp_path: Path) -> None:
    """The example runs in a fresh interpreter from the repository root (or, needing servers, imports)."""
    code = imports_only(source) if NEEDS_SERVERS in source else source
    compile(source, where, "exec")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AO_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"{where}:\n{result.stderr[-2000:]}"
