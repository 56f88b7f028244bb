"""LangSmith traces: one per workflow, agent calls as child runs, agent spans nested under them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_orchestrator.demo import make_sample_repo
from support.tests.e2e.conftest import start_stack, stop_stack
from support.tests.langsmith_standin import LangSmithStandIn

pytestmark = pytest.mark.slow


def _wait_for(standin: LangSmithStandIn, prefix: str, count: int, *, ended: bool = False) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        runs = [r for r in standin.named(prefix) if not ended or r.get("end_time")]
        if len(runs) >= count:
            return runs
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} runs named {prefix}*: {sorted(r['name'] for r in standin.runs.values())}")


def test_workflow_is_one_trace_with_agent_spans_nested(server_urls: tuple[str, str], tmp_path: Path) -> None:
    """A workflow's runs share one trace; each agent call has the agent's own run as its child."""
    with LangSmithStandIn() as standin:
        stack, db_name = start_stack(server_urls, tmp_path, docs=1, env=standin.env())
        stack_clients: list[httpx.Client] = []
        try:
            repo, _, _ = make_sample_repo(tmp_path)
            api = httpx.Client(base_url=stack.orchestrator_url, headers={"X-API-Key": stack.api_key}, timeout=30)
            stack_clients.append(api)
            r = api.post(
                "/workflows",
                json={
                    "workflow_type": "parallel_docs",
                    "input": {"repo_path": str(repo), "modules": ["calc", "calc.ops"]},
                },
            )
            wf_id = r.json()["workflow_id"]
            deadline = time.monotonic() + 60
            while api.get(f"/workflows/{wf_id}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            (root,) = _wait_for(standin, "workflow:parallel_docs", 1, ended=True)
            calls = _wait_for(standin, "call:documentation.GENERATE_DOCS", 2)
            served = _wait_for(standin, "documentation.GENERATE_DOCS", 2)
        finally:
            for client in stack_clients:
                client.close()
            stop_stack(stack, server_urls, db_name)
    assert root["extra"]["metadata"]["workflow_id"] == wf_id
    assert root.get("parent_run_id") is None
    everything = list(standin.runs.values())
    assert {r["trace_id"] for r in everything if r.get("trace_id") == root["id"]} == {root["id"]}
    graph = [r for r in everything if r.get("parent_run_id") == root["id"]]
    assert [g["name"] for g in graph] == ["graph:parallel_docs"]
    by_id = {r["id"]: r for r in everything}
    for call in calls:
        assert call["trace_id"] == root["id"]
        assert by_id[call["parent_run_id"]]["name"] == "document"
    assert {s["parent_run_id"] for s in served} == {c["id"] for c in calls}
    assert all(s["trace_id"] == root["id"] for s in served)
