"""A terminal ``workflow.status`` event carries the outcome, so a follower needs no read; a
result too large for an event is left to the record, and the event says so."""

from __future__ import annotations

from agent_orchestrator.service import _terminal_event


def test_small_outcome_rides_in_the_event() -> None:
    """Status, reason, result and errors as given; empty parts are left out."""
    assert _terminal_event("succeeded", "", {"outputs": [1, 2]}, []) == {
        "status": "succeeded",
        "reason": "",
        "result": {"outputs": [1, 2]},
    }
    failed = _terminal_event("failed", "call 1 failed", {}, [{"node": "call_next", "error": "boom"}])
    assert failed == {"status": "failed", "reason": "call 1 failed", "errors": [{"node": "call_next", "error": "boom"}]}


def test_large_result_is_left_to_the_record() -> None:
    """A result above 64 KiB as JSON is not copied into the event; ``result_omitted`` says to read it."""
    data = _terminal_event("succeeded", "", {"doc": "x" * 70_000}, [])
    assert data == {"status": "succeeded", "reason": "", "result_omitted": True}
