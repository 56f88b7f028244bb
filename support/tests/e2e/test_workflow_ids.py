"""Workflow ids pasted in any UUID spelling reach the workflow, over the API and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agent_orchestrator.stack import Stack
from support.tests.e2e.test_workflows_api import TERMINAL, follow, launch

pytestmark = pytest.mark.slow


def _spellings(wf_id: str) -> list[str]:
    return [wf_id.upper(), wf_id.replace("-", ""), wf_id.replace("-", "").upper(), f"{{{wf_id}}}"]


def _cli(stack: Stack, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "agent_orchestrator", *args],
        env=stack.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


def test_any_uuid_spelling_reaches_the_workflow(
    api: httpx.Client, stack: Stack, sample_repo: tuple[Path, str, str]
) -> None:
    """Upper-case, hyphen-less and braced ids read the workflow, its history and its events, and
    are answered with the canonical id; `status` takes them too."""
    wf_id = launch(api, "parallel_docs", {"repo_path": str(sample_repo[0]), "modules": ["calc"]})
    follow(api, wf_id, TERMINAL)
    for spelling in _spellings(wf_id):
        got = api.get(f"/workflows/{spelling}")
        assert (got.status_code, got.json()["workflow_id"]) == (200, wf_id), (spelling, got.text)
        history = api.get(f"/workflows/{spelling}/history")
        assert history.json()["workflow_id"] == wf_id, (spelling, history.text)
        events = api.get(f"/workflows/{spelling}/events")
        assert events.status_code == 200, (spelling, events.text)  # 204: no events stored under it
        assert '"status":"succeeded"' in events.text, (spelling, events.text)
    code, out = _cli(stack, "status", wf_id.upper())
    assert code == 0, out
    assert wf_id in out, out


@pytest.mark.parametrize("bad", ["not-a-uuid", "g" * 32, "0" * 31, "0" * 33])
def test_a_non_uuid_is_refused_naming_the_field(api: httpx.Client, stack: Stack, bad: str) -> None:
    """Anything not a UUID gets a 422 naming workflow_id from the API, and one line (exit 2) from the CLI."""
    r = api.get(f"/workflows/{bad}")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "workflow_id"
    code, out = _cli(stack, "cancel", bad)
    assert code == 2, out
    assert out.strip().splitlines() == [
        f"error: workflow_id must be a UUID, like {'0' * 8}-{'0' * 4}-{'0' * 4}-{'0' * 4}-{'0' * 12}; got {bad!r}"
    ]
