"""Two orchestrator replicas, one killed with SIGKILL while 20 workflows run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from agent_orchestrator.demo import make_sample_repo
from support.tests.e2e.conftest import start_stack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TERMINAL = {"succeeded", "failed", "cancelled"}
N_WORKFLOWS = 20


def _approve_waiting(api: httpx.Client, ids: list[str]) -> dict[str, str]:
    statuses = {}
    for wf_id in ids:
        wf = api.get(f"/workflows/{wf_id}").json()
        statuses[wf_id] = wf["status"]
        if wf["status"] == "interrupted":
            api.post(f"/workflows/{wf_id}/resume", json={"decision": {"decision": "approve", "by": "chaos"}})
    return statuses


def test_replica_killed_mid_run_loses_and_repeats_nothing(server_urls: tuple[str, str], tmp_path: Path) -> None:
    """All 20 workflows finish after a replica is killed; no deploy or artifact was made twice."""
    stack, db_name = start_stack(server_urls, tmp_path, replicas=2, docs=1)
    apis: list[httpx.Client] = []
    try:
        repos = [make_sample_repo(tmp_path / f"r{i}") for i in range(N_WORKFLOWS)]
        apis += [
            httpx.Client(base_url=p.url, headers={"X-API-Key": stack.api_key}, timeout=30)
            for p in stack.find("orchestrator")
        ]
        ids = []
        for i, (repo, base, head) in enumerate(repos):
            r = apis[i % 2].post(
                "/workflows",
                json={
                    "workflow_type": "pr_deployment",
                    "input": {"repo_path": str(repo), "base": base, "head": head, "environment": f"env-{i}"},
                },
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["workflow_id"])
        killed = False
        survivor = apis[1]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            statuses = _approve_waiting(survivor, ids)
            done = sum(s in TERMINAL for s in statuses.values())
            if not killed and (done >= 3 or sum(s == "running" for s in statuses.values()) >= 3):
                stack.kill9(stack.find("orchestrator")[0])
                killed = True
            if done == N_WORKFLOWS:
                break
            time.sleep(0.5)
        assert killed
        final = {i: survivor.get(f"/workflows/{i}").json() for i in ids}
        assert {w["status"] for w in final.values()} == {"succeeded"}, {
            i: (w["status"], w["reason"]) for i, w in final.items() if w["status"] != "succeeded"
        }
        envs = stack.settings.data_dir / "environments"
        releases = {
            f"env-{i}": sorted(p.name for p in (envs / f"env-{i}" / "releases").iterdir()) for i in range(N_WORKFLOWS)
        }
        assert all(len(r) == 1 for r in releases.values()), releases
        heads = {f"env-{i}": repos[i][2] for i in range(N_WORKFLOWS)}
        assert all(releases[env][0].startswith(head[:12]) for env, head in heads.items()), releases
    finally:
        for api in apis:
            api.close()
        stop_stack(stack, server_urls, db_name)


def _wait_running(api: httpx.Client, workflow_type: str, timeout_s: float = 60) -> str:
    """The id of the first workflow of ``workflow_type`` seen running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        items = api.get("/workflows", params={"type": workflow_type, "status": "running"}).json()["items"]
        if items:
            return str(items[0]["workflow_id"])
        time.sleep(0.02)
    raise AssertionError(f"no {workflow_type} workflow ran within {timeout_s:.0f}s")


def test_cli_follow_reconnects_across_an_orchestrator_restart(server_urls: tuple[str, str], tmp_path: Path) -> None:
    """``run --follow`` keeps following when its orchestrator is killed with SIGKILL mid-run and
    started again: it reconnects after the last event it got, the restarted replica takes the run
    over once its lease ran out, and the CLI takes the approval at its prompt and exits 0 once the
    workflow succeeded, deployed once."""
    stack, db_name = start_stack(server_urls, tmp_path, docs=1)
    try:
        repo, base, head = make_sample_repo(tmp_path / "repo")
        data = {"repo_path": str(repo), "base": base, "head": head, "environment": "restarted"}
        args = ["run", "pr_deployment", "--follow", "--input", orjson.dumps(data).decode()]
        cli = subprocess.Popen(
            [sys.executable, "-m", "agent_orchestrator", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=stack.env, text=True,
        )  # fmt: skip
        with httpx.Client(base_url=stack.orchestrator_url, headers={"X-API-Key": stack.api_key}, timeout=30) as api:
            wf_id = _wait_running(api, "pr_deployment")
            orchestrator = stack.find("orchestrator")[0]
            stack.kill9(orchestrator)
            stack.restart(orchestrator)
            out, _ = cli.communicate("y\nbea\nafter a restart\n", timeout=180)
            assert cli.returncode == 0, out
            assert 1 <= out.count("reconnecting") <= 2, out  # said once, not every half second
            assert "approve?" in out
            wf = api.get(f"/workflows/{wf_id}").json()
        assert wf["status"] == "succeeded", wf
        assert wf["result"]["steps"]["approval"]["comment"] == "after a restart"
        releases = list((stack.settings.data_dir / "environments" / "restarted" / "releases").iterdir())
        assert [r.name[:12] for r in releases] == [head[:12]]
    finally:
        stop_stack(stack, server_urls, db_name)
