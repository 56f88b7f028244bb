"""How the CLI shows a workflow: a long result says it was cut and where the whole is; a piped
`run --follow` names the launch without a status its next lines contradict."""

from __future__ import annotations

from agent_orchestrator.cli_client import _RESULT_CHARS, _cut, _line


def test_a_long_result_is_cut_saying_so_and_where_the_whole_is() -> None:
    """A result past the table's share ends with how much was left out and where it is whole."""
    wf = {"workflow_id": "abc"}
    assert _cut("short", wf) == "short"
    shown = _cut("x" * (_RESULT_CHARS + 10), wf)
    assert shown.startswith("x" * _RESULT_CHARS)
    assert shown.endswith("\n... (10 more characters: GET /workflows/abc has it whole)")


def test_the_launch_line_names_the_workflow_and_leaves_its_status_to_the_events() -> None:
    """The launch line gives the id only: the status lines that follow are the events'."""
    line = _line({"event": "workflow.launched", "data": {"workflow_id": "abc", "status": "running"}}, {})
    assert line == "workflow abc launched"
