"""PostgreSQL crashed and restarted under a running stack.

The test owns its PostgreSQL (an embedded server of its own: the session's may be shared and
must never be restarted). While workflows run, the server is stopped in ``immediate`` mode (every
backend killed, no shutdown checkpoint: crash recovery on the way back), kept down past the run
lease TTL, and started again on the same socket. The stack is not touched.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from agent_orchestrator.demo import make_sample_repo
from agent_orchestrator.stack import Stack
from shared.lib.embedded import EmbeddedPostgres
from support.tests.e2e.conftest import start_stack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TERMINAL = {"succeeded", "failed", "cancelled"}
DOWN_S = 4.0  # longer than the stack's run lease TTL (3 s)


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of this test's own (outside pytest's 0700 temp tree, as conftest's)."""
    data_dir = Path(tempfile.mkdtemp(prefix="ao-test-pg-restart-"))
    server = EmbeddedPostgres(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _crash_and_restart(server: EmbeddedPostgres) -> None:
    server.pg_ctl(["-w", "-m", "immediate", "stop"])
    time.sleep(DOWN_S)
    server.pg_ctl(["-w", "-l", str(server.log_path), "restart"])  # "restart": with the options it ran with


def _launch(api: httpx.Client, workflow_type: str, data: dict[str, object]) -> str:
    r = api.post("/workflows", json={"workflow_type": workflow_type, "input": data})
    assert r.status_code == 202, r.text
    return str(r.json()["workflow_id"])


def _settle(api: httpx.Client, ids: list[str], timeout_s: float = 120) -> dict[str, dict[str, object]]:
    """Approve every approval as it comes; return each workflow once all are terminal."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workflows = {i: api.get(f"/workflows/{i}", params={"state": "false"}).json() for i in ids}
        for wf_id, wf in workflows.items():
            if wf["status"] == "interrupted":
                api.post(f"/workflows/{wf_id}/resume", json={"decision": {"decision": "approve", "by": "chaos"}})
        if all(wf["status"] in TERMINAL for wf in workflows.values()):
            return workflows
        time.sleep(0.3)
    raise AssertionError({i: (wf["status"], wf.get("reason")) for i, wf in workflows.items()})


def _wait_ready(stack: Stack, timeout_s: float = 60) -> None:
    """Every service of the stack answers /ready with 200."""
    deadline = time.monotonic() + timeout_s
    pending = list(stack.processes)
    while pending and time.monotonic() < deadline:
        pending = [sp for sp in pending if _status(f"{sp.url}/ready") != 200]
        time.sleep(0.2)
    assert not pending, [sp.name for sp in pending]


def _read_states(stack: Stack, api: httpx.Client, ids: list[str], *, times: int) -> list[int]:
    """Read each workflow's state (through the checkpointer) ``times`` times, all at once: the
    status codes."""
    urls = [f"/workflows/{i}" for i in ids] * times
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        return list(pool.map(lambda url: api.get(url, params={"state": "true"}).status_code, urls))


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_workflows_finish_across_a_postgres_crash(
    own_postgres: EmbeddedPostgres, server_urls: tuple[str, str], tmp_path: Path
) -> None:
    """Workflows running when PostgreSQL crashes all succeed once it is back, each deploy made once;
    every service is ready again, still registered, and serves new workflows and reads at once."""
    admin_url = own_postgres.running_url()
    assert admin_url is not None
    stack, db_name = start_stack((admin_url, server_urls[1]), tmp_path, docs=2)
    try:
        with httpx.Client(base_url=stack.orchestrator_url, headers={"X-API-Key": stack.api_key}, timeout=30) as api:
            repos = [make_sample_repo(tmp_path / f"r{i}") for i in range(3)]
            ids = [
                _launch(api, "pr_deployment", {"repo_path": str(r), "base": b, "head": h, "environment": f"env-{i}"})
                for i, (r, b, h) in enumerate(repos)
            ]
            ids.append(_launch(api, "parallel_docs", {"repo_path": str(repos[0][0]), "modules": ["calc", "calc.ops"]}))
            while not any(wf["status"] == "running" for wf in api.get("/workflows").json()["items"]):
                time.sleep(0.05)
            _read_states(stack, api, ids, times=8)  # the checkpointer's pool opens several connections
            _crash_and_restart(own_postgres)
            _wait_ready(stack)
            # ready means ready: no read meets a connection the crash killed (they answered 503)
            codes = _read_states(stack, api, ids, times=4)
            assert set(codes) == {200}, codes
            after = make_sample_repo(tmp_path / "after")
            ids.append(
                _launch(
                    api,
                    "pr_deployment",
                    {"repo_path": str(after[0]), "base": after[1], "head": after[2], "environment": "after"},
                )
            )
            final = _settle(api, ids)
        assert {wf["status"] for wf in final.values()} == {"succeeded"}, {
            i: (wf["status"], wf["reason"]) for i, wf in final.items()
        }
        envs = stack.settings.data_dir / "environments"
        for env in [f"env-{i}" for i in range(3)] + ["after"]:
            assert len(list((envs / env / "releases").iterdir())) == 1, env
        with httpx.Client(
            base_url=stack.settings.url_for("agent-registry"), headers={"X-API-Key": stack.api_key}
        ) as reg:
            statuses = {a["id"]: a["status"] for a in reg.get("/agents").json()}
        assert len(statuses) >= 7, statuses
        assert set(statuses.values()) <= {"active", "busy"}, statuses
        assert all(sp.proc is not None and sp.proc.poll() is None for sp in stack.processes)
    finally:
        stop_stack(stack, (admin_url, server_urls[1]), db_name)
