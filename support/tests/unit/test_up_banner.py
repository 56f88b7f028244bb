"""What ``up`` prints once the stack is up: in development mode, loudly, that nothing is checked."""

from __future__ import annotations

import pytest

from agent_orchestrator.cli_stack import _announce
from agent_orchestrator.stack import Stack
from shared.lib.settings import Settings


@pytest.mark.parametrize("dev_mode", [True, False])
def test_up_says_on_its_console_whether_keys_are_checked(dev_mode: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """In development mode the banner says loudly that keys are not checked; otherwise not a word of it."""
    stack = Stack(Settings(dev_mode=True), dev_mode=dev_mode, api_key="the-key")
    _announce(stack)
    out = capsys.readouterr().out
    assert "API key: the-key" in out, out
    if dev_mode:
        assert "DEVELOPMENT MODE" in out, out
        assert "not checked: development mode" in out, out
    else:
        assert "DEVELOPMENT MODE" not in out, out
        assert "(send it as X-API-Key)" in out, out
