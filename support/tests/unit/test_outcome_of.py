"""How a run's end is read from the graph's last state: what the orchestrator cannot follow (an
unknown outcome, several interrupts at once, an interrupt payload that is not JSON) fails the
workflow saying why, instead of leaving it running and retried."""

from __future__ import annotations

from typing import Any

import pytest
from langgraph.types import Interrupt

from agent_orchestrator.execution import _outcome_of


def test_an_outcome_other_than_succeeded_or_failed_fails_the_workflow_naming_it() -> None:
    """An outcome a graph may not end with is a failure naming it; succeeded and failed stand."""
    outcome = _outcome_of({"outcome": "success", "result": {"x": 1}}, ())
    assert (outcome.status, outcome.reason) == (
        "failed",
        "the graph's outcome 'success' is neither 'succeeded' nor 'failed'",
    )
    assert outcome.errors[0]["code"] == "invalid_outcome"
    assert _outcome_of({"outcome": "failed", "reason": "no"}, ()).status == "failed"
    assert _outcome_of({}, ()).status == "succeeded"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ({"question": "deploy?"}, {"question": "deploy?"}),
        ("Proceed with deployment?", {"value": "Proceed with deployment?"}),
        (["a", "b"], {"value": ["a", "b"]}),
    ],
)
def test_an_interrupt_payload_is_shown_as_an_object(value: Any, shown: dict[str, Any]) -> None:
    """An object is the payload shown; anything else is shown as ``{"value": ...}``."""
    outcome = _outcome_of({}, (Interrupt(value=value, id="i1"),), "ask")
    assert (outcome.status, outcome.interrupt, outcome.interrupted_node) == ("interrupted", shown, "ask")


def test_an_interrupt_payload_that_is_not_json_fails_the_workflow() -> None:
    """A payload the record cannot store fails the workflow instead of a run retried for ever."""
    outcome = _outcome_of({}, (Interrupt(value={"s": {1, 2}}, id="i1"),))
    assert outcome.status == "failed"
    assert outcome.reason.startswith("the interrupt's payload is not JSON"), outcome.reason


def test_several_interrupts_at_once_fail_the_workflow_saying_one_at_a_time() -> None:
    """Parallel tasks that interrupt together cannot be answered one by one: the workflow fails saying so."""
    outcome = _outcome_of({}, (Interrupt(value={}, id="a"), Interrupt(value={}, id="b")))
    assert (outcome.status, outcome.reason) == (
        "failed",
        "2 interrupts at once (parallel tasks); a workflow waits on one at a time",
    )
