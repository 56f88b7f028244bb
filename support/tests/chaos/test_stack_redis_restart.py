"""The whole stack while its Redis is killed with SIGKILL mid-run and started again on the same port.

The Redis is this test's own (an embedded ``redis-server`` on a free port, data under
``tmp_path``): the session's may be the machine's shared server, which is never restarted.
PostgreSQL is the session's, with the stack's own database. Redis comes back two ways:

- ``aof``: on its own data, as its append-only file kept it (a crash of the process);
- ``empty``: with no data at all (a server without persistence, a lost volume): streams,
  consumer groups, liveness, in-flight markers and stored responses are gone.

Either way every workflow the API accepted succeeds: a call waits out the outage and is
answered once Redis is back, and a request Redis lost is sent again (once the instances
running requests have marked them in flight again, so none runs twice).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_orchestrator.demo import make_sample_repo
from agent_orchestrator.stack import Stack
from shared.lib.embedded import EmbeddedRedis, free_port
from support.tests.e2e.conftest import start_stack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TERMINAL = {"succeeded", "failed", "cancelled"}
#: How long Redis stays down: past the agents' stale TTL and the run lease (3 s in STACK_ENV).
OUTAGE_S = 4.0
#: Two requests at a time per agent instance, so some test runs wait queued in a stream when
#: Redis goes down (an empty Redis loses them: they must be sent again).
ENV = {"AO_AGENT_CONCURRENCY": "2"}
DOC_MODULES = ["calc", "calc.ops", "calc.stats"]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own on a free TCP port, so it can be killed and started again there."""
    server = EmbeddedRedis(tmp_path / "redis-1", port=free_port())
    yield server
    server.stop()


def _launch(api: httpx.Client, workflow_type: str, data: dict[str, Any]) -> str:
    r = api.post("/workflows", json={"workflow_type": workflow_type, "input": data})
    assert r.status_code == 202, r.text
    return str(r.json()["workflow_id"])


def _explain(repo: Path, module: str) -> dict[str, Any]:
    payload = {"repo_path": str(repo), "path": module}
    return {"agent": "code-review", "request_type": "EXPLAIN_CODE", "payload": payload}


def _chain(repo: Path) -> dict[str, Any]:
    """Three calls to two agents: the tests at HEAD (a second or so), then two module summaries."""
    test = {"agent": "cicd", "request_type": "RUN_PIPELINE", "payload": {"repo_path": str(repo)}}
    return {"calls": [test, _explain(repo, "calc/ops.py"), _explain(repo, "calc/stats.py")]}


def _launch_mix(api: httpx.Client, tmp: Path, tag: str, *, deploys: int) -> tuple[list[str], Counter[str]]:
    """``deploys`` pr_deployment runs (an environment each), two agent_chain runs and a
    parallel_docs run, each on a sample repository of its own; returns their ids and the agent
    calls they make, by request type."""
    ids = []
    for i in range(deploys):
        repo, base, head = make_sample_repo(tmp / f"{tag}-deploy-{i}")
        data = {"repo_path": str(repo), "base": base, "head": head, "environment": f"{tag}-{i}"}
        ids.append(_launch(api, "pr_deployment", data))
    for i in range(2):
        ids.append(_launch(api, "agent_chain", _chain(make_sample_repo(tmp / f"{tag}-chain-{i}")[0])))
    repo = make_sample_repo(tmp / f"{tag}-docs")[0]
    ids.append(_launch(api, "parallel_docs", {"repo_path": str(repo), "modules": DOC_MODULES}))
    per_deploy = ["REVIEW_CODE", "RUN_PIPELINE", "DEPLOY_ARTIFACT", "DEPLOY_SERVICE", "HEALTH_CHECK"]
    calls = Counter(per_deploy * deploys + ["RUN_PIPELINE", "EXPLAIN_CODE", "EXPLAIN_CODE"] * 2)
    return ids, calls + Counter({"GENERATE_DOCS": len(DOC_MODULES)})


def _statuses(api: httpx.Client, ids: list[str]) -> dict[str, str]:
    """Each workflow's status; an interrupted one (an approval) is approved as a user would."""
    statuses = {}
    for wf_id in ids:
        wf = api.get(f"/workflows/{wf_id}", params={"state": "false"}).json()
        statuses[wf_id] = wf["status"]
        if wf["status"] == "interrupted":
            api.post(f"/workflows/{wf_id}/resume", json={"decision": {"decision": "approve", "by": "chaos"}})
    return statuses


def _wait_running(api: httpx.Client, ids: list[str], *, at_least: int, timeout_s: float = 30) -> None:
    """Until ``at_least`` of ``ids`` are running (agent calls in flight)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(s == "running" for s in _statuses(api, ids).values()) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} workflows ran within {timeout_s:.0f}s")


def _unsucceeded(api: httpx.Client, ids: list[str], *, timeout_s: float) -> dict[str, tuple[str, str, str]]:
    """Once all of ``ids`` are terminal (approving them as they ask), those that did not succeed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not set(_statuses(api, ids).values()) <= TERMINAL:
        time.sleep(0.3)
    found = [api.get(f"/workflows/{i}", params={"state": "false"}).json() for i in ids]
    bad = [w for w in found if w["status"] != "succeeded"]
    return {w["workflow_id"]: (w["workflow_type"], w["status"], w["reason"]) for w in bad}


def _during_outage(api: httpx.Client, ids: list[str], tmp: Path) -> str:
    """What a user does while Redis is down: approves what waits, and launches a workflow (the API
    accepts it: a launch is stored in PostgreSQL; its call waits for Redis). Returns its id."""
    _statuses(api, ids)
    repo = make_sample_repo(tmp / "outage")[0]
    return _launch(api, "agent_chain", {"calls": [_explain(repo, "calc/ops.py")]})


def _ready(stack: Stack) -> dict[str, int]:
    """Each process's ``/ready`` status code (0: it did not answer)."""
    codes = {}
    for sp in stack.processes:
        try:
            codes[sp.name] = httpx.get(f"{sp.url}/ready", timeout=3).status_code
        except httpx.HTTPError:
            codes[sp.name] = 0
    return codes


def _wait_ready(stack: Stack, *, timeout_s: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while set((codes := _ready(stack)).values()) != {200} and time.monotonic() < deadline:
        time.sleep(0.2)
    return codes


def _active_agents(stack: Stack, *, expected: set[str], timeout_s: float = 20) -> set[str]:
    """The ids the registry lists active, once ``expected`` are among them (or the last answer)."""
    url = stack.settings.url_for("agent-registry")
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{url}/agents", params={"status": "active"}, headers={"X-API-Key": stack.api_key}, timeout=5)
        active = {a["id"] for a in r.json()}
        if active >= expected or time.monotonic() > deadline:
            return active
        time.sleep(0.2)


_RUNS = re.compile(r'^agent_requests_total\{[^}]*request_type="([A-Z_]+)"[^}]*\} (\S+)$', re.M)


def _runs(stack: Stack) -> Counter[str]:
    """How many times the agents ran a handler, by request type (their /metrics)."""
    runs: Counter[str] = Counter()
    for sp in stack.processes:
        if sp.service not in ("agent-registry", "orchestrator"):
            for request_type, value in _RUNS.findall(httpx.get(f"{sp.url}/metrics", timeout=5).text):
                runs[request_type] += int(float(value))
    return +runs


def _restart(server: EmbeddedRedis, mode: str, tmp: Path) -> EmbeddedRedis:
    """Redis started again on the same port: on its own data, or a fresh server with none."""
    if mode == "aof":
        server.start()
        return server
    fresh = EmbeddedRedis(tmp / "redis-2", port=server.port)
    fresh.start()
    return fresh


@pytest.mark.parametrize("mode", ["aof", "empty"])
def test_workflows_survive_a_redis_restart(
    mode: str, own_redis: EmbeddedRedis, server_urls: tuple[str, str], tmp_path: Path
) -> None:
    """Redis SIGKILLed while workflows run and started again on its port (with its data or
    empty): every accepted workflow succeeds, every agent call ran once, the registry lists every
    instance active again, every /ready is 200 again, new workflows succeed, no process died."""
    urls = (server_urls[0], own_redis.start())
    stack, db_name = start_stack(urls, tmp_path, docs=2, env=ENV)
    redis = own_redis
    try:
        with httpx.Client(base_url=stack.orchestrator_url, headers={"X-API-Key": stack.api_key}, timeout=30) as api:
            ids, calls = _launch_mix(api, tmp_path, "before", deploys=3)
            _wait_running(api, ids, at_least=3)
            own_redis.kill()
            down = _ready(stack)
            ids.append(_during_outage(api, ids, tmp_path))
            time.sleep(OUTAGE_S)
            redis = _restart(own_redis, mode, tmp_path)
            assert _unsucceeded(api, ids, timeout_s=90) == {}
            ready = _wait_ready(stack)
            agents = {sp.name for sp in stack.processes if sp.service not in ("agent-registry", "orchestrator")}
            active = _active_agents(stack, expected=agents)
            after, more_calls = _launch_mix(api, tmp_path, "after", deploys=1)
            assert _unsucceeded(api, after, timeout_s=60) == {}
        assert set(down.values()) == {503}, down  # each service saw the outage
        assert set(ready.values()) == {200}, ready
        assert active >= agents, active
        assert _runs(stack) == calls + more_calls + Counter(EXPLAIN_CODE=1)  # + the outage's launch
        dead = {sp.name: sp.proc.poll() for sp in stack.processes if sp.proc is None or sp.proc.poll() is not None}
        assert dead == {}, dead
    finally:
        try:
            stop_stack(stack, urls, db_name)
        finally:
            redis.stop()
