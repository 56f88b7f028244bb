"""The three reference workflows, end to end through the orchestrator API, on real processes."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from agent_orchestrator.stack import Stack
from shared.lib.connections import connect_postgres, create_pg_pool
from shared.lib.workflow_state import WorkflowStateManager

pytestmark = pytest.mark.slow

TERMINAL = {"succeeded", "failed", "cancelled"}


def launch(api: httpx.Client, workflow_type: str, data: dict[str, Any], **extra: Any) -> str:
    r = api.post("/workflows", json={"workflow_type": workflow_type, "input": data, **extra})
    assert r.status_code == 202, r.text
    return str(r.json()["workflow_id"])


def follow(api: httpx.Client, workflow_id: str, until: set[str], timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        wf = api.get(f"/workflows/{workflow_id}").json()
        if wf["status"] in until:
            return dict(wf)
        time.sleep(0.2)
    raise AssertionError(f"{workflow_id} never reached {until}: {api.get(f'/workflows/{workflow_id}').json()}")


def wait_for_metric(
    api: httpx.Client, name: str, timeout_s: float = 10, until: Callable[[float], bool] = lambda v: v > 0
) -> float:
    """The value of an unlabelled metric on /metrics, once ``until`` holds (by default: above
    zero, as the watchdog sets it); the last value read when it never did."""
    deadline = time.monotonic() + timeout_s
    value = 0.0
    while time.monotonic() < deadline:
        lines = [ln for ln in api.get("/metrics").text.splitlines() if ln.startswith(f"{name} ")]
        value = float(lines[0].split()[1]) if lines else 0.0
        if until(value):
            return value
        time.sleep(0.3)
    return value


def pr_input(repo: tuple[Path, str, str], **extra: Any) -> dict[str, Any]:
    path, base, head = repo
    return {"repo_path": str(path), "base": base, "head": head, "environment": "staging", **extra}


def test_pr_deployment_deploys_after_approval(
    api: httpx.Client, stack: Stack, sample_repo: tuple[Path, str, str]
) -> None:
    """pr_deployment reviews, tests, waits for approval, deploys the head revision and verifies it."""
    wf_id = launch(api, "pr_deployment", pr_input(sample_repo))
    wf = follow(api, wf_id, {"interrupted"} | TERMINAL)
    assert (wf["status"], wf["current_step"]) == ("interrupted", "approval"), wf
    assert wf["pending_interrupt"]["review"]["approved"] is True
    # the event that says so names the same step, so a follower shows what the record does
    stopped = read_sse(api, wf_id, until=lambda e: e["data"].get("status") == "interrupted")[-1]
    assert (stopped["data"]["status"], stopped["data"]["current_step"]) == ("interrupted", "approval"), stopped
    # its state: the steps so far and the locks it holds, as the latest checkpoint has them
    assert wf["state"]["steps"]["review"]["approved"] is True
    assert wf["state"]["steps"]["test"]["passed"] >= 3
    assert "state" not in api.get(f"/workflows/{wf_id}", params={"state": "false"}).json()
    pending = api.get("/interrupts").json()["items"][0]
    assert pending["workflow_id"] == wf_id
    # it expires when its payload tells the person it does
    shown = datetime.fromisoformat(wf["pending_interrupt"]["expires_at"])
    assert datetime.fromisoformat(pending["expires_at"].replace("Z", "+00:00")) == shown
    assert wait_for_metric(api, "workflow_approvals_pending") >= 1
    for answer, field in (
        (1, "decision"),
        ("approve", "decision"),
        ({"decision": "maybe"}, "decision.decision"),
        ({"decision": "approve", "by": "ana", "expired": True}, "decision.expired"),
    ):  # refused before it is queued: the workflow still waits
        r = api.post(f"/workflows/{wf_id}/resume", json={"decision": answer})
        assert (r.status_code, r.json()["error"]["field"]) == (422, field), r.text
    assert api.get(f"/workflows/{wf_id}").json()["status"] == "interrupted"
    r = api.post(f"/workflows/{wf_id}/resume", json={"decision": {"decision": "approve", "by": "ana"}})
    assert r.status_code == 202, r.text
    # answered, it is pending again until a replica runs it: no longer listed as interrupted
    assert (r.json()["status"], r.json()["pending_interrupt"]) in {("pending", None), ("running", None)}, r.text
    wf = follow(api, wf_id, TERMINAL)
    assert wf["status"] == "succeeded", wf
    resumed = [e["data"] for e in read_sse(api, wf_id, 0) if e["event"] == "workflow.resumed"]
    assert resumed == [{"decision": {"decision": "approve", "by": "ana", "comment": ""}, "status": "pending"}]
    steps = wf["result"]["steps"]
    assert steps["test"]["passed"] >= 3
    assert steps["approval"]["by"] == "ana"
    current = stack.settings.data_dir / "environments" / "staging" / "current"
    assert current.resolve().name.startswith(sample_repo[2][:12])
    history = api.get(f"/workflows/{wf_id}/history").json()["checkpoints"]
    assert len(history) >= 8


def test_pr_deployment_fails_at_a_failing_test_and_says_why(
    api: httpx.Client, sample_repo: tuple[Path, str, str]
) -> None:
    """A head whose test fails stops the workflow at ``test``, before any approval: the reason gives
    the exit code and the counts, and the log's tail ends with pytest's summary naming the test.
    While the (slow) tests run, the workflow's current step is ``test``, not the review before it."""
    path, base, _ = sample_repo
    slow_broken = "import time\n\ndef test_broken():\n    time.sleep(2)\n    assert 1 + 1 == 3\n"
    (path / "tests" / "test_broken.py").write_text(slow_broken)
    head = _commit(path, "a failing test")
    wf_id = launch(api, "pr_deployment", pr_input((path, base, head)))
    seen = set()
    while (wf := api.get(f"/workflows/{wf_id}", params={"state": "false"}).json())["status"] not in TERMINAL:
        seen.add((wf["status"], wf["current_step"]))
        time.sleep(0.1)
    assert ("running", "test") in seen, seen
    assert all(step for status, step in seen if status == "running"), seen  # never a running one at no step
    assert (wf["status"], wf["current_step"]) == ("failed", "test"), wf
    events = read_sse(api, wf_id)
    running = [e["data"] for e in events if e["data"].get("status") == "running"]
    assert running == [{"status": "running", "attempt": 1, "current_step": "lock_repo"}], running  # the first node
    review = [e for e in events if e["data"].get("node") == "review"]
    assert review[0]["data"]["current_step"] == "test", review  # a follower sees the same
    reason = wf["reason"]
    assert reason.startswith("tests failed (exit code 1; 3 passed, 1 failed, 0 errors); log tail:"), reason
    assert "test_broken" in reason
    assert re.search(r"1 failed, 3 passed in [0-9.]+s", reason.splitlines()[-1]), reason


def test_pr_deployment_deploys_the_commit_it_reviewed_not_where_the_branch_moved(
    api: httpx.Client, sample_repo: tuple[Path, str, str]
) -> None:
    """``head`` is pinned to the commit the review resolved: a commit made on the branch while the
    approval waits is neither tested nor deployed."""
    path, base, reviewed = sample_repo
    wf_id = launch(api, "pr_deployment", pr_input((path, base, "HEAD"), environment="pinned"))
    wf = follow(api, wf_id, {"interrupted"} | TERMINAL)
    assert wf["status"] == "interrupted", wf
    assert wf["pending_interrupt"]["revision"] == reviewed
    (path / "calc" / "ops.py").write_text("raise SystemExit('broken')\n")
    assert _commit(path, "broken, after the approval was asked") != reviewed
    r = api.post(f"/workflows/{wf_id}/resume", json={"decision": {"decision": "approve", "by": "ana"}})
    assert r.status_code == 202, r.text
    # answered, it is pending again until a replica runs it: no longer listed as interrupted
    assert (r.json()["status"], r.json()["pending_interrupt"]) in {("pending", None), ("running", None)}, r.text
    wf = follow(api, wf_id, TERMINAL)
    assert wf["status"] == "succeeded", wf
    resumed = [e["data"] for e in read_sse(api, wf_id, 0) if e["event"] == "workflow.resumed"]
    assert resumed == [{"decision": {"decision": "approve", "by": "ana", "comment": ""}, "status": "pending"}]
    steps = wf["result"]["steps"]
    assert (wf["result"]["deployed"], wf["result"]["head"]) == (reviewed, "HEAD")
    assert steps["review"]["head"] == steps["test"]["revision"] == steps["deploy"]["artifact"]["revision"] == reviewed


def _deployed_after_approval(api: httpx.Client, data: dict[str, Any]) -> dict[str, Any]:
    """Launch pr_deployment with ``data``, approve it at its interrupt, and return it finished."""
    wf_id = launch(api, "pr_deployment", data)
    assert follow(api, wf_id, {"interrupted"} | TERMINAL)["status"] == "interrupted"
    r = api.post(f"/workflows/{wf_id}/resume", json={"decision": {"decision": "approve", "by": "ana"}})
    assert r.status_code == 202, r.text
    return follow(api, wf_id, TERMINAL)


def test_an_unhealthy_deploy_rolls_back_to_the_release_it_replaced(
    api: httpx.Client, stack: Stack, sample_repo: tuple[Path, str, str]
) -> None:
    """A failed health check rolls back to the release the deploy replaced; on an environment's
    first release there is nothing to roll back to, and the reason says so (no raw error)."""
    path, base, good = sample_repo
    unreachable = [{"kind": "tcp", "host": "127.0.0.1", "port": 1}]
    assert _deployed_after_approval(api, pr_input(sample_repo, environment="rb"))["status"] == "succeeded"
    (path / "calc" / "extra.py").write_text("X = 1\n")
    bad = _commit(path, "a release whose health check fails")
    wf = _deployed_after_approval(api, pr_input((path, base, bad), environment="rb", health_targets=unreachable))
    assert (wf["status"], wf["current_step"]) == ("failed", "rollback"), wf
    assert wf["reason"] == f"health check found 1 issue(s); rolled back to {good[:12]}"
    current = stack.settings.data_dir / "environments" / "rb" / "current"
    assert current.resolve().name == good
    first = _deployed_after_approval(api, pr_input((path, base, bad), environment="rb-new", health_targets=unreachable))
    assert (first["status"], first["current_step"]) == ("failed", "rollback"), first
    assert first["reason"].endswith(f"nothing to roll back to: {bad[:12]} is the first release of rb-new")


def _commit(repo: Path, message: str) -> str:
    """Commit everything in ``repo``; the new revision."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", message], cwd=repo, check=True)
    return subprocess.run(
        [*git, "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_cli_status_list_reject_approve_and_cancel(
    api: httpx.Client, stack: Stack, sample_repo: tuple[Path, str, str]
) -> None:
    """``status`` shows a workflow waiting at its approval and ``list`` lists it; ``reject`` answers
    it and it fails as rejected by that person; a late ``approve`` is refused (exit 2, the 409
    named). ``run --follow`` with no one at the prompt (stdin closed) leaves a second one waiting,
    says how to answer it and exits 1; ``cancel`` cancels it; cancelling it again is refused.
    ORCHESTRATOR_URL points the CLI at an orchestrator elsewhere; a refused key says where the
    CLI takes its key from."""

    def cli(*args: str, **env: str) -> str:
        command = [sys.executable, "-m", "agent_orchestrator", *args]
        done = subprocess.run(
            command, env={**stack.env, **env}, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
        )
        return f"exit {done.returncode}: " + " ".join((done.stdout + done.stderr).split())

    first = launch(api, "pr_deployment", pr_input(sample_repo, environment="cli-1"))
    assert follow(api, first, {"interrupted"} | TERMINAL)["status"] == "interrupted"
    # AO_PORTS names no orchestrator here: ORCHESTRATOR_URL (a trailing slash is fine) does
    shown = cli("status", first, AO_PORTS='{"orchestrator": 1}', ORCHESTRATOR_URL=f"{stack.orchestrator_url}/")
    assert shown.startswith("exit 0"), shown
    assert re.search(r"status . interrupted .* current_step . approval", shown), shown
    refused = cli("status", first, AO_API_KEY="not-the-key")
    assert refused.startswith("exit 2: error: 401"), refused
    assert "the CLI sends AO_API_KEY, else the first of AO_API_KEYS" in refused, refused
    assert f"{first} pr_deployment interrupted approval" in cli("list", "--status", "interrupted"), first
    assert cli("reject", first, "--by", "bo").startswith(f"exit 0: workflow {first}: reject sent; it resumes")
    wf = follow(api, first, TERMINAL)
    assert (wf["status"], wf["result"]["steps"]["approval"]["by"]) == ("failed", "bo"), wf
    assert cli("approve", first).startswith("exit 2: error: 409 conflict")
    unanswered = cli("run", "pr_deployment", "--follow", "--input", orjson.dumps(pr_input(sample_repo)).decode())
    second = re.findall(r"workflow ([0-9a-f-]{36}) waits for its approval", unanswered)[0]
    assert unanswered.startswith("exit 1"), unanswered
    assert f"answer it with agent-orchestrator approve {second}" in unanswered, unanswered
    assert api.get(f"/workflows/{second}").json()["status"] == "interrupted"
    # two of them: a page says how to get the next, with the filter its cursor goes with
    paged = cli("list", "--type", "pr_deployment", "--limit", "1")
    cursor = re.findall(r"more: --type pr_deployment --cursor (\S+)", paged)
    assert cursor, paged
    assert cli("list", "--type", "pr_deployment", "--limit", "1", "--cursor", cursor[0]).startswith("exit 0"), paged
    assert cli("cancel", second) == f"exit 0: workflow {second}: cancel sent; it is cancelled"
    assert cli("cancel", second).startswith("exit 2: error: 409 conflict")


def test_cli_run_follows_live_and_takes_the_approval_at_its_prompt(
    api: httpx.Client, stack: Stack, sample_repo: tuple[Path, str, str]
) -> None:
    """``agent-orchestrator run pr_deployment --follow`` follows the workflow's events, asks for
    the approval at the interrupt (its live view showing the step that waits, as ``status`` does),
    sends the answer typed at the prompt and follows on to the deploy; it exits 0 once the
    workflow succeeded."""
    cli = [sys.executable, "-m", "agent_orchestrator", "run", "pr_deployment", "--follow"]
    data = orjson.dumps(pr_input(sample_repo, environment="cli")).decode()
    done = subprocess.run(
        [*cli, "--input", data],
        input="approve\nbea\nlooks good\n",  # the word the interrupt names (y works too)
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "approve?" in done.stdout
    # piped, it logs a line per event: each node as it ends (and the one that runs by then), the
    # step the interrupt waits at; then the table at the prompt shows that step, as `status` does
    asked = done.stdout.split("approve?")[0]
    assert re.search(r"^  review done in [0-9.]+s; test runs$", asked, re.M), asked
    assert re.search(r"^  interrupted at approval$", asked, re.M), asked
    assert re.findall(r"current_step\s*│\s*(\S+)", asked) == ["approval"], asked
    wf_id = re.findall(r"workflow ([0-9a-f-]{36})", done.stdout)[-1]
    wf = api.get(f"/workflows/{wf_id}").json()
    assert wf["status"] == "succeeded"
    assert (
        wf["result"]["steps"]["approval"] | {"by": "bea", "comment": "looks good"} == wf["result"]["steps"]["approval"]
    )
    refused = subprocess.run([*cli, "--input", "{}"], env=stack.env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "input.repo_path" in refused.stdout + refused.stderr


def test_unanswered_approval_expires_as_rejected(api: httpx.Client, sample_repo: tuple[Path, str, str]) -> None:
    """An approval not given within approval_timeout_s fails the workflow with the reason recorded.
    The watchdog's answer is recorded as a resume is: a ``workflow.resumed`` event with the expired
    rejection, the workflow ``pending`` until it runs again."""
    wf_id = launch(api, "pr_deployment", pr_input(sample_repo, approval_timeout_s=1, environment="expiry"))
    wf = follow(api, wf_id, TERMINAL)
    assert wf["status"] == "failed"
    assert "expired" in wf["reason"]
    events = read_sse(api, wf_id)
    statuses = [e["data"].get("status") for e in events]
    assert statuses.index("interrupted") < statuses.index("pending", 1) < len(statuses) - 1, events
    resumed = [e["data"] for e in events if e["event"] == "workflow.resumed"]
    assert resumed == [
        {
            "decision": {
                "decision": "reject",
                "by": "system",
                "comment": "no answer before the approval deadline",
                "expired": True,
            },
            "status": "pending",
        }
    ], resumed


def test_parallel_docs_spreads_over_instances(api: httpx.Client, sample_repo: tuple[Path, str, str]) -> None:
    """parallel_docs documents each module on the documentation agent's instances and merges the parts."""
    wf_id = launch(
        api,
        "parallel_docs",
        {"repo_path": str(sample_repo[0]), "modules": ["calc", "calc.ops", "calc.stats", "nosuchmodule"]},
    )
    wf = follow(api, wf_id, TERMINAL)
    assert wf["status"] == "succeeded", wf
    result = wf["result"]
    assert result["parts"] == 4
    assert [p["unit"] for p in result["failed_parts"]] == ["nosuchmodule"]
    # Every instance that answered a part took part, the one that failed a part too.
    assert result["failed_parts"][0]["instance"] in {"documentation-1", "documentation-2"}
    assert result["instances"] == ["documentation-1", "documentation-2"]
    ops_doc = Path(next(f for f in result["files"] if f.endswith("calc.ops.md"))).read_text()
    assert "def add" in ops_doc or "add(" in ops_doc


def test_parallel_docs_writes_each_module_once_flat_inside_output_dir(
    api: httpx.Client, sample_repo: tuple[Path, str, str], tmp_path: Path
) -> None:
    """A module spelled dotted, as a path and as a file, '..' in a module, and duplicates: each
    module is documented once, in a flat file of its own inside output_dir."""
    repo = sample_repo[0]
    out = tmp_path / "docs-out" / "in"
    modules = ["calc/ops", f"../{repo.name}/calc/stats.py", "calc.ops", "calc/ops.py", "calc", "calc"]
    wf_id = launch(api, "parallel_docs", {"repo_path": str(repo), "modules": modules, "output_dir": str(out)})
    wf = follow(api, wf_id, TERMINAL)
    assert wf["status"] == "succeeded", wf
    assert (wf["result"]["parts"], wf["result"]["failed_parts"]) == (3, [])
    files = [Path(f) for f in wf["result"]["files"]]
    names = ["index.md", f"{repo.name}.calc.stats.md", "calc.md", "calc.ops.md"]
    assert [f.name for f in files] == names
    assert all(f.parent == out and f.resolve().is_relative_to(out.resolve()) for f in files)
    assert sorted(p.name for p in (tmp_path / "docs-out").rglob("*.md")) == sorted(names)
    assert "add(" in (out / "calc.ops.md").read_text()
    assert (out / "index.md").read_text().count("(calc.md)") == 1


@pytest.mark.parametrize(
    ("workflow_type", "extra", "where", "says", "code"),
    [
        (
            "pr_deployment",
            {"base": "HEAD~1", "head": "HEAD", "environment": "staging"},
            "no-such",
            "is not a directory",
            "not_found",
        ),
        (
            "pr_deployment",
            {"base": "HEAD~1", "head": "HEAD", "environment": "staging"},
            "plain",
            "is not a git repository",
            "invalid_input",
        ),
        ("parallel_docs", {}, "no-such", "is not a directory on the orchestrator's machine", "not_found"),
        ("parallel_docs", {"modules": ["calc"]}, "no-such", "is not a directory", None),
    ],
)
def test_a_repo_path_that_is_no_repository_fails_the_run_naming_it(
    api: httpx.Client,
    tmp_path: Path,
    workflow_type: str,
    extra: dict[str, Any],
    where: str,
    says: str,
    code: str | None,
) -> None:
    """A repo_path that does not exist, or is no git repository, is launched (the agents may see
    other files than the API) and fails with a reason naming repo_path, not a raw FileNotFoundError."""
    repo = tmp_path / where
    if where == "plain":
        repo.mkdir()
    wf = follow(api, launch(api, workflow_type, {"repo_path": str(repo), **extra}), TERMINAL)
    assert wf["status"] == "failed", wf
    assert f"repo_path: {repo} {says}" in wf["reason"], wf["reason"]
    assert "Errno" not in wf["reason"]
    assert [e["code"] for e in wf["errors"]] == ([code] if code else []), wf["errors"]


def test_launch_waits_for_the_outcome(api: httpx.Client, sample_repo: tuple[Path, str, str]) -> None:
    """``wait_s`` answers 200 with the outcome once the workflow finished or stopped at an
    interrupt, the same the record shows; 202 as usual when it had not within ``wait_s``."""
    docs = {"workflow_type": "parallel_docs", "input": {"repo_path": str(sample_repo[0]), "modules": ["calc"]}}
    r = api.post("/workflows", params={"wait_s": 60}, json=docs, timeout=90)  # the client outwaits wait_s
    assert r.status_code == 200, r.text
    done = r.json()
    assert (done["status"], done["created"]) == ("succeeded", True)
    assert done["result"] == api.get(f"/workflows/{done['workflow_id']}").json()["result"]
    # every checkpoint is stored no later than the outcome: the last one, with nothing next, is there
    history = api.get(f"/workflows/{done['workflow_id']}/history").json()["checkpoints"]
    assert history[0]["next"] == []
    assert [c["step"] for c in history] == list(range(history[0]["step"], -2, -1))
    pr = {"workflow_type": "pr_deployment", "input": pr_input(sample_repo, environment="wait")}
    r = api.post("/workflows", params={"wait_s": 60}, json=pr, timeout=90)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "interrupted"
    assert r.json()["interrupt"]["review"]["approved"] is True
    history = api.get(f"/workflows/{r.json()['workflow_id']}/history").json()["checkpoints"]
    assert history[0]["next"] == ["approval"], history[0]  # the checkpoint a resume starts from
    api.post(f"/workflows/{r.json()['workflow_id']}/cancel")
    r = api.post("/workflows", params={"wait_s": 0.001}, json=docs)
    assert r.status_code == 202, r.text
    assert r.json()["status"] in {"pending", "running"}
    follow(api, r.json()["workflow_id"], TERMINAL)


def test_cancel_waiting_workflow_and_refuse_finished(api: httpx.Client, sample_repo: tuple[Path, str, str]) -> None:
    """Cancelling an interrupted workflow cancels it; cancelling it again is a 409."""
    wf_id = launch(api, "pr_deployment", pr_input(sample_repo, environment="cancelme"))
    follow(api, wf_id, {"interrupted"})
    assert api.post(f"/workflows/{wf_id}/cancel").status_code == 202
    waiting = follow(api, wf_id, TERMINAL)
    assert (waiting["status"], waiting["reason"], waiting["errors"]) == ("cancelled", "cancelled by request", [])
    again = api.post(f"/workflows/{wf_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"


def test_cancel_running_workflow_stops_it(api: httpx.Client, sample_repo: tuple[Path, str, str]) -> None:
    """Cancelling a workflow while a node runs stops it as cancelled, recorded as a waiting one's
    cancel is; it never reaches approval."""
    wf_id = launch(api, "pr_deployment", pr_input(sample_repo, environment="cancel-running"))
    follow(api, wf_id, {"running"} | TERMINAL | {"interrupted"})
    r = api.post(f"/workflows/{wf_id}/cancel")
    assert r.status_code == 202, r.text
    wf = follow(api, wf_id, TERMINAL | {"interrupted"})
    assert wf["status"] == "cancelled", wf
    # as a waiting workflow's cancel: the reason, no error (it was a CancelledError "error")
    assert (wf["reason"], wf["errors"]) == ("cancelled by request", []), wf
    time.sleep(1)
    assert api.get(f"/workflows/{wf_id}").json()["status"] == "cancelled"


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_cancel_during_test_kills_the_test_process_at_the_agent(
    api: httpx.Client, stack: Stack, sample_repo: tuple[Path, str, str], tmp_path: Path
) -> None:
    """Cancelling a workflow while its ``test`` node runs (``agent-orchestrator cancel``) cancels the
    call at the cicd agent: the repository's test process is killed within seconds (it does not run
    on past the workflow and its repo lock), and the workflow ends cancelled. The command's help
    and its reply say so (they said it stops at its next node)."""
    path, base, _ = sample_repo
    pid_file = tmp_path / "slow-test.pid"
    (path / "tests" / "test_slow.py").write_text(
        "import os, pathlib, time\n\n\ndef test_slow():\n"
        f"    pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n    time.sleep(60)\n"
    )
    head = _commit(path, "a slow test")
    wf_id = launch(api, "pr_deployment", pr_input((path, base, head), environment="cancel-test"))
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, api.get(f"/workflows/{wf_id}").json()
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    assert _alive(pid)  # the test node's pytest, in the cicd agent's worktree
    command = [sys.executable, "-m", "agent_orchestrator", "cancel"]
    done = subprocess.run([*command, wf_id], env=stack.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    said = " ".join(done.stdout.split())
    assert said.startswith(f"workflow {wf_id}: cancel sent; its running node stops now"), said
    gone_by = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert not _alive(pid), "the test process of the cancelled workflow is still running"
    wf = follow(api, wf_id, TERMINAL | {"interrupted"}, timeout_s=15)
    assert wf["status"] == "cancelled", wf
    helped = subprocess.run([*command, "--help"], env=stack.env, capture_output=True, text=True, timeout=60)
    assert "next node" not in helped.stdout
    assert "a running one stops its current node at once" in " ".join(helped.stdout.replace("│", " ").split())


def test_idempotency_key_returns_same_workflow(api: httpx.Client, sample_repo: tuple[Path, str, str]) -> None:
    """Launching twice with one idempotency key returns the same workflow id; waiting on the
    repeat answers that workflow's outcome."""
    body = {
        "workflow_type": "parallel_docs",
        "input": {"repo_path": str(sample_repo[0]), "modules": ["calc"]},
        "idempotency_key": f"k-{time.time()}",
    }
    first, second = api.post("/workflows", json=body).json(), api.post("/workflows", json=body).json()
    assert first["workflow_id"] == second["workflow_id"]
    assert second["created"] is False
    other = api.post("/workflows", json={**body, "input": {"repo_path": "/elsewhere"}})
    assert other.status_code == 409
    waited = api.post("/workflows", params={"wait_s": 60}, json=body)  # the same launch, waiting for it
    assert waited.status_code == 200, waited.text
    assert (waited.json()["workflow_id"], waited.json()["created"]) == (first["workflow_id"], False)
    assert waited.json()["status"] == "succeeded"


def test_events_stream_in_order_and_resume_from_last_event_id(
    api: httpx.Client, sample_repo: tuple[Path, str, str]
) -> None:
    """SSE events arrive in id order, the last carrying the result; reconnecting with
    Last-Event-ID yields exactly the rest, and after the last one, nothing (204)."""
    wf_id = launch(api, "parallel_docs", {"repo_path": str(sample_repo[0]), "modules": ["calc", "tests"]})
    record = follow(api, wf_id, TERMINAL)
    full = read_sse(api, wf_id)
    ids = [e["id"] for e in full]
    assert ids == sorted(ids)
    assert len(ids) >= 4
    assert full[-1]["data"]["status"] == "succeeded"
    assert full[-1]["data"]["result"] == record["result"], "the terminal event carries the result"
    rest = read_sse(api, wf_id, last_event_id=ids[1])
    assert [e["id"] for e in rest] == ids[2:]
    # a finished workflow with nothing after Last-Event-ID: 204 at once, so an EventSource stops reconnecting
    assert api.get(f"/workflows/{wf_id}/events", headers={"Last-Event-ID": str(ids[-1])}, timeout=5).status_code == 204


def test_a_last_event_id_outside_bigint_gets_422_naming_it(
    api: httpx.Client, sample_repo: tuple[Path, str, str]
) -> None:
    """Last-Event-ID past int64, negative, not digits or not ASCII digits gets 422 naming the header (a
    value past int64 was a 500 from PostgreSQL); the largest int64 is read as an id, past the
    workflow's latest event: a 422 saying so."""
    wf_id = launch(api, "parallel_docs", {"repo_path": str(sample_repo[0]), "modules": ["calc"]})
    follow(api, wf_id, TERMINAL)
    for value in (str(2**63), "99999999999999999999999", "-1", "abc", b"\xb2"):
        r = api.get(f"/workflows/{wf_id}/events", headers={"Last-Event-ID": value}, timeout=5)
        assert r.status_code == 422, (value, r.text)
        assert r.json()["error"]["field"] == "Last-Event-ID"
    last = api.get(f"/workflows/{wf_id}/events", headers={"Last-Event-ID": str(2**63 - 1)}, timeout=5)
    assert last.status_code == 422
    assert "past this workflow's latest event" in last.json()["error"]["message"]


def test_a_last_event_id_past_the_workflows_latest_event_gets_422_naming_it(
    api: httpx.Client, sample_repo: tuple[Path, str, str]
) -> None:
    """Event ids are the events table's, shared by every workflow: a Last-Event-ID past this
    workflow's latest event was not received from its stream, and gets 422 naming the header,
    waiting or finished (it was followed with nothing but pings, forever: the terminal event
    was at or below it). The latest id itself follows the workflow to its terminal event."""
    wf_id = launch(api, "pr_deployment", pr_input(sample_repo, environment="past-last-id"))
    assert follow(api, wf_id, {"interrupted"} | TERMINAL)["status"] == "interrupted"
    ids = [e["id"] for e in read_sse(api, wf_id, until=lambda e: e["data"].get("status") == "interrupted")]
    for workflow_status in ("interrupted", "failed"):
        for value in (ids[-1] + 1, 999_999_999):
            r = api.get(f"/workflows/{wf_id}/events", headers={"Last-Event-ID": str(value)}, timeout=5)
            assert r.status_code == 422, (workflow_status, value, r.text)
            error = r.json()["error"]
            assert (error["code"], error["field"]) == ("invalid_input", "Last-Event-ID")
            assert f"past this workflow's latest event ({ids[-1]})" in error["message"]
        if workflow_status == "interrupted":
            with api.stream("GET", f"/workflows/{wf_id}/events", headers={"Last-Event-ID": str(ids[-1])}) as r:
                decision = {"decision": {"decision": "reject", "by": "test"}}
                assert api.post(f"/workflows/{wf_id}/resume", json=decision).status_code == 202
                rest = parse_sse(r.iter_lines())  # to the end of the stream: it ends at the terminal event
            assert rest[0]["id"] > ids[-1]
            assert (rest[-1]["event"], rest[-1]["data"]["status"]) == ("workflow.status", "failed")
            ids = [e["id"] for e in read_sse(api, wf_id)]


async def _lengthen_history(database_url: str, wf_id: str, n: int) -> list[int]:
    """Add ``n`` node events to the workflow's stored events (a long history, past one read of the
    stream); the ids of all its events, in order."""
    conn = await connect_postgres(database_url)
    try:
        await conn.execute(
            "INSERT INTO events (event_type, aggregate_type, aggregate_id, payload, metadata) "
            "SELECT 'workflow.node', 'workflow', $1, jsonb_build_object('node', 'extra-' || g), '{}' "
            "FROM generate_series(1, $2) AS g",
            wf_id,
            n,
        )
        return [r["id"] for r in await conn.fetch("SELECT id FROM events WHERE aggregate_id = $1 ORDER BY id", wf_id)]
    finally:
        await conn.close()


def test_a_history_longer_than_one_read_streams_whole(
    api: httpx.Client, stack: Stack, sample_repo: tuple[Path, str, str]
) -> None:
    """Events past one read of the table (500) are all streamed, in order, from the start and from
    a Last-Event-ID deep in a later read: replayed for a finished workflow, followed for one
    waiting at its approval."""
    done = launch(api, "parallel_docs", {"repo_path": str(sample_repo[0]), "modules": ["calc"]})
    follow(api, done, TERMINAL)
    own = read_sse(api, done)
    ids = asyncio.run(_lengthen_history(stack.settings.database_url, done, 1234))
    full = read_sse(api, done)
    assert [e["id"] for e in full] == ids
    assert full[: len(own)] == own
    assert [e["data"]["node"] for e in full[len(own) :]] == [f"extra-{i}" for i in range(1, 1235)]
    assert [e["id"] for e in read_sse(api, done, last_event_id=ids[777])] == ids[778:]
    waiting = launch(api, "pr_deployment", pr_input(sample_repo, environment="long-history"))
    assert follow(api, waiting, {"interrupted"} | TERMINAL)["status"] == "interrupted"
    ids = asyncio.run(_lengthen_history(stack.settings.database_url, waiting, 1234))
    assert [e["id"] for e in read_sse(api, waiting, stop_after=len(ids))] == ids
    assert [e["id"] for e in read_sse(api, waiting, last_event_id=ids[600], stop_after=len(ids) - 601)] == ids[601:]
    r = api.post(f"/workflows/{waiting}/resume", json={"decision": {"decision": "reject", "by": "test"}})
    assert r.status_code == 202, r.text
    assert follow(api, waiting, TERMINAL)["status"] == "failed"


def test_live_events_are_the_stored_ones_across_a_reconnect(
    api: httpx.Client, sample_repo: tuple[Path, str, str]
) -> None:
    """Followed live from the launch, with a disconnect after two events and a reconnect with
    Last-Event-ID, the stream delivers exactly what a replay of the finished workflow does."""
    wf_id = launch(api, "parallel_docs", {"repo_path": str(sample_repo[0]), "modules": ["calc", "tests"]})
    first = read_sse(api, wf_id, stop_after=2)
    rest = read_sse(api, wf_id, last_event_id=first[-1]["id"])
    replay = read_sse(api, wf_id)
    assert first + rest == replay
    assert replay[-1]["data"]["status"] == "succeeded"
    assert [e["data"].get("status") for e in replay if e["event"] == "workflow.status"][:2] == ["pending", "running"]


def test_a_streamed_launch_answers_with_the_workflows_events(
    api: httpx.Client, sample_repo: tuple[Path, str, str]
) -> None:
    """``POST /workflows?stream=true`` opens with ``workflow.launched`` (what a plain launch
    answers), then streams the workflow's events to its terminal one: the same a replay gives.
    Repeating its idempotency key streams the same workflow from its stored events."""
    body = {
        "workflow_type": "parallel_docs",
        "input": {"repo_path": str(sample_repo[0]), "modules": ["calc", "tests"]},
        "idempotency_key": f"stream-{time.time()}",
    }
    with api.stream("POST", "/workflows", params={"stream": "true"}, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        launched, *streamed = parse_sse(r.iter_lines())
    assert launched["event"] == "workflow.launched"
    assert "id" not in launched  # not a stored event: Last-Event-ID stays the workflow's
    wf_id = launched["data"]["workflow_id"]
    assert launched["data"]["created"] is True
    assert r.headers["location"] == f"/workflows/{wf_id}"
    assert streamed == read_sse(api, wf_id)
    assert streamed[-1]["data"]["status"] == "succeeded"
    assert streamed[-1]["data"]["result"] == api.get(f"/workflows/{wf_id}").json()["result"]
    with api.stream("POST", "/workflows", params={"stream": "true"}, json=body, timeout=60) as r:
        again, *replayed = parse_sse(r.iter_lines())
    assert (again["data"]["workflow_id"], again["data"]["created"]) == (wf_id, False)
    assert replayed == streamed


def test_streams_a_client_drops_leave_nothing_open(api: httpx.Client, sample_repo: tuple[Path, str, str]) -> None:
    """A streamed launch and a followed stream, both dropped by the client mid-way: the
    replica's open streams (``workflow_event_streams``) go back to zero."""
    assert wait_for_metric(api, "workflow_event_streams", timeout_s=15, until=lambda v: v == 0) == 0  # none left over
    body = {"workflow_type": "pr_deployment", "input": pr_input(sample_repo, environment="dropped")}
    with api.stream("POST", "/workflows", params={"stream": "true"}, json=body, timeout=30) as launched:
        launched_lines = launched.iter_lines()  # kept: a line iterator dropped mid-way closes the connection
        wf_id = parse_sse(launched_lines, stop_after=1)[0]["data"]["workflow_id"]
        with api.stream("GET", f"/workflows/{wf_id}/events", timeout=30) as followed:
            followed_lines = followed.iter_lines()
            assert parse_sse(followed_lines, stop_after=1)[0]["data"]["status"] == "pending"
            assert wait_for_metric(api, "workflow_event_streams", until=lambda v: v >= 2) == 2
    assert wait_for_metric(api, "workflow_event_streams", timeout_s=15, until=lambda v: v == 0) == 0
    assert api.post(f"/workflows/{wf_id}/cancel").status_code == 202


def read_sse(
    api: httpx.Client,
    wf_id: str,
    last_event_id: int | None = None,
    *,
    stop_after: int | None = None,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    with api.stream("GET", f"/workflows/{wf_id}/events", headers=headers, timeout=30) as r:
        assert r.status_code == 200
        return parse_sse(r.iter_lines(), stop_after=stop_after, until=until)


def parse_sse(
    lines: Iterator[str],
    *,
    stop_after: int | None = None,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Server-sent events as ``{"event", "data"[, "id"]}``, to the end of the stream, ``stop_after``
    events or the first event ``until`` holds for."""
    events, current = [], {}
    for line in lines:
        if line.startswith("id:"):
            current["id"] = int(line[3:].strip())
        elif line.startswith("event:"):
            current["event"] = line[6:].strip()
        elif line.startswith("data:"):
            current["data"] = orjson.loads(line[5:].strip())
        elif line == "" and "event" in current:
            events.append(current)
            current = {}
            if len(events) == stop_after or (until is not None and until(events[-1])):
                break
    return events


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("POST", "/workflows", b"{not json", 400, "body"),
        ("POST", "/workflows", b'{"workflow_type": "\xff"}', 400, "body"),  # not UTF-8
        ("POST", "/workflows", b"[" * 5000 + b"]" * 5000, 400, "body"),  # nested past the recursion limit
        (
            "POST",
            "/workflows",
            b'{"workflow_type": "parallel_docs", "input": {"n": ' + b"9" * 5000 + b"}}",
            400,
            "body",
        ),
        ("POST", "/workflows/00000000-0000-0000-0000-000000000000/resume", b'{"decision": "\xff"}', 400, "body"),
        ("POST", "/workflows", {"workflow_type": "parallel_docs", "input": {}, "bogus": 1}, 422, "bogus"),
        (
            "POST",
            "/workflows",
            {"workflow_type": "parallel_docs", "input": {}, "idempotency_kye": "k"},  # misspelt: not a second launch
            422,
            "idempotency_kye",
        ),
        ("POST", "/workflows/00000000-0000-0000-0000-000000000000/resume", {"decision": "approve", "x": 1}, 422, "x"),
        ("POST", "/workflows/00000000-0000-0000-0000-000000000000/resume", {"decision": None}, 422, "decision"),
        ("POST", "/workflows/00000000-0000-0000-0000-000000000000/cancel", {"reason": "obsolete"}, 422, "reason"),
        ("GET", "/workflows?status=failed&status=succeeded", None, 422, "status"),
        ("GET", "/workflows?limit=1&limit=2", None, 422, "limit"),
        ("POST", "/workflows", {"workflow_type": 42, "input": {}}, 422, "workflow_type"),
        ("POST", "/workflows", {"workflow_type": "nope", "input": {}}, 422, "workflow_type"),
        ("POST", "/workflows", {"workflow_type": "pr_deployment", "input": {"repo_path": "/x"}}, 422, "input.base"),
        (
            "POST",
            "/workflows",
            {
                "workflow_type": "pr_deployment",
                "input": {
                    "repo_path": "/x",
                    "base": "a",
                    "head": "b",
                    "environment": "e",
                    "health_targets": [{"kind": "tcp", "host": "a..b", "port": 80}],
                },
            },
            422,
            "input.health_targets.0.host",
        ),
        ("POST", "/workflows", {"workflow_type": "parallel_docs", "input": {"repo_path": "."}}, 422, "input.repo_path"),
        (
            "POST",
            "/workflows",
            {"workflow_type": "parallel_docs", "input": {"repo_path": "/x", "output_dir": "docs/out"}},
            422,
            "input.output_dir",
        ),
        (
            "POST",
            "/workflows",
            {"workflow_type": "parallel_docs", "input": {"repo_path": "/x", "modules": []}},
            422,
            "input.modules",
        ),
        (
            "POST",
            "/workflows",
            {"workflow_type": "parallel_docs", "input": {"repo_path": "/x", "modules": ["a"], "doc_types": ["guide"]}},
            422,
            "input.doc_types",
        ),
        (
            "POST",
            "/workflows",
            {"workflow_type": "self_healing", "input": {"max_iterations": "many"}},
            422,
            "input.max_iterations",
        ),
        (  # NaN, which a lenient JSON parser takes: refused, not read as null (the default)
            "POST",
            "/workflows",
            b'{"workflow_type": "self_healing", "input": {"targets": [{"kind": "tcp", "port": NaN}]}}',
            422,
            "input",
        ),
        (  # a body nested past the 128 levels every service takes: refused before the route, naming the field
            "POST",
            "/workflows",
            b'{"workflow_type": "self_healing", "input": {"targets": [' + b"[" * 300 + b"]" * 300 + b"]}}",
            422,
            "input.targets",
        ),
        (  # an integer past 64 bits, which jsonb (orjson) cannot store
            "POST",
            "/workflows",
            b'{"workflow_type": "self_healing", "input": {"max_iterations": 1' + b"0" * 30 + b"}}",
            422,
            "input.max_iterations",
        ),
        *(  # a wrong type is refused, not coerced: "2" or 2.0 for an integer, 1 for a boolean
            ("POST", "/workflows", {"workflow_type": "self_healing", "input": {k: v}}, 422, f"input.{k}")
            for k, v in (("max_iterations", "2"), ("max_iterations", 2.0), ("registry", 1))
        ),
        (
            "POST",
            "/workflows",
            {"workflow_type": "self_healing", "input": {"max_iteration": 2}},  # misspelt: not silently dropped
            422,
            "input.max_iteration",
        ),
        (
            "POST",
            "/workflows",
            {"workflow_type": "agent_chain", "input": {"calls": [{"agent": "cicd", "request_type": "X", "x": 1}]}},
            422,
            "input.calls.0.x",
        ),
        ("GET", "/workflows/not-a-uuid", None, 422, "workflow_id"),
        ("GET", "/workflows/00000000-0000-0000-0000-000000000000", None, 404, None),
        ("POST", "/workflows/00000000-0000-0000-0000-000000000000/resume", {"decision": "approve"}, 404, None),
        ("POST", "/workflows/00000000-0000-0000-0000-000000000000/cancel", None, 404, None),
        ("GET", "/workflows?status=bogus", None, 422, "status"),
        ("GET", "/workflows?staus=failed", None, 422, "staus"),  # misspelt: not ignored
        ("GET", "/workflows?limit=0", None, 422, "limit"),
        ("POST", "/workflows?wait_s=-1", {"workflow_type": "parallel_docs", "input": {}}, 422, "wait_s"),
        ("POST", "/workflows?wait_s=soon", {"workflow_type": "parallel_docs", "input": {}}, 422, "wait_s"),
        ("POST", "/workflows?stream=maybe", {"workflow_type": "parallel_docs", "input": {}}, 422, "stream"),
        ("POST", "/workflows?stream=true&wait_s=5", {"workflow_type": "parallel_docs", "input": {}}, 422, "stream"),
        ("POST", "/workflows?stream=true", {"workflow_type": "nope", "input": {}}, 422, "workflow_type"),
        ("GET", "/workflows?type=%00", None, 422, "type"),
        ("GET", "/workflows?status=pending&type=a%00b", None, 422, "type"),
        (
            "POST",
            "/workflows",
            {"workflow_type": "parallel_docs", "idempotency_key": "a\u0000b"},
            422,
            "idempotency_key",
        ),
        (
            "POST",
            "/workflows",
            {"workflow_type": "parallel_docs", "input": {"repo_path": "/x\u0000"}},
            422,
            "input.repo_path",
        ),
        (
            "POST",
            "/workflows",
            b'{"workflow_type": "parallel_docs", "input": {"modules": ["\\ud800"]}}',
            422,
            "input.modules.0",
        ),
        (
            "POST",
            "/workflows/00000000-0000-0000-0000-000000000000/resume",
            {"decision": {"by": "\u0000"}},
            422,
            "decision.by",
        ),
    ],
)
def test_bad_input_gets_4xx_naming_the_problem(
    api: httpx.Client, method: str, path: str, body: Any, status: int, field: str | None
) -> None:
    """Malformed JSON (a body FastAPI cannot parse at all too), wrong types, unknown fields and
    types, repeated parameters and bad ids get a 4xx JSON error, never a 500."""
    content = body if isinstance(body, bytes) else (orjson.dumps(body) if body is not None else None)
    r = api.request(method, path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if field is not None:
        assert err["field"] == field
    if status == 400:
        assert err["code"] == "malformed_json"


def test_oversized_body_and_missing_key_are_refused(api: httpx.Client, stack: Stack) -> None:
    """A body over the payload limit gets 413; a missing or wrong API key gets 401."""
    big = {"workflow_type": "parallel_docs", "input": {"repo_path": "x" * (stack.settings.max_payload_bytes + 10)}}
    assert api.post("/workflows", json=big).status_code == 413
    bare = httpx.get(f"{stack.orchestrator_url}/workflows")
    assert bare.status_code == 401
    assert bare.json()["error"]["field"] == "X-API-Key"
    wrong = httpx.get(f"{stack.orchestrator_url}/workflows", headers={"X-API-Key": "wrong"})
    assert wrong.status_code == 401
    # A JSON body sent as a form (curl -d without a content type) is told what to send.
    form = api.post(
        "/workflows",
        content=b'{"workflow_type": "parallel_docs", "input": {}}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert (form.status_code, form.json()["error"]["field"]) == (415, "content-type"), form.text
    assert "application/json" in form.json()["error"]["message"]


@pytest.mark.parametrize("content_type", [None, "text/plain"])
@pytest.mark.parametrize("path", ["/workflows", "/workflows/{id}/resume"])
def test_a_body_not_sent_as_json_is_415_naming_the_content_type(
    api: httpx.Client, path: str, content_type: str | None
) -> None:
    """A JSON body sent with no content type (curl -H 'Content-Type:') or as text gets 415 naming
    content-type and saying what to send, not "body: Input should be a valid dictionary"."""
    body = {"workflow_type": "parallel_docs", "input": {}} if path == "/workflows" else {"decision": "approve"}
    r = api.post(
        path.format(id="00000000-0000-0000-0000-000000000001"),
        content=orjson.dumps(body),  # raw content: httpx adds no content type of its own
        headers={"Content-Type": content_type} if content_type else {},
    )
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("unsupported_media_type", "content-type")
    assert "Content-Type: application/json" in error["message"]


async def _create_workflow(database_url: str, workflow_type: str) -> str:
    """A workflow of ``workflow_type`` in the stack's database, as a replica that runs the type
    (this one does not) writes it; its id."""
    pool = await create_pg_pool(database_url, max_size=1)
    try:
        return (await WorkflowStateManager(pool).create_workflow(workflow_type, {})).id
    finally:
        await pool.close()


def test_listing_by_a_type_this_replica_does_not_run_lists_its_workflows(api: httpx.Client, stack: Stack) -> None:
    """GET /workflows?type= takes any well-formed type name and lists what matches: the workflows
    of a type this replica does not run (a plug-in another replica has) are listed, not refused
    as an unknown type, as `agent-orchestrator list --type` shows; a type with none is an empty
    page, and a malformed name a 422 naming `type`."""
    wf_id = asyncio.run(_create_workflow(stack.settings.database_url, "gen_approve"))
    r = api.get("/workflows", params={"type": "gen_approve"})
    assert r.status_code == 200, r.text
    assert [(w["workflow_id"], w["workflow_type"]) for w in r.json()["items"]] == [(wf_id, "gen_approve")]
    assert api.get("/workflows", params={"type": "nope"}).json() == {"items": [], "next_cursor": None}
    for bad in ("Gen Approve", "gen_approve\n", "x" * 129):
        refused = api.get("/workflows", params={"type": bad})
        assert (refused.status_code, refused.json()["error"]["field"]) == (422, "type"), refused.text
        assert "^[a-z0-9][a-z0-9_.-]{0,127}$" in refused.json()["error"]["message"]
    command = [sys.executable, "-m", "agent_orchestrator", "list", "--type", "gen_approve"]
    done = subprocess.run(command, env=stack.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert wf_id in done.stdout


def test_workflow_types_list_schema_and_mermaid(api: httpx.Client) -> None:
    """GET /workflow-types gives each type's input schema, its answer's schema and its graph as Mermaid."""
    items = {t["name"]: t for t in api.get("/workflow-types").json()["items"]}
    assert {"pr_deployment", "parallel_docs", "self_healing"} <= set(items)
    assert "environment" in items["pr_deployment"]["input_schema"]["properties"]
    assert items["pr_deployment"]["resume_schema"]["properties"]["decision"]["enum"] == ["approve", "reject"]
    assert items["parallel_docs"]["resume_schema"] is None
    assert "approval" in items["pr_deployment"]["mermaid"]


def test_resume_of_running_or_finished_workflow_is_refused(
    api: httpx.Client, sample_repo: tuple[Path, str, str]
) -> None:
    """Resuming a workflow that is not interrupted gets a 409 naming its status."""
    wf_id = launch(api, "parallel_docs", {"repo_path": str(sample_repo[0]), "modules": ["calc"]})
    follow(api, wf_id, TERMINAL)
    r = api.post(f"/workflows/{wf_id}/resume", json={"decision": {"decision": "approve"}})
    assert r.status_code == 409
    assert r.json()["error"]["details"]["status"] == "succeeded"


def test_list_filters_and_paginates(api: httpx.Client, sample_repo: tuple[Path, str, str]) -> None:
    """GET /workflows filters by type and status and pages with a cursor without repeats. A cursor
    goes on with the filters it came with only (the page size may change): with others it is a
    422 naming it (it was taken as a position in the other listing, skipping part of it)."""
    for _ in range(2):
        launch(api, "parallel_docs", {"repo_path": str(sample_repo[0]), "modules": ["calc"]})
    page1 = api.get("/workflows", params={"type": "parallel_docs", "limit": 2}).json()
    assert all(w["workflow_type"] == "parallel_docs" for w in page1["items"])
    if page1["next_cursor"]:
        page2 = api.get(
            "/workflows", params={"type": "parallel_docs", "limit": 2, "cursor": page1["next_cursor"]}
        ).json()
        assert not {w["workflow_id"] for w in page1["items"]} & {w["workflow_id"] for w in page2["items"]}
    succeeded = api.get("/workflows", params={"status": "succeeded"}).json()["items"]
    assert all(w["status"] == "succeeded" for w in succeeded)
    unfiltered = api.get("/workflows", params={"limit": 1}).json()["next_cursor"]
    assert api.get("/workflows", params={"limit": 5, "cursor": unfiltered}).status_code == 200
    for other in ({"status": "failed"}, {"type": "parallel_docs"}):
        r = api.get("/workflows", params={"limit": 1, "cursor": unfiltered, **other})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["field"] == "cursor"
        assert "cursor continues the listing with status=(any), type=(any), not " in error["message"]


def test_head_is_served_where_get_is_and_a_405_says_what_is_allowed(
    api: httpx.Client, sample_repo: tuple[Path, str, str]
) -> None:
    """HEAD answers as GET does, without the body (it was a 405); every 405 keeps its JSON body
    and has the Allow header HTTP requires, listing all the path's methods."""
    wf_id = launch(api, "parallel_docs", {"repo_path": str(sample_repo[0]), "modules": ["calc"]})
    follow(api, wf_id, TERMINAL)
    for path in ("/health", "/workflows", f"/workflows/{wf_id}", "/workflow-types"):
        get, head = api.get(path), api.head(path)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
    for method, path, allow in [
        ("DELETE", "/workflows", "GET, HEAD, POST"),
        ("PUT", "/health", "GET, HEAD"),
        ("PATCH", "/workflow-types", "GET, HEAD"),
        ("DELETE", f"/workflows/{wf_id}", "GET, HEAD"),
        ("GET", f"/workflows/{wf_id}/cancel", "POST"),
    ]:
        r = api.request(method, path)
        assert (r.status_code, r.headers.get("allow")) == (405, allow), (method, path)
        assert r.json()["error"]["code"] == "http_405"
