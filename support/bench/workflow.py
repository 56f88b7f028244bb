"""Workflow benchmark: three no-op agent calls, launched through the HTTP API and followed
to completion, on real processes; ``langgraph dev`` as the peer.

Set-up, all separate processes on one fresh database and Redis prefix: the
registry, two instances of the no-op agent (``support.bench.noop_agent``), and
one, then two, orchestrator replicas (``agent-orchestrator serve``). A workflow
is ``agent_chain`` with three ``NOOP`` calls; the client POSTs ``/workflows``
and follows ``GET /workflows/{id}/events`` (server-sent events, pushed as they are
published) until the terminal status, whose event carries the result; it checks the
outputs.

Figures:
- ``workflow_e2e_p50_ms`` / ``workflow_e2e_p99_ms``: one workflow at a time, one replica;
- ``workflow_e2e_wait_p50_ms`` / ``..._p99_ms``: the same workflow launched with
  ``POST /workflows?wait_s=``, which answers with the outcome (as the peer's ``/runs/wait``
  does), measured in rounds interleaved with the followed one;
- ``workflow_e2e_streamed_p50_ms`` / ``..._p99_ms``: launched with ``POST /workflows?stream=true``,
  whose answer is the event stream (as the peer's ``/runs/stream``): followed in one request;
- ``workflow_e2e_p50_ms_<n>_replicas`` for n in 1, 2 (the plot's curve);
- ``workflow_write_transactions``: write transactions (commits) per workflow, server-wide;
- ``workflow_phase_<phase>_ms``: median time between a workflow's stored events (launch ->
  pending -> running -> succeeded -> seen by the client), and a call node's duration as its
  event reports it: where the time goes;
- ``workflow_hop_pg_commit_ms`` / ``..._after_idle_ms`` and ``workflow_hop_redis_ping_ms`` /
  ``..._after_idle_ms``: a one-row autocommit INSERT on the suite's database and a Redis ``PING``,
  each timed back to back and after ``HOP_IDLE_S`` of idling. A workflow's hops come after such
  gaps (its processes wait on each other), and an idle CPU of a VM takes a while to wake: the
  difference is what each hop of a workflow pays on this machine that a tight loop does not;
- ``workflow_throughput_per_s``: ``THROUGHPUT_N`` workflows launched over two replicas as fast
  as the API takes them, from the first launch to the last finish as the orchestrator
  recorded it;
- ``workflow_cpu_ms_<kind>``: meanwhile, CPU milliseconds per workflow of the orchestrator
  replicas, the agents and the benchmark's client (from ``/proc``; the servers not counted);
- the peer: ``langgraph_dev_run_p50_ms`` and ``langgraph_dev_runs_per_s``, ``POST /runs/wait``
  of a three-node no-op graph on ``langgraph dev`` (langgraph-cli[inmem]) in its own
  environment (``uv tool run``); when it cannot run, ``notes`` says why.

Run alone: ``uv run python -m support.bench.workflow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from shared.lib.embedded import free_port
from support.bench.harness import (
    Plan,
    Progress,
    SuiteResult,
    measure,
    quantiles,
    say,
    standalone,
    throughput,
    timed,
)

__all__ = [
    "CALLS",
    "Services",
    "follow",
    "follow_events",
    "launch",
    "run",
    "run_detailed",
    "service_env",
    "start_base",
    "start_replica",
    "wait_ready",
]

ROOT = Path(__file__).resolve().parents[2]
CALLS = [{"agent": "noop", "request_type": "NOOP", "payload": {"call": i}} for i in range(3)]
LATENCY_PLAN = Plan(warmup=30, rounds=5, per_round=40)
THROUGHPUT_N = 600
THROUGHPUT_IN_FLIGHT = 48
NOOP_INSTANCES = 2
FOLLOW_TIMEOUT_S = 60.0
HOP_IDLE_S = 0.005
HOP_SAMPLES = 300
READY_TIMEOUT_S = 60.0
TERMINAL = {"succeeded", "failed", "cancelled"}
PEER_RUNS = 30
PEER_IN_FLIGHT = 32
PEER_SECONDS = 5.0
PEER_READY_TIMEOUT_S = 240.0


async def wait_ready(
    url: str, proc: asyncio.subprocess.Process, log: Path, *, service: str | None, timeout_s: float
) -> None:
    """Until ``url`` answers 200 as ``service`` (another service there has the port: an error);
    with None (a peer, not one of ours), any 200."""
    from agent_orchestrator.stack import ready_service

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"{log.stem} exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (r := await http.get(url)).status_code == 200:
                    if service is not None and (answered := ready_service(r)) != service:
                        raise RuntimeError(f"{url} answers as {answered}, not {service}: another process has its port")
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f}s: {log.read_text()[-2000:]}")


class Services:
    """The processes of one benchmark: started in order, stopped (SIGTERM, then SIGKILL) in reverse."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[tuple[str, asyncio.subprocess.Process]] = []

    async def start(
        self, name: str, args: list[str], *, ready_url: str, service: str, env: dict[str, str] | None = None
    ) -> int:
        """Start ``python ARGS`` as ``name``, wait for ``ready_url`` to answer as ``service``; its pid."""
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *args, env={**self.env, **(env or {})}, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.procs.append((name, proc))
        await wait_ready(ready_url, proc, log, service=service, timeout_s=READY_TIMEOUT_S)
        return proc.pid

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs if p.returncode is None}

    async def kill9(self, name: str) -> None:
        for n, proc in self.procs:
            if n == name and proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.returncode is None:
                proc.terminate()
        for _, proc in reversed(self.procs):
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def service_env(settings: Any, *, registry_port: int, data_dir: Path, api_key: str) -> dict[str, str]:
    """Environment for every service of a benchmark stack: the suite's database, prefix and secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AO_")}
    env.update(
        {
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "AO_REDIS_PREFIX": settings.redis_prefix,
            "AO_API_KEYS": api_key,
            "AO_REGISTRATION_SECRET": secrets.token_urlsafe(32),
            "AO_SIGNING_KEY": secrets.token_urlsafe(32),
            "REGISTRY_URL": f"http://127.0.0.1:{registry_port}",
            "AO_PORTS": json.dumps({"agent-registry": registry_port}),
            "AO_DATA_DIR": str(data_dir),
            "AO_LOG_LEVEL": "WARNING",
            "AO_DEV_MODE": "false",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


async def start_base(services: Services, *, registry_port: int, noop_instances: int = NOOP_INSTANCES) -> None:
    """The registry and the no-op agents."""
    await services.start(
        "registry",
        ["-m", "agent_orchestrator", "registry", "--port", str(registry_port)],
        ready_url=f"http://127.0.0.1:{registry_port}/ready",
        service="agent-registry",
    )
    for i in range(noop_instances):
        port = free_port()
        await services.start(
            f"noop-{i + 1}",
            ["-m", "support.bench.noop_agent", "--port", str(port), "--instance-id", f"noop-{i + 1}"],
            ready_url=f"http://127.0.0.1:{port}/ready",
            service="noop",
        )


async def start_replica(services: Services, index: int) -> str:
    """Orchestrator replica ``index`` on a free port; returns its base URL."""
    port = free_port()
    await services.start(
        f"orchestrator-{index}",
        ["-m", "agent_orchestrator", "serve", "--port", str(port)],
        ready_url=f"http://127.0.0.1:{port}/ready",
        service="orchestrator",
    )
    return f"http://127.0.0.1:{port}"


async def launch(http: httpx.AsyncClient, base: str, workflow_type: str, data: dict[str, Any]) -> str:
    r = await http.post(f"{base}/workflows", json={"workflow_type": workflow_type, "input": data})
    if r.status_code != 202:
        raise RuntimeError(f"launch answered {r.status_code}: {r.text[:300]}")
    return str(r.json()["workflow_id"])


async def follow(http: httpx.AsyncClient, base: str, workflow_id: str, *, poll_s: float = 0.001) -> dict[str, Any]:
    """Poll until the workflow is terminal; its record."""
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    while time.monotonic() < deadline:
        record: dict[str, Any] = (await http.get(f"{base}/workflows/{workflow_id}?state=false")).json()
        if record.get("status") in TERMINAL:
            return record
        await asyncio.sleep(poll_s)
    raise RuntimeError(f"workflow {workflow_id} not finished after {FOLLOW_TIMEOUT_S:.0f}s")


async def follow_events(http: httpx.AsyncClient, base: str, workflow_id: str) -> dict[str, Any]:
    """Follow the workflow's event stream (pushed as events are published) to its terminal
    status; that event's data (status, reason, and the result or errors it carries)."""
    async with asyncio.timeout(FOLLOW_TIMEOUT_S):
        async with http.stream("GET", f"{base}/workflows/{workflow_id}/events") as stream:
            return await _terminal_event(stream, f"the event stream of workflow {workflow_id}")


async def _terminal_event(stream: httpx.Response, what: str) -> dict[str, Any]:
    """The data of the terminal ``workflow.status`` event of a server-sent event stream, read to
    its end (the server ends it there), so the connection is kept for the next request."""
    event, outcome = "", None
    async for line in stream.aiter_lines():
        if line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:") and event == "workflow.status":
            data: dict[str, Any] = json.loads(line.removeprefix("data:"))
            outcome = data if data.get("status") in TERMINAL else outcome
    if outcome is None:
        raise RuntimeError(f"{what} ended before its terminal status")
    return outcome


def _check(outcome: dict[str, Any], what: str) -> None:
    """A chain's outcome: succeeded, with every call's output."""
    if outcome.get("status") != "succeeded" or outcome["result"]["outputs"] != [c["payload"] for c in CALLS]:
        raise RuntimeError(f"{what} ended {outcome.get('status')}: {outcome.get('reason')}")


async def _chain(http: httpx.AsyncClient, base: str) -> None:
    workflow_id = await launch(http, base, "agent_chain", {"calls": CALLS})
    _check(await follow_events(http, base, workflow_id), f"workflow {workflow_id}")


async def _waited(http: httpx.AsyncClient, base: str) -> None:
    """One workflow launched with ``wait_s``: the launch answers with its outcome."""
    r = await http.post(
        f"{base}/workflows",
        params={"wait_s": FOLLOW_TIMEOUT_S},
        json={"workflow_type": "agent_chain", "input": {"calls": CALLS}},
    )
    if r.status_code != 200:
        raise RuntimeError(f"launch with wait_s answered {r.status_code}: {r.text[:300]}")
    _check(r.json(), "a launch with wait_s")


async def _streamed(http: httpx.AsyncClient, base: str) -> None:
    """One workflow launched with ``stream=true``: the launch's answer is its event stream."""
    body = {"workflow_type": "agent_chain", "input": {"calls": CALLS}}
    async with asyncio.timeout(FOLLOW_TIMEOUT_S):
        async with http.stream("POST", f"{base}/workflows", params={"stream": "true"}, json=body) as stream:
            _check(await _terminal_event(stream, "a streamed launch"), "a streamed launch")


async def _latency(http: httpx.AsyncClient, base: str, progress: Progress, label: str) -> dict[str, Any]:
    """e2e followed on the event stream, launched with ``wait_s`` and launched streaming, in
    interleaved rounds."""
    variants = {
        "e2e": lambda: _chain(http, base),
        "wait": lambda: _waited(http, base),
        "stream": lambda: _streamed(http, base),
    }
    return dict(await measure(variants, plan=LATENCY_PLAN, progress=progress, label=label))


_PHASES = (
    "launch_to_pending",
    "pending_to_running",
    "running_to_succeeded",
    "call_node",
    "succeeded_to_client",
)


def _phases(t_launch: float, t_seen: float, events: list[tuple[str, str, float, float | None]]) -> dict[str, float]:
    """Milliseconds between the stored events of one workflow (their transactions' start times;
    node events are written together, so a node's time is the duration its event reports)."""
    at: dict[str, list[float]] = {}
    for event_type, what, ts, _ in events:
        at.setdefault(f"{event_type}:{what}", []).append(ts)
    durations = [d for event_type, _, _, d in events if event_type == "workflow.node" and d is not None]
    marks = {
        "launch_to_pending": (t_launch, at["workflow.status:pending"][0]),
        "pending_to_running": (at["workflow.status:pending"][0], at["workflow.status:running"][0]),
        "running_to_succeeded": (at["workflow.status:running"][0], at["workflow.status:succeeded"][0]),
        "succeeded_to_client": (at["workflow.status:succeeded"][0], t_seen),
    }
    out = {name: 1000 * (b - a) for name, (a, b) in marks.items()}
    out["call_node"] = 1000 * statistics.median(durations) if durations else math.nan
    return out


async def _timeline(database_url: str, http: httpx.AsyncClient, base: str, *, n: int = 20) -> dict[str, float]:
    """Where one workflow's time goes: the median gap between its stored events, per phase."""
    from shared.lib.connections import connect_postgres

    runs = []
    for _ in range(n):
        started = time.time()
        workflow_id = await launch(http, base, "agent_chain", {"calls": CALLS})
        await follow_events(http, base, workflow_id)
        runs.append((workflow_id, started, time.time()))
    conn = await connect_postgres(database_url)
    try:
        sql = (
            "SELECT event_type, coalesce(payload->>'status', payload->>'node', '') AS what,"
            " extract(epoch FROM created_at)::float8 AS ts, (payload->>'duration_s')::float8 AS duration"
            " FROM events WHERE aggregate_id = $1 ORDER BY id"
        )
        phases = [_phases(t0, t1, [tuple(r) for r in await conn.fetch(sql, wid)]) for wid, t0, t1 in runs]
    finally:
        await conn.close()
    return {f"workflow_phase_{k}_ms": statistics.median(p[k] for p in phases) for k in _PHASES}


async def _hops(database_url: str, redis_url: str) -> dict[str, float]:
    """A one-row commit and a Redis PING, back to back and after ``HOP_IDLE_S`` idle (interleaved)."""
    from shared.lib.connections import connect_postgres, connect_redis

    conn = await connect_postgres(database_url)
    redis = await connect_redis(redis_url, max_connections=2)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_hop (v int)")
        ops = {
            "pg_commit": lambda: conn.execute("INSERT INTO bench_hop (v) VALUES (1)"),
            "redis_ping": redis.ping,
        }
        samples: dict[str, list[float]] = {f"{name}{kind}": [] for name in ops for kind in ("", "_after_idle")}
        for _ in range(HOP_SAMPLES):
            for name, op in ops.items():
                await op()  # the connection is warm: the next call is back to back
                samples[name].append(await timed(op))
                await asyncio.sleep(HOP_IDLE_S)
                samples[f"{name}_after_idle"].append(await timed(op))
    finally:
        await conn.close()
        await redis.aclose()
    return {f"workflow_hop_{name}_ms": statistics.median(s) for name, s in samples.items()}


async def _write_transactions(database_url: str, http: httpx.AsyncClient, base: str, *, n: int = 20) -> float:
    """Transaction ids the server hands out per workflow (each a commit that waits for the WAL
    flush): counted server-wide, so it is exact only when nothing else writes to the server."""
    from shared.lib.connections import connect_postgres

    conn = await connect_postgres(database_url)
    try:
        before = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
        for _ in range(n):
            await _chain(http, base)
        await asyncio.sleep(0.2)  # the last finish's bookkeeping
        after = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
    finally:
        await conn.close()
    return (after - before - 1) / n


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


async def _drained(http: httpx.AsyncClient, base: str) -> bool:
    for status in ("pending", "running"):
        page = (await http.get(f"{base}/workflows", params={"status": status, "limit": 1})).json()
        if page["items"]:
            return False
    return True


async def _records(http: httpx.AsyncClient, base: str, ids: set[str]) -> list[dict[str, Any]]:
    """The records of ``ids``, read a page of 500 at a time from the list endpoint."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"type": "agent_chain", "limit": 500, **({"cursor": cursor} if cursor else {})}
        page = (await http.get(f"{base}/workflows", params=params)).json()
        found += [r for r in page["items"] if r["workflow_id"] in ids]
        cursor = page.get("next_cursor")
        if not cursor or len(found) == len(ids):
            return found


async def _throughput(http: httpx.AsyncClient, bases: list[str], progress: Progress) -> tuple[float, int]:
    """Workflows per second with a backlog: ``THROUGHPUT_N`` launched over the replicas as fast as
    the API takes them, none followed one by one (that would load the replicas with reads); done
    when none is pending or running. First launch to last finish, by the orchestrator's clock."""
    n = max(int(THROUGHPUT_N * min(float(os.environ.get("AO_BENCH_SCALE") or 1), 1)), 20)
    say(progress, f"workflow: {n} workflows launched over {len(bases)} replicas, run to the end")
    gate = asyncio.Semaphore(THROUGHPUT_IN_FLIGHT)
    ids: set[str] = set()

    async def one(i: int) -> None:
        async with gate:
            ids.add(await launch(http, bases[i % len(bases)], "agent_chain", {"calls": CALLS}))

    await asyncio.gather(*(one(i) for i in range(n)))
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S + n / 10
    while not await _drained(http, bases[0]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} workflows not finished after {FOLLOW_TIMEOUT_S + n / 10:.0f}s")
        await asyncio.sleep(0.2)
    records = await _records(http, bases[0], ids)
    bad = [r for r in records if r["status"] != "succeeded"]
    if bad or len(records) != n:
        raise RuntimeError(f"{len(bad)} of {n} workflows did not succeed ({len(records)} found)")
    first = min(_ts(r["created_at"]) for r in records)
    last = max(_ts(r["updated_at"]) for r in records)
    return n / (last - first), n


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process used so far; 0 where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _throughput_with_cpu(
    http: httpx.AsyncClient, bases: list[str], services: Services, progress: Progress
) -> dict[str, float]:
    """Throughput, and the CPU milliseconds each kind of process spent per workflow meanwhile:
    the orchestrator replicas, the agents, and this client (the servers are not counted)."""
    pids = services.pids()
    before = {name: _cpu_s(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    rate, n = await _throughput(http, bases, progress)
    spent = {name: _cpu_s(pid) - before[name] for name, pid in pids.items()}
    kinds = {"orchestrator": "orchestrator-", "agents": "noop-"}
    figures = {
        f"workflow_cpu_ms_{kind}": 1000 * sum(v for k, v in spent.items() if k.startswith(prefix)) / n
        for kind, prefix in kinds.items()
    }
    figures["workflow_cpu_ms_client"] = 1000 * (time.process_time() - client_before) / n
    return {"workflow_throughput_per_s": rate, **figures}


async def _ours(settings: Any, tmp: Path, progress: Progress) -> SuiteResult:
    api_key = secrets.token_urlsafe(16)
    registry_port = free_port()
    services = Services(service_env(settings, registry_port=registry_port, data_dir=tmp, api_key=api_key), tmp)
    result = SuiteResult()
    try:
        say(progress, "workflow: starting the registry, no-op agents and an orchestrator")
        await start_base(services, registry_port=registry_port)
        bases = [await start_replica(services, 1)]
        async with httpx.AsyncClient(timeout=30, headers={"X-API-Key": api_key}) as http:
            timings = await _latency(http, bases[0], progress, "workflow (1 replica)")
            one = timings["e2e"]
            say(progress, "workflow: counting write transactions per workflow")
            result.figures["workflow_write_transactions"] = await _write_transactions(
                settings.database_url, http, bases[0]
            )
            say(progress, "workflow: timing the phases of a workflow from its stored events")
            result.figures.update(await _timeline(settings.database_url, http, bases[0]))
            say(progress, "workflow: timing a commit and a Redis round trip, back to back and after idling")
            result.figures.update(await _hops(settings.database_url, settings.redis_url))
            bases.append(await start_replica(services, 2))
            two = (await _latency(http, bases[1], progress, "workflow (2 replicas)"))["e2e"]
            result.figures.update(await _throughput_with_cpu(http, bases, services, progress))
    finally:
        await services.stop()
    result.figures.update(
        {
            "workflow_e2e_p50_ms": one.p50,
            "workflow_e2e_p99_ms": one.p99,
            "workflow_e2e_wait_p50_ms": timings["wait"].p50,
            "workflow_e2e_wait_p99_ms": timings["wait"].p99,
            "workflow_e2e_streamed_p50_ms": timings["stream"].p50,
            "workflow_e2e_streamed_p99_ms": timings["stream"].p99,
            "workflow_e2e_p50_ms_1_replicas": one.p50,
            "workflow_e2e_p50_ms_2_replicas": two.p50,
            "workflow_e2e_p99_ms_2_replicas": two.p99,
        }
    )
    result.notes["workflow"] = _note(result.figures)
    result.distributions["workflow e2e, 1 replica"] = quantiles(one.samples_ms)
    result.distributions["workflow e2e with wait_s, 1 replica"] = quantiles(timings["wait"].samples_ms)
    result.distributions["workflow e2e launched streaming, 1 replica"] = quantiles(timings["stream"].samples_ms)
    result.distributions["workflow e2e, 2 replicas"] = quantiles(two.samples_ms)
    result.series["workflow latency vs replicas"] = [[1.0, one.p50], [2.0, two.p50]]
    return result


def _note(f: dict[str, float]) -> str:
    phases = ", ".join(f"{k.replace('_', ' ')} {f[f'workflow_phase_{k}_ms']:.1f} ms" for k in _PHASES)
    return (
        f"One three-call workflow is {f['workflow_write_transactions']:.0f} write transactions on PostgreSQL "
        f"(each waits for a WAL flush) besides 3 bus round trips: the launch, and the outcome with the nodes' "
        f"events and the checkpoints (durability async: a node's event waits for the outcome up to half the "
        f"write-behind window, a checkpoint up to the window; under load, those whose window runs out first "
        f"are written on their own). A run claimed at launch starts running in the launch "
        f"statement (pending to running: 0). "
        f"Median time between its stored events (call node: the duration its event reports): {phases}. "
        f"Each hop costs more after a pause than in a tight loop: a one-row commit takes "
        f"{f['workflow_hop_pg_commit_ms']:.2f} ms back to back and {f['workflow_hop_pg_commit_after_idle_ms']:.2f} ms "
        f"after {1000 * HOP_IDLE_S:.0f} ms idle, a Redis PING {f['workflow_hop_redis_ping_ms']:.2f} and "
        f"{f['workflow_hop_redis_ping_after_idle_ms']:.2f} ms (an idle CPU of this VM takes that long to wake)."
    )


# -- the peer: langgraph dev ----------------------------------------------------------------------
_PEER_GRAPH = '''"""Three no-op nodes in a row: the benchmark's workflow without the agents."""
from typing import TypedDict

from langgraph.graph import END, START, StateGraph


class State(TypedDict, total=False):
    n: int


async def step(state: State) -> dict:
    return {"n": state.get("n", 0) + 1}


builder = StateGraph(State)
for i in range(3):
    builder.add_node(f"call{i}", step)
builder.add_edge(START, "call0")
builder.add_edge("call0", "call1")
builder.add_edge("call1", "call2")
builder.add_edge("call2", END)
graph = builder.compile()
'''


@contextlib.asynccontextmanager
async def _langgraph_dev(tmp: Path) -> AsyncIterator[str]:
    """``langgraph dev`` serving the peer graph from its own environment; yields its URL."""
    uv = shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv is not on PATH, so langgraph-cli cannot run in an environment of its own")
    project = tmp / "langgraph-peer"
    project.mkdir()
    (project / "graph.py").write_text(_PEER_GRAPH)
    (project / "langgraph.json").write_text(
        json.dumps({"dependencies": ["."], "graphs": {"chain": "./graph.py:graph"}})
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    log = tmp / "langgraph-dev.log"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            uv, "tool", "run", "--from", "langgraph-cli[inmem]", "langgraph", "dev", "--port", str(port),
            "--no-browser", "--no-reload", "--config", "langgraph.json",
            cwd=project, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/ok", proc, log, service=None, timeout_s=PEER_READY_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, 15)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                os.killpg(proc.pid, 9)
                await proc.wait()


async def _peer(tmp: Path, progress: Progress) -> SuiteResult:
    say(progress, "workflow: starting langgraph dev (the peer) in its own environment")
    try:
        async with _langgraph_dev(tmp) as url, httpx.AsyncClient(timeout=60) as http:

            async def run_wait() -> None:
                r = await http.post(f"{url}/runs/wait", json={"assistant_id": "chain", "input": {"n": 0}})
                if r.status_code != 200 or r.json() != {"n": 3}:
                    raise RuntimeError(f"langgraph dev answered {r.status_code}: {r.text[:200]}")

            say(progress, "workflow: langgraph dev, POST /runs/wait one at a time")
            plan = Plan(warmup=2, rounds=2, per_round=PEER_RUNS // 2)
            timing = (await measure({"runs/wait": run_wait}, plan=plan))["runs/wait"]
            say(progress, f"workflow: langgraph dev, {PEER_IN_FLIGHT} runs in flight")
            rate = await throughput(run_wait, in_flight=PEER_IN_FLIGHT, duration_s=PEER_SECONDS)
    except (RuntimeError, OSError, httpx.HTTPError) as e:
        return SuiteResult(notes={"langgraph_dev": f"the peer could not be measured here: {e}"[:600]})
    return SuiteResult(
        figures={"langgraph_dev_run_p50_ms": timing.p50, "langgraph_dev_runs_per_s": rate},
        distributions={"workflow langgraph dev /runs/wait": quantiles(timing.samples_ms)},
        notes={"langgraph_dev": "langgraph-cli[inmem] via uv tool run; POST /runs/wait of a three-node no-op graph"},
    )


async def run_detailed(settings: Any, *, progress: Progress = None) -> SuiteResult:
    with tempfile.TemporaryDirectory(prefix="aobench-wf", dir="/tmp") as tmp:
        result = await _ours(settings, Path(tmp), progress)
        result.merge(await _peer(Path(tmp), progress))
    if "langgraph_dev_run_p50_ms" in result.figures:
        result.figures["workflow_p50_speedup_vs_langgraph_dev"] = (
            result.figures["langgraph_dev_run_p50_ms"] / result.figures["workflow_e2e_p50_ms"]
        )
        result.figures["workflow_throughput_ratio_vs_langgraph_dev"] = (
            result.figures["workflow_throughput_per_s"] / result.figures["langgraph_dev_runs_per_s"]
        )
    return result


async def run(settings: Any, *, progress: Progress = None) -> dict[str, float]:
    return (await run_detailed(settings, progress=progress)).figures


if __name__ == "__main__":
    standalone(run)
