"""``make demo``: the three reference workflows, end to end, on a sample repository.

The demo drives the stack only through the orchestrator's HTTP API, as a user
would: it launches ``pr_deployment`` and approves it when it asks, runs
``parallel_docs`` over two documentation instances, then kills one of those
instances with SIGKILL and lets ``self_healing`` find and repair the damage.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent_orchestrator.stack import Stack
from shared.lib.workflow_state import TERMINAL_STATUSES

__all__ = ["DemoResult", "make_sample_repo", "run_demo"]

_FOLLOW_TIMEOUT_S = 240.0
_TERMINAL = TERMINAL_STATUSES

_PACKAGE = {
    "calc/__init__.py": '"""A tiny calculator package."""\n\nfrom calc.ops import add, sub\n\n'
    '__all__ = ["add", "sub"]\n',
    "calc/ops.py": '"""Arithmetic operations."""\n\n\ndef add(a: int, b: int) -> int:\n    """Return a + b."""\n'
    '    return a + b\n\n\ndef sub(a: int, b: int) -> int:\n    """Return a - b."""\n    return a - b\n',
    "calc/stats.py": '"""Statistics over sequences of numbers."""\n\n\ndef mean(values: list[float]) -> float:\n'
    '    """The arithmetic mean of ``values``."""\n    return sum(values) / len(values)\n',
    "tests/test_ops.py": "from calc.ops import add, sub\n\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\n"
    "def test_sub():\n    assert sub(5, 3) == 2\n",
    "README.md": "# calc\n\nA tiny calculator, used by the orchestrator demo.\n",
}
_CHANGE = {
    "calc/ops.py": _PACKAGE["calc/ops.py"] + '\n\ndef mul(a: int, b: int) -> int:\n    """Return a * b."""\n'
    "    return a * b\n",
    "tests/test_mul.py": "from calc.ops import mul\n\n\ndef test_mul():\n    assert mul(4, 3) == 12\n",
}


def _git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "demo",
        "GIT_AUTHOR_EMAIL": "demo@example.invalid",
        "GIT_COMMITTER_NAME": "demo",
        "GIT_COMMITTER_EMAIL": "demo@example.invalid",
        "PATH": "/usr/bin:/bin:/usr/local/bin",
    }
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _write(repo: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def make_sample_repo(root: Path) -> tuple[Path, str, str]:
    """A git repository with a base commit and a head commit adding a feature and its test; its
    path is absolute, as workflow inputs take it."""
    repo = (root / f"sample-repo-{int(time.time())}").resolve()
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    _write(repo, _PACKAGE)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "calc: add and sub")
    base = _git(repo, "rev-parse", "HEAD")
    _write(repo, _CHANGE)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "calc: mul")
    return repo, base, _git(repo, "rev-parse", "HEAD")


@dataclass
class DemoResult:
    name: str
    workflow_id: str = ""
    status: str = "not run"
    seconds: float = 0.0
    summary: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


class _Api:
    def __init__(self, base_url: str, api_key: str, *, registry_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"X-API-Key": api_key}, timeout=30.0)
        self.registry_url = registry_url

    def launch(self, workflow_type: str, data: dict[str, Any]) -> str:
        r = self.http.post("/workflows", json={"workflow_type": workflow_type, "input": data})
        r.raise_for_status()
        return str(r.json()["workflow_id"])

    def follow(self, workflow_id: str, *, until: AbstractSet[str]) -> dict[str, Any]:
        deadline = time.monotonic() + _FOLLOW_TIMEOUT_S
        while time.monotonic() < deadline:
            wf = self.http.get(f"/workflows/{workflow_id}").json()
            if wf["status"] in until:
                return dict(wf)
            time.sleep(0.2)
        raise TimeoutError(f"workflow {workflow_id} did not reach {sorted(until)} in {_FOLLOW_TIMEOUT_S:.0f}s")

    def resume(self, workflow_id: str, decision: dict[str, Any]) -> None:
        self.http.post(f"/workflows/{workflow_id}/resume", json={"decision": decision}).raise_for_status()


def _pr_deployment(api: _Api, repo: Path, base: str, head: str, out: Console) -> DemoResult:
    res = DemoResult("pr_deployment")
    res.workflow_id = api.launch(
        "pr_deployment", {"repo_path": str(repo), "base": base, "head": head, "environment": "staging"}
    )
    wf = api.follow(res.workflow_id, until=_TERMINAL | {"interrupted"})
    if wf["status"] == "interrupted":
        ask = wf.get("pending_interrupt") or {}
        asked = f"{ask.get('question')} review={ask.get('review')} tests={ask.get('tests')}"
        out.print(f"  approval requested: {asked}", markup=False)
        api.resume(res.workflow_id, {"decision": "approve", "by": "demo-operator", "comment": "looks good"})
        out.print("  approved through POST /workflows/{id}/resume")
        wf = api.follow(res.workflow_id, until=_TERMINAL)
    res.status, res.detail = wf["status"], wf
    steps = (wf.get("result") or {}).get("steps", {})
    release = steps.get("deploy", {}).get("release", {})
    res.summary = (
        f"review approved={steps.get('review', {}).get('approved')}, "
        f"tests passed={steps.get('test', {}).get('passed')}, "
        f"deployed {head[:8]} -> {release.get('path', '?')}"
        if res.ok
        else str(wf.get("reason") or wf.get("errors"))
    )
    return res


def _parallel_docs(api: _Api, repo: Path) -> DemoResult:
    res = DemoResult("parallel_docs")
    res.workflow_id = api.launch(
        "parallel_docs", {"repo_path": str(repo), "modules": ["calc", "calc.ops", "calc.stats"]}
    )
    wf = api.follow(res.workflow_id, until=_TERMINAL)
    res.status, res.detail = wf["status"], wf
    result = wf.get("result") or {}
    res.summary = (
        f"{result.get('parts')} parts by {len(result.get('instances', []))} instances "
        f"{result.get('instances')}, failed parts: {len(result.get('failed_parts', []))}"
        if res.ok
        else str(wf.get("reason"))
    )
    return res


def _self_healing(api: _Api, stack: Stack, out: Console) -> DemoResult:
    res = DemoResult("self_healing")
    victim = stack.find("documentation")[-1]
    stack.kill9(victim)
    out.print(f"  injected fault: SIGKILL to {victim.name} (pid gone, still registered)", markup=False)
    _wait_noticed(api, victim.name)
    res.workflow_id = api.launch("self_healing", {"registry": True, "agents": ["documentation"], "max_iterations": 3})
    wf = api.follow(res.workflow_id, until=_TERMINAL)
    res.status, res.detail = wf["status"], wf
    result = wf.get("result") or {}
    res.summary = (
        f"is_resolved={result.get('is_resolved')} after {result.get('iterations')} iteration(s), "
        f"actions={[a.get('remediation', {}).get('action') for a in result.get('actions', [])]}"
        if wf["status"] in _TERMINAL
        else ""
    )
    return res


def _wait_noticed(api: _Api, instance: str, *, timeout_s: float = 30.0) -> None:
    """Wait until the registry stops counting the killed instance as healthy (its TTL passes)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=api.registry_url, headers=api.http.headers, timeout=10.0) as registry:
        while time.monotonic() < deadline:
            r = registry.get(f"/agents/{instance}")
            if r.status_code == 404 or r.json().get("status") not in {"active", "busy", "initializing"}:
                return
            time.sleep(0.5)


def run_demo(stack: Stack, *, work_dir: Path, out: Console) -> list[DemoResult]:
    """Run the three workflows against a started stack and return what each did."""
    api = _Api(stack.orchestrator_url, stack.api_key, registry_url=stack.settings.url_for("agent-registry"))
    repo, base, head = make_sample_repo(work_dir)
    out.print(f"sample repository: {repo} ({base[:8]} -> {head[:8]})", markup=False)
    results = []
    steps: list[tuple[str, Callable[[], DemoResult]]] = [
        ("pr_deployment", lambda: _pr_deployment(api, repo, base, head, out)),
        ("parallel_docs", lambda: _parallel_docs(api, repo)),
        ("self_healing", lambda: _self_healing(api, stack, out)),
    ]
    try:
        for name, step in steps:
            out.rule(name)
            started = time.monotonic()
            try:
                res = step()
            except (httpx.HTTPError, TimeoutError, KeyError) as e:
                res = DemoResult(name, status="error", summary=_failure(e))
            res.seconds = time.monotonic() - started
            out.print(f"  {res.status} in {res.seconds:.1f}s: {res.summary}", markup=False)  # an error's text, as it is
            results.append(res)
    finally:
        api.http.close()
    return results


def _failure(exc: Exception) -> str:
    """What went wrong, in a line: an API refusal's own message, else the exception."""
    if isinstance(exc, httpx.HTTPStatusError):
        try:
            error = exc.response.json()["error"]
            return f"{exc.response.status_code} {error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            pass
    return f"{type(exc).__name__}: {exc}"


def summary_table(results: list[DemoResult]) -> Table:
    table = Table(title="demo: reference workflows")
    for col in ("workflow", "id", "status", "seconds"):
        table.add_column(col)
    table.add_column("what it did", overflow="fold")  # whole: a release path, an error
    for r in results:
        style = "green" if r.ok else "red"
        table.add_row(r.name, r.workflow_id[:8], Text(r.status, style=style), f"{r.seconds:.1f}", Text(r.summary))
    return table
