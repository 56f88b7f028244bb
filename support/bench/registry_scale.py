"""Registry scale benchmark: 500 instances heartbeating once a second against one registry.

Set-up: one registry process (``agent-orchestrator registry``) on a fresh
database; in this process, 500 :class:`RegistryClient` instances sharing one
connection pool register, report ``active`` and heartbeat every second (±10 %)
for ``STEADY_S`` seconds. The registry runs with the configured heartbeat TTL
(``AO_AGENT_STALE_AFTER_S``, 20 s by default); ``worst_silence_s`` shows how
close any instance came to it.

Figures:
- ``agents_heartbeating``: instances whose last heartbeat, as the registry
  stored it, is under 3 s old at the end, by the database's clock;
- ``agents_wrongly_offline``: stale transitions the registry counted
  (``registry_stale_agents_total``) plus instances offline at the end; every
  instance heartbeats throughout, so this must be 0;
- ``registry_cpu_percent``: the registry process's CPU (user + system) over the
  steady window, in percent of one core;
- ``heartbeat_p50_ms`` / ``heartbeat_p99_ms``: client-side heartbeat round trips;
- ``heartbeats_per_s`` (successful, client-side) against ``heartbeats_expected_per_s``;
- ``worst_silence_s``: the longest any instance went without a successful
  heartbeat during the window (to compare with ``stale_after_s``);
- ``machine_load_1m``: the load average at the end, since the machine is shared.

Run alone: ``uv run python -m support.bench.registry_scale`` prints the figures as
JSON (embedded PostgreSQL and Redis, placed as ``harness`` says, unless DATABASE_URL /
REDIS_URL are set).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from shared.lib.embedded import free_port
from support.bench.harness import Progress, percentile, say, scratch_database, standalone
from support.bench.workflow import wait_ready

__all__ = ["run"]

INSTANCES = 500
INTERVAL_S = 1.0
STEADY_S = 40.0
WARMUP_S = 5.0
NAME = "bench-agent"
_READY_TIMEOUT_S = 60.0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def _registry(
    database_url: str, redis_url: str, secrets_: dict[str, str], log: Path, *, stale_after_s: float
) -> AsyncIterator[Any]:
    """The registry as its own process; yields (url, pid) once it answers /ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AO_")}
    env.update(secrets_)
    env.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "AO_REDIS_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
            "AO_AGENT_STALE_AFTER_S": str(stale_after_s),
            "AO_AGENT_REMOVE_AFTER_S": "600",
            "AO_LOG_LEVEL": "WARNING",
        }
    )
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent_orchestrator", "registry", "--port", str(port),
            env=env, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(f"{url}/ready", proc, log, service="agent-registry", timeout_s=_READY_TIMEOUT_S)
        yield url, proc.pid
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class _Fleet:
    """500 clients, each with its own connection as an agent process would, recording heartbeat round trips."""

    def __init__(self, url: str, secrets_: dict[str, str]) -> None:
        from shared.lib.registry_client import RegistryClient

        self.clients = [
            RegistryClient(url, registration_secret=secrets_["AO_REGISTRATION_SECRET"], timeout_s=10)
            for _ in range(INSTANCES)
        ]
        self.samples: list[float] = []
        self.recording = False
        self.last_beat = [0.0] * INSTANCES
        self.max_gap_s = 0.0

    def _record(self, i: int, seconds: float) -> None:
        now = time.monotonic()
        if self.recording:
            self.samples.append(seconds)
            self.max_gap_s = max(self.max_gap_s, now - self.last_beat[i])
        self.last_beat[i] = now

    def worst_silence_s(self) -> float:
        """The longest time any instance went without a successful heartbeat, up to now."""
        now = time.monotonic()
        return max(self.max_gap_s, *(now - t for t in self.last_beat))

    async def register_all(self) -> None:
        from shared.lib.registry_models import AgentStatus, Registration, Skill

        gate = asyncio.Semaphore(32)
        skill = Skill(id="bench", name="Benchmark", tags=["bench"])

        async def one(i: int) -> None:
            async with gate:
                reg = Registration(
                    name=NAME, version="1.0.0", endpoint=f"http://127.0.0.1:{10000 + i}", capabilities=[skill]
                )
                await self.clients[i].register(reg)
                await self.clients[i].set_status(AgentStatus.ACTIVE)

        await asyncio.gather(*(one(i) for i in range(INSTANCES)))

    def start(self) -> None:
        for i, client in enumerate(self.clients):
            record = functools.partial(self._record, i)
            client.start_heartbeat(interval_s=INTERVAL_S, load=lambda: 0, on_heartbeat=record)

    async def close(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))


#: Instances whose stored heartbeat is under 3 s old by the database's clock: this process's
#: clock would add its own event-loop lag (it runs all 500 clients) to every age.
_FRESH = "SELECT count(*) FROM agent_instances WHERE name = $1 AND last_heartbeat > now() - interval '3 seconds'"


async def _registry_view(url: str, api_key: str, database_url: str) -> dict[str, float]:
    """What the registry says at the end: fresh heartbeats, offline instances, stale transitions."""
    from shared.lib.connections import connect_postgres

    conn = await connect_postgres(database_url)
    try:
        fresh = int(await conn.fetchval(_FRESH, NAME))
    finally:
        await conn.close()
    async with httpx.AsyncClient(timeout=10, headers={"X-API-Key": api_key}) as http:
        agents = (await http.get(f"{url}/agents", params={"name": NAME, "limit": 1000})).json()
        metrics = (await http.get(f"{url}/metrics")).text
    offline = sum(1 for a in agents if a["status"] == "offline")
    stale = sum(float(v) for v in re.findall(r"^registry_stale_agents_total\{[^}]*\} (\S+)$", metrics, re.M))
    return {"fresh": fresh, "offline": offline, "stale": stale}


async def _measure(
    url: str, pid: int, secrets_: dict[str, str], progress: Progress, *, stale_after_s: float, database_url: str
) -> dict[str, float]:
    fleet = _Fleet(url, secrets_)
    try:
        say(progress, f"registry scale: registering {INSTANCES} instances")
        await fleet.register_all()
        fleet.start()
        await asyncio.sleep(WARMUP_S)
        say(progress, f"registry scale: {INSTANCES} instances heartbeating every {INTERVAL_S}s for {STEADY_S}s")
        fleet.recording = True
        cpu_before, started = _cpu_s(pid), time.monotonic()
        await asyncio.sleep(STEADY_S)
        cpu_after, elapsed = _cpu_s(pid), time.monotonic() - started
        worst_silence_s = fleet.worst_silence_s()
        fleet.recording = False
        view = await _registry_view(url, secrets_["AO_API_KEYS"], database_url)
    finally:
        await fleet.close()
    expected = INSTANCES * elapsed / INTERVAL_S
    return {
        "agents_heartbeating": view["fresh"],
        "agents_wrongly_offline": view["stale"] + view["offline"],
        "registry_cpu_percent": 100 * (cpu_after - cpu_before) / elapsed,
        "heartbeat_p50_ms": 1000 * percentile(fleet.samples, 0.50),
        "heartbeat_p99_ms": 1000 * percentile(fleet.samples, 0.99),
        "heartbeats_per_s": len(fleet.samples) / elapsed,
        "heartbeats_expected_per_s": expected / elapsed,
        "worst_silence_s": worst_silence_s,
        "stale_after_s": stale_after_s,
        "machine_load_1m": os.getloadavg()[0],
    }


async def run(settings: Any, *, progress: Progress = None) -> dict[str, float]:
    """Run the benchmark on the servers of ``settings`` (embedded ones when unset)."""
    secrets_ = {
        "AO_API_KEYS": secrets.token_urlsafe(16),
        "AO_REGISTRATION_SECRET": secrets.token_urlsafe(24),
        "AO_SIGNING_KEY": secrets.token_urlsafe(24),
    }
    with tempfile.TemporaryDirectory(prefix="aobench", dir="/tmp") as tmp:
        async with scratch_database(settings.database_url, label="registry") as db_url:
            redis_url = settings.redis_url
            say(progress, "registry scale: starting the registry")
            log = Path(tmp) / "registry.log"
            stale_after_s = settings.agent_stale_after_s
            async with _registry(db_url, redis_url, secrets_, log, stale_after_s=stale_after_s) as (url, pid):
                return await _measure(url, pid, secrets_, progress, stale_after_s=stale_after_s, database_url=db_url)


if __name__ == "__main__":
    standalone(run)
