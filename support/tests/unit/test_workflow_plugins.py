"""Loading user workflows from the ``agent_orchestrator.workflows`` entry-point group: each test
installs a real distribution (a package and its ``entry_points.txt`` in a dist-info directory,
as ``pip install`` leaves them) on ``sys.path`` and loads the types as the orchestrator does."""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent_orchestrator.workflows import (
    ENTRY_POINT_GROUP,
    builtin_workflow_types,
    load_workflow_types,
    unknown_workflow_type,
)

#: A plug-in module: a good type, and types whose ``build()`` the orchestrator cannot use.
PLUGIN = """
from typing import Any

from langgraph.graph import END, START, StateGraph

from agent_orchestrator.workflows import WorkflowContext, WorkflowInput, WorkflowType
from shared.lib.multi_agent_state import MultiAgentState


class In(WorkflowInput):
    pass


async def step(state: MultiAgentState) -> dict[str, Any]:
    return {"outcome": "succeeded"}


def build() -> StateGraph:
    graph = StateGraph(MultiAgentState, context_schema=WorkflowContext)
    graph.add_node("step", step)
    graph.add_edge(START, "step")
    graph.add_edge("step", END)
    return graph


def raising() -> StateGraph:
    raise KeyError("no graph today")


def compiled() -> Any:
    return build().compile()


def no_start() -> StateGraph:
    graph = StateGraph(MultiAgentState, context_schema=WorkflowContext)
    graph.add_node("step", step)
    return graph


def one(name: str, builder: Any = build, description: str = "A plug-in type.") -> WorkflowType:
    return WorkflowType(name=name, description=description, input_model=In, build=builder)


GOOD = one("good")
RAISES = one("gen_raises", raising)
COMPILED = one("gen_compiled", compiled)
NO_START = one("gen_no_start", no_start)
NOT_A_GRAPH = one("gen_not_a_graph", lambda: "graph")
SHADOW = one("self_healing", description="Not the built-in.")
GOOD_AGAIN = one("good", description="A second good.")
MALFORMED = one("Good Type")
"""

Install = Callable[[dict[str, str]], str]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """Installs a distribution whose package holds :data:`PLUGIN` and declares the entry points
    given (name to attribute of the package); returns the package's name. Later installs come
    first on ``sys.path``."""
    packages: list[str] = []

    def installed(declared: dict[str, str]) -> str:
        package = f"wf_plugin_{uuid.uuid4().hex[:8]}"
        site = tmp_path / package
        (site / package).mkdir(parents=True)
        (site / package / "__init__.py").write_text(PLUGIN)
        info = site / f"{package}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        lines = [f"{name} = {target if ':' in target else f'{package}:{target}'}" for name, target in declared.items()]
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(site))
        packages.append(package)
        return package

    yield installed
    for package in packages:
        sys.modules.pop(package, None)


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("RAISES", "build() raised KeyError: 'no graph today' ("),
        ("COMPILED", "build() returned a compiled graph; return the StateGraph itself, without .compile()"),
        ("NO_START", "its graph does not compile: ValueError: Graph must have an entrypoint"),
        ("NOT_A_GRAPH", "build() returned an object of type str, not a langgraph StateGraph"),
    ],
)
def test_a_plug_in_whose_build_gives_no_usable_graph_is_skipped_with_one_error_line(
    install: Install, caplog: pytest.LogCaptureFixture, entry: str, why: str
) -> None:
    """A type whose build() raises, returns a compiled graph, a graph that does not compile or no
    graph is left out, with one error line naming its entry point and what is wrong; the types
    beside it load (it took the orchestrator down, or answered 500 on /workflow-types)."""
    package = install({"good": "GOOD", "bad": entry})
    with caplog.at_level(logging.ERROR):
        types, failed = load_workflow_types()
    assert set(types) == {*builtin_workflow_types(), "good"}
    (error,) = _errors(caplog)
    assert error.startswith(f"workflow entry point bad ({package}:{entry}) skipped: {why}"), error
    assert "\n" not in error
    assert set(failed) == {"bad", f"gen_{entry.lower()}"}
    assert (
        failed["bad"] == f"its entry point bad ({package}:{entry}) was skipped at start: {error.split(' skipped: ')[1]}"
    )
    for wtype in types.values():  # what the orchestrator does with every type it loaded
        assert wtype.mermaid()


def test_an_entry_point_that_does_not_load_is_skipped_with_one_error_line(
    install: Install, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry point whose module or attribute is missing, or that gives no WorkflowType, is
    one error line saying why; the good type beside it loads."""
    package = install({"good": "GOOD", "bad_import": "no_such_module:X", "missing": "MISSING", "odd": "In"})
    with caplog.at_level(logging.ERROR):
        types, failed = load_workflow_types()
    assert set(types) == {*builtin_workflow_types(), "good"}
    errors = sorted(_errors(caplog))
    assert set(failed) == {"bad_import", "missing", "odd"}
    assert failed["bad_import"] == (
        "its entry point bad_import (no_such_module:X) was skipped at start: failed to load: "
        "ModuleNotFoundError: No module named 'no_such_module'"
    )
    assert errors == [
        "workflow entry point bad_import (no_such_module:X) skipped: failed to load: "
        "ModuleNotFoundError: No module named 'no_such_module'",
        f"workflow entry point missing ({package}:MISSING) skipped: failed to load: "
        f"AttributeError: module '{package}' has no attribute 'MISSING'",
        f"workflow entry point odd ({package}:In) skipped: gave an object of type In, not a WorkflowType "
        "(or a zero-argument callable returning one)",
    ]


def test_a_plug_in_cannot_take_a_built_in_types_name(install: Install, caplog: pytest.LogCaptureFixture) -> None:
    """A plug-in type named as a built-in one is refused with one error line naming both; the
    built-in type stays (it was replaced silently)."""
    package = install({"shadow": "SHADOW"})
    with caplog.at_level(logging.ERROR):
        types, failed = load_workflow_types()
    assert types["self_healing"] is builtin_workflow_types()["self_healing"]
    assert set(failed) == {"shadow"}  # not self_healing: that name is launched, as the built-in type
    assert _errors(caplog) == [
        f"workflow entry point shadow ({package}:SHADOW) skipped: its type name 'self_healing' is already "
        "taken by the built-in type, which is kept; rename this type"
    ]


def test_the_first_plug_in_to_take_a_name_keeps_it(install: Install, caplog: pytest.LogCaptureFixture) -> None:
    """Of two plug-ins giving a type the same name, the first loaded keeps it and the other is
    refused with one error line naming both (the last one loaded won, silently)."""
    package = install({"good": "GOOD", "good_again": "GOOD_AGAIN"})
    with caplog.at_level(logging.ERROR):
        types, failed = load_workflow_types()
    assert types["good"].description == "A plug-in type."
    assert set(failed) == {"good_again"}
    assert _errors(caplog) == [
        f"workflow entry point good_again ({package}:GOOD_AGAIN) skipped: its type name 'good' is already "
        f"taken by entry point good ({package}:GOOD), which is kept; rename this type"
    ]


def test_a_plug_in_type_whose_name_could_not_be_launched_is_skipped(
    install: Install, caplog: pytest.LogCaptureFixture
) -> None:
    """A type name outside the pattern workflows are stored under is refused at load, saying so,
    rather than listed and then refused at every launch."""
    install({"malformed": "MALFORMED"})
    with caplog.at_level(logging.ERROR):
        types, failed = load_workflow_types()
    assert "Good Type" not in types
    assert set(failed) == {"malformed", "Good Type"}
    (error,) = _errors(caplog)
    assert error.endswith(
        "skipped: its type name 'Good Type' does not match ^[a-z0-9][a-z0-9_.-]{0,127}$, so it could never be launched"
    )


def test_an_unknown_type_says_why_when_its_entry_point_was_skipped() -> None:
    """The error of a launch of a type whose entry point was skipped says so and why, in one line,
    beside the known types; any other unknown type names the known ones only."""
    failed = {"bad_import": "its entry point bad_import (no_such_module:X) was skipped at start: failed to load: ..."}
    error = unknown_workflow_type("bad_import", ["good", "agent_chain"], failed)
    assert (error.status_code, error.field) == (422, "workflow_type")
    assert str(error) == (
        "unknown workflow_type 'bad_import': its entry point bad_import (no_such_module:X) was skipped at start: "
        "failed to load: ...; fix the plug-in and restart the orchestrator; known types: ['agent_chain', 'good']"
    )
    assert str(unknown_workflow_type("nope", ["good"], failed)) == "unknown workflow_type 'nope'; known types: ['good']"
