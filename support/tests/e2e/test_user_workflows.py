"""A user workflow plugged in through the ``agent_orchestrator.workflows`` entry-point group, as
docs/MULTI_AGENT_WORKFLOWS.md tells: its example module and its ``pyproject.toml`` lines, taken
from the document itself, made into an installed distribution on the orchestrator's path."""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent_orchestrator.demo import make_sample_repo
from agent_orchestrator.stack import Stack
from support.tests.e2e.conftest import start_stack, stop_stack

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[3] / "docs" / "MULTI_AGENT_WORKFLOWS.md"


def _doc_block(language: str, containing: str) -> str:
    """The document's fenced ``language`` block that holds ``containing``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)
    return next(b for b in blocks if containing in b)


def _install(site: Path) -> None:
    """The document's example as the package ``my_package`` with its entry points in a dist-info
    directory, as ``pip install`` leaves it; plus a broken entry point, which must be skipped."""
    (site / "my_package").mkdir(parents=True)
    (site / "my_package" / "__init__.py").write_text("")
    (site / "my_package" / "workflows.py").write_text(_doc_block("python", "EXPLAIN = WorkflowType"))
    group = "agent_orchestrator.workflows"
    declared = tomllib.loads(_doc_block("toml", group))["project"]["entry-points"][group]
    lines = [f"{name} = {target}" for name, target in {**declared, "broken": "my_package.workflows:MISSING"}.items()]
    info = site / "my_package-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-package\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def plugged(server_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    site = tmp_path_factory.mktemp("site")
    _install(site)
    s, name = start_stack(server_urls, tmp_path_factory.mktemp("stack"), docs=1, env={"PYTHONPATH": str(site)})
    yield s
    stop_stack(s, server_urls, name)


def test_a_user_workflow_from_an_entry_point_is_listed_validated_and_run(plugged: Stack, tmp_path: Path) -> None:
    """The documented example is listed with its input schema and graph, refuses bad input naming
    the field, and runs: its node calls the code-review agent and the result is its answer. The
    broken entry point beside it is logged and skipped; the built-in types are all there."""
    repo, _, _ = make_sample_repo(tmp_path)
    with httpx.Client(base_url=plugged.orchestrator_url, headers={"X-API-Key": plugged.api_key}, timeout=30) as api:
        types = {t["name"]: t for t in api.get("/workflow-types").json()["items"]}
        assert {"pr_deployment", "parallel_docs", "self_healing", "explain_module"} <= set(types)
        assert set(types["explain_module"]["input_schema"]["properties"]) == {"repo_path", "path"}
        assert "explain" in types["explain_module"]["mermaid"]
        bad = api.post("/workflows", json={"workflow_type": "explain_module", "input": {"repo_path": str(repo)}})
        assert (bad.status_code, bad.json()["error"]["field"]) == (422, "input.path"), bad.text
        launched = api.post(
            "/workflows",
            json={"workflow_type": "explain_module", "input": {"repo_path": str(repo), "path": "calc/ops.py"}},
        )
        assert launched.status_code == 202, launched.text
        wf = _finished(api, launched.json()["workflow_id"])
    assert wf["status"] == "succeeded", wf
    assert [f["name"] for f in wf["result"]["functions"]] == ["add", "sub", "mul"]
    (orchestrator,) = plugged.find("orchestrator")
    assert "workflow entry point broken failed to load; skipped" in orchestrator.log.read_text()


def _finished(api: httpx.Client, workflow_id: str, timeout_s: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        wf: dict[str, object] = api.get(f"/workflows/{workflow_id}").json()
        if wf["status"] in {"succeeded", "failed", "cancelled"}:
            return wf
        time.sleep(0.2)
    raise AssertionError(f"{workflow_id} did not finish in {timeout_s}s")
