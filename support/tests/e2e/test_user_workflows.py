"""A user workflow plugged in through the ``agent_orchestrator.workflows`` entry-point group, as
docs/MULTI_AGENT_WORKFLOWS.md tells: its example module and its ``pyproject.toml`` lines, taken
from the document itself, made into an installed distribution on the orchestrator's path, beside
broken plug-ins the orchestrator must skip."""

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
from agent_orchestrator.workflows import builtin_workflow_types
from support.tests.e2e.conftest import start_stack, stop_stack

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[3] / "docs" / "MULTI_AGENT_WORKFLOWS.md"

#: Plug-ins a user may get wrong, beside the document's example (``my_package.broken``).
BROKEN = """
from agent_orchestrator.workflows import WorkflowType
from my_package.workflows import ExplainInput, build


def raising():
    raise RuntimeError("no graph today")


RAISES = WorkflowType(name="gen_raises", description="build() raises.", input_model=ExplainInput, build=raising)
COMPILED = WorkflowType(
    name="gen_compiled", description="build() compiles.", input_model=ExplainInput, build=lambda: build().compile()
)
SHADOW = WorkflowType(name="self_healing", description="Not the built-in.", input_model=ExplainInput, build=build)
AGAIN = WorkflowType(name="explain_module", description="Not the first.", input_model=ExplainInput, build=build)
"""
#: A plug-in that loads but leaves what the orchestrator cannot follow, by its input's ``kind``.
ODD = """
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt
from pydantic import BaseModel

from agent_orchestrator.workflows import WorkflowType
from shared.lib.multi_agent_state import MultiAgentState


class OddInput(BaseModel):
    kind: Literal["set_result", "bad_outcome", "text_interrupt"]


def odd(state: MultiAgentState) -> dict[str, Any]:
    kind = state["input"]["kind"]
    if kind == "set_result":
        return {"result": {"s": {1, 2}}}
    if kind == "bad_outcome":
        return {"outcome": "success"}
    return {"result": {"answer": interrupt("Proceed?")}}


def build() -> StateGraph:
    g = StateGraph(MultiAgentState)
    g.add_node("odd", odd)
    g.add_edge(START, "odd")
    g.add_edge("odd", END)
    return g


ODD = WorkflowType(name="gen_odd", description="Odd ends.", input_model=OddInput, build=build)
"""

#: The broken entry points, after the document's own, and what each is skipped for.
BROKEN_ENTRY_POINTS = {
    "broken": ("my_package.workflows:MISSING", "failed to load: AttributeError"),
    "gen_raises": ("my_package.broken:RAISES", "build() raised RuntimeError: no graph today"),
    "gen_compiled": ("my_package.broken:COMPILED", "build() returned a compiled graph"),
    "shadow": ("my_package.broken:SHADOW", "its type name 'self_healing' is already taken by the built-in type"),
    "explain_again": (
        "my_package.broken:AGAIN",
        "its type name 'explain_module' is already taken by entry point explain_module (my_package.workflows:EXPLAIN)",
    ),
}


def _doc_block(language: str, containing: str) -> str:
    """The document's fenced ``language`` block that holds ``containing``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)
    return next(b for b in blocks if containing in b)


def _install(site: Path) -> None:
    """The document's example as the package ``my_package`` with its entry points in a dist-info
    directory, as ``pip install`` leaves it; plus broken entry points, which must be skipped."""
    (site / "my_package").mkdir(parents=True)
    (site / "my_package" / "__init__.py").write_text("")
    (site / "my_package" / "workflows.py").write_text(_doc_block("python", "EXPLAIN = WorkflowType"))
    (site / "my_package" / "broken.py").write_text(BROKEN)
    (site / "my_package" / "odd.py").write_text(ODD)
    group = "agent_orchestrator.workflows"
    declared = tomllib.loads(_doc_block("toml", group))["project"]["entry-points"][group]
    broken = {name: target for name, (target, _) in BROKEN_ENTRY_POINTS.items()}
    odd = {"gen_odd": "my_package.odd:ODD"}
    lines = [f"{name} = {target}" for name, target in {**declared, **broken, **odd}.items()]
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
    broken entry points beside it are skipped; the built-in types are all there."""
    repo, _, _ = make_sample_repo(tmp_path)
    with httpx.Client(base_url=plugged.orchestrator_url, headers={"X-API-Key": plugged.api_key}, timeout=30) as api:
        listed = api.get("/workflow-types")
        assert listed.status_code == 200, listed.text
        types = {t["name"]: t for t in listed.json()["items"]}
        assert set(types) == {
            "pr_deployment",
            "parallel_docs",
            "self_healing",
            "agent_chain",
            "explain_module",
            "gen_odd",
        }
        assert set(types["explain_module"]["input_schema"]["properties"]) == {"repo_path", "path"}
        assert types["explain_module"]["description"] == "Explain one module."  # the first to take the name
        builtin = builtin_workflow_types()["self_healing"]
        assert types["self_healing"]["description"] == builtin.description  # not the plug-in's of that name
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


def test_broken_plug_ins_are_skipped_with_one_error_line_each(plugged: Stack) -> None:
    """An entry point that does not load, whose build() raises or returns a compiled graph, or
    whose type's name is taken (by a built-in type or an earlier plug-in) is one error line in
    the orchestrator's log naming it and saying why; the orchestrator started (a raising
    build() stopped it) and lists its types (a compiled one made that a 500), and the skipped
    entry points beside them, each with why (they were only in the log)."""
    (orchestrator,) = plugged.find("orchestrator")
    log = orchestrator.log.read_text().splitlines()
    for name, (target, why) in BROKEN_ENTRY_POINTS.items():
        head = f"workflow entry point {name} ({target}) skipped: {why}"
        (line,) = [i for i, line in enumerate(log) if head in line]
        assert not [more for more in log[line + 1 : line + 2] if more.startswith(("Traceback", " "))], log[line:]
    with httpx.Client(base_url=plugged.orchestrator_url, headers={"X-API-Key": plugged.api_key}, timeout=30) as api:
        skipped = {s["name"]: s["reason"] for s in api.get("/workflow-types").json()["skipped"]}
    assert set(skipped) == set(BROKEN_ENTRY_POINTS), skipped
    for name, (target, why) in BROKEN_ENTRY_POINTS.items():
        assert skipped[name].startswith(f"its entry point {name} ({target}) was skipped at start: {why}")


@pytest.mark.parametrize("name", ["broken", "gen_raises", "gen_compiled", "shadow"])
def test_launching_a_skipped_plug_in_says_it_failed_to_load_and_why(plugged: Stack, name: str) -> None:
    """Launching the type of an entry point that was skipped is a 422 naming workflow_type that
    says, in one line, that its entry point was skipped at start and why, then the known types
    (it said only "unknown workflow_type"); another unknown type names the known types only."""
    target, why = BROKEN_ENTRY_POINTS[name]
    with httpx.Client(base_url=plugged.orchestrator_url, headers={"X-API-Key": plugged.api_key}, timeout=30) as api:
        r = api.post("/workflows", json={"workflow_type": name, "input": {}})
        unknown = api.post("/workflows", json={"workflow_type": "nope", "input": {}})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "workflow_type"), r.text
    message = r.json()["error"]["message"]
    assert message.startswith(
        f"unknown workflow_type '{name}': its entry point {name} ({target}) was skipped at start: {why}"
    )
    assert "; fix the plug-in and restart the orchestrator; known types: [" in message
    assert "\n" not in message
    assert unknown.json()["error"]["message"].startswith("unknown workflow_type 'nope'; known types: ['agent_chain'")


def test_what_a_graph_leaves_that_cannot_be_followed_fails_it_saying_why(plugged: Stack) -> None:
    """A result that is not JSON, or an outcome other than succeeded/failed, fails the workflow at
    once with a reason that says so (it was left running, retried every lease); an interrupt
    whose payload is a string waits as {"value": ...} and takes its answer."""
    with httpx.Client(base_url=plugged.orchestrator_url, headers={"X-API-Key": plugged.api_key}, timeout=30) as api:

        def launch(kind: str) -> str:
            r = api.post("/workflows", json={"workflow_type": "gen_odd", "input": {"kind": kind}})
            assert r.status_code == 202, r.text
            return str(r.json()["workflow_id"])

        unstorable, unknown, asking = launch("set_result"), launch("bad_outcome"), launch("text_interrupt")
        wf = _finished(api, unstorable)
        assert wf["status"] == "failed", wf
        assert str(wf["reason"]).startswith("the workflow's outcome cannot be recorded: result is not JSON"), wf
        wf = _finished(api, unknown)
        assert (wf["status"], wf["reason"]) == (
            "failed",
            "the graph's outcome 'success' is neither 'succeeded' nor 'failed'",
        ), wf
        wf = _finished(api, asking, stop_at={"interrupted"})
        assert (wf["status"], wf["pending_interrupt"]) == ("interrupted", {"value": "Proceed?"}), wf
        answered = api.post(f"/workflows/{asking}/resume", json={"decision": "yes"})
        assert answered.status_code == 202, answered.text
        wf = _finished(api, asking)
    assert (wf["status"], wf["result"]) == ("succeeded", {"answer": "yes"}), wf


def _finished(
    api: httpx.Client, workflow_id: str, timeout_s: float = 60, stop_at: set[str] | None = None
) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        wf: dict[str, object] = api.get(f"/workflows/{workflow_id}").json()
        if wf["status"] in {"succeeded", "failed", "cancelled", *(stop_at or ())}:
            return wf
        time.sleep(0.2)
    raise AssertionError(f"{workflow_id} did not finish in {timeout_s}s")
