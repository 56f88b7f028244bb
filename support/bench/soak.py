"""Soak: mixed workflows for a long while, with an agent instance killed every few minutes.

Set-up as in the workflow suite (registry, two no-op agent instances, two
orchestrator replicas, real processes). Workflows are ``agent_chain`` runs of 1
to 5 calls with payloads of a few bytes to ~20 KB, launched at up to
``LAUNCH_PER_S`` with at most ``IN_FLIGHT`` unfinished, over both replicas. Every
``kill_every_s`` the second agent instance is killed with SIGKILL and started
again a few seconds later (requests it held are reclaimed by the other).

Resident memory of every service that lives through the whole soak (registry,
both replicas, the first agent instance) is read from /proc about 40 times; growth,
the median of the last :data:`_WINDOW` readings against the median of the first
:data:`_WINDOW` after a warm-up (imports and caches settle), must stay under 5 %.
Medians, not single readings: a replica's connection pools open and close
connections as load bursts (up to 20 each, every one with its own statement cache
and buffers), which moves its RSS up and down by a few percent with no leak
behind it (its Python heap measured flat over 12,500 workflows with tracemalloc).
Every workflow launched must finish.

Figures: ``soak_minutes``, ``soak_workflows_launched`` / ``_finished`` /
``_succeeded`` / ``_unfinished``, ``soak_workflow_p50_s`` / ``_p99_s`` / ``_slowest_s``
(launch to finish), ``soak_agent_kills``, per service
``soak_rss_start_mb_<svc>``, ``soak_rss_end_mb_<svc>``, ``soak_rss_growth_percent_<svc>``,
``soak_max_rss_growth_percent`` and ``soak_max_rss_growth_second_half_percent``; the
curves ``soak rss <service>`` (MB against minutes) show whether memory grows or settles.

``agent-orchestrator bench soak --minutes 5``; ``make soak`` runs an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from shared.lib.embedded import free_port
from support.bench.harness import Progress, SuiteResult, percentile, say
from support.bench.workflow import (
    TERMINAL,
    Services,
    follow,
    launch,
    service_env,
    start_base,
    start_replica,
)

__all__ = ["run", "run_detailed"]

LAUNCH_PER_S = 10.0
IN_FLIGHT = 32
RESTART_AFTER_S = 5.0
DRAIN_TIMEOUT_S = 180.0
_rng = random.Random(11)  # mixes workflow shapes, not secrets


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _mixed_calls() -> list[dict[str, Any]]:
    size = _rng.choice([8, 256, 4096, 20_000])
    return [
        {"agent": "noop", "request_type": "NOOP", "payload": {"call": i, "blob": "x" * size}}
        for i in range(_rng.randint(1, 5))
    ]


class _Load:
    """Launches workflows at a steady pace and follows each to its end."""

    def __init__(self, http: httpx.AsyncClient, bases: list[str]) -> None:
        self.http, self.bases = http, bases
        self.launched: dict[str, str] = {}  # workflow id -> replica URL
        self.status: dict[str, str] = {}
        self.took_s: dict[str, float] = {}  # launch to finish, by the orchestrator's clock
        self.gate = asyncio.Semaphore(IN_FLIGHT)
        self.tasks: set[asyncio.Task[None]] = set()

    async def _one(self, n: int) -> None:
        base = self.bases[n % len(self.bases)]
        try:
            wid = await launch(self.http, base, "agent_chain", {"calls": _mixed_calls()})
            self.launched[wid] = base
            with contextlib.suppress(RuntimeError):  # not finished in time: drain() reads it again
                self._record(await follow(self.http, base, wid, poll_s=0.25))
        finally:
            self.gate.release()

    def _record(self, record: dict[str, Any]) -> None:
        wid = record["workflow_id"]
        self.status[wid] = record["status"]
        if record["status"] in TERMINAL:
            created, updated = (datetime.fromisoformat(record[k]) for k in ("created_at", "updated_at"))
            self.took_s[wid] = (updated - created).total_seconds()

    async def run_until(self, stop_at: float) -> None:
        n = 0
        while time.monotonic() < stop_at:
            await self.gate.acquire()
            task = asyncio.create_task(self._one(n))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            n += 1
            await asyncio.sleep(1 / LAUNCH_PER_S)

    async def drain(self) -> None:
        """Wait for every follower; then read the workflows not seen finished (a follower gives up
        after a minute) until each is, or ``DRAIN_TIMEOUT_S`` passed."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), DRAIN_TIMEOUT_S)
        while unseen := [(wid, base) for wid, base in self.launched.items() if self.status.get(wid) not in TERMINAL]:
            for wid, base in unseen:
                self._record((await self.http.get(f"{base}/workflows/{wid}")).json())
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(1.0)


async def _killer(services: Services, stop_at: float, kill_every_s: float, progress: Progress) -> int:
    """SIGKILL the second agent instance every ``kill_every_s``, restarting it after a pause."""
    kills = 0
    while time.monotonic() + kill_every_s < stop_at:
        await asyncio.sleep(kill_every_s)
        name = f"noop-2-{kills}" if kills else "noop-2"
        await services.kill9(name)
        kills += 1
        say(progress, f"soak: killed {name} (kill {kills}); restarting it in {RESTART_AFTER_S:.0f}s")
        await asyncio.sleep(RESTART_AFTER_S)
        port = free_port()
        await services.start(
            f"noop-2-{kills}",
            ["-m", "support.bench.noop_agent", "--port", str(port), "--instance-id", f"noop-2-{kills}"],
            ready_url=f"http://127.0.0.1:{port}/ready",
            service="noop",
        )
    return kills


async def _sample_rss(tracked: dict[str, int], every_s: float, out: dict[str, list[list[float]]]) -> None:
    """Every ``every_s``, each tracked service's resident memory: the curve says growth or plateau."""
    started = time.monotonic()
    while True:
        minute = (time.monotonic() - started) / 60
        for name, pid in tracked.items():
            with contextlib.suppress(OSError):
                out.setdefault(f"soak rss {name}", []).append([minute, _rss_mb(pid)])
        await asyncio.sleep(every_s)


#: How many readings each end of a memory comparison takes the median of.
_WINDOW = 5


def _median_mb(points: list[list[float]]) -> float:
    return percentile(sorted(mb for _, mb in points), 0.5)


def _memory(curves: dict[str, list[list[float]]], *, after_minute: float) -> dict[str, float]:
    """Each service's RSS at start (median of the first readings after ``after_minute``) and at
    the end (median of the last readings), and the growth between them."""
    out: dict[str, float] = {}
    for name, points in curves.items():
        settled = [p for p in points if p[0] >= after_minute]
        if len(settled) < 2 * _WINDOW:
            continue
        before, after = _median_mb(settled[:_WINDOW]), _median_mb(settled[-_WINDOW:])
        key = name.removeprefix("soak rss ").replace("-", "_")
        out[f"soak_rss_start_mb_{key}"] = before
        out[f"soak_rss_end_mb_{key}"] = after
        out[f"soak_rss_growth_percent_{key}"] = 100 * (after - before) / before
    out["soak_max_rss_growth_percent"] = max(
        (v for k, v in out.items() if k.startswith("soak_rss_growth")), default=math.nan
    )
    return out


def _figures(load: _Load, kills: int, duration_s: float) -> dict[str, float]:
    finished = sum(1 for s in load.status.values() if s in TERMINAL)
    took = sorted(load.took_s.values()) or [math.nan]
    return {
        "soak_minutes": duration_s / 60,
        "soak_workflows_launched": float(len(load.launched)),
        "soak_workflows_finished": float(finished),
        "soak_workflows_succeeded": float(sum(1 for s in load.status.values() if s == "succeeded")),
        "soak_workflows_unfinished": float(len(load.launched) - finished),
        "soak_workflow_p50_s": percentile(took, 0.5),
        "soak_workflow_p99_s": percentile(took, 0.99),
        "soak_workflow_slowest_s": took[-1],
        "soak_agent_kills": float(kills),
    }


async def _soak(services: Services, api_key: str, duration_s: float, progress: Progress) -> SuiteResult:
    bases = [await start_replica(services, 1), await start_replica(services, 2)]
    warmup_s = min(max(duration_s * 0.1, 20.0), 300.0)
    kill_every_s = min(max(duration_s / 5, 60.0), 240.0)
    stop_at = time.monotonic() + warmup_s + duration_s
    result = SuiteResult()
    async with httpx.AsyncClient(timeout=30, headers={"X-API-Key": api_key}) as http:
        load = _Load(http, bases)
        runner = asyncio.create_task(load.run_until(stop_at))
        tracked = {n: p for n, p in services.pids().items() if not n.startswith("noop-2")}
        sampler = asyncio.create_task(_sample_rss(tracked, max(duration_s / 40, 5.0), result.series))
        say(progress, f"soak: warming up for {warmup_s:.0f}s before the memory readings compared")
        await asyncio.sleep(warmup_s)
        say(progress, f"soak: {duration_s / 60:.0f} min of mixed workflows, an agent killed every {kill_every_s:.0f}s")
        kills = await _killer(services, stop_at, kill_every_s, progress)
        await runner
        sampler.cancel()
        say(progress, f"soak: waiting for the last of {len(load.launched)} workflows")
        await load.drain()
    curves = {k: v for k, v in result.series.items() if k.startswith("soak rss ")}
    result.figures = {**_figures(load, kills, duration_s), **_memory(curves, after_minute=warmup_s / 60)}
    result.figures["soak_max_rss_growth_second_half_percent"] = _second_half_growth(curves, warmup_s / 60)
    result.notes["soak"] = (
        f"{duration_s / 60:.0f} min after a {warmup_s:.0f} s warm-up; resident memory growth "
        f"{result.figures['soak_max_rss_growth_percent']:.1f} % at most over the whole soak, "
        f"{result.figures['soak_max_rss_growth_second_half_percent']:.1f} % over its second half "
        "(growth that settles, against growth that goes on)."
    )
    return result


def _second_half_growth(curves: dict[str, list[list[float]]], warmup_minutes: float) -> float:
    """The largest growth, in percent, of any tracked service over the second half of its readings
    after the warm-up (medians of :data:`_WINDOW` readings at each end, as :func:`_memory`)."""
    second_halves = {}
    for name, points in curves.items():
        settled = [p for p in points if p[0] >= warmup_minutes]
        second_halves[name] = settled[len(settled) // 2 :]
    return _memory(second_halves, after_minute=0.0)["soak_max_rss_growth_percent"]


async def run_detailed(settings: Any, *, progress: Progress = None, duration_s: float = 300.0) -> SuiteResult:
    """Soak the stack for ``duration_s`` (after a warm-up) on ``settings``' database and Redis."""
    api_key = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="aobench-soak", dir="/tmp") as tmp:
        registry_port = free_port()
        env = service_env(settings, registry_port=registry_port, data_dir=Path(tmp), api_key=api_key)
        services = Services(env, Path(tmp))
        try:
            say(progress, "soak: starting the registry, two no-op agents and two orchestrators")
            await start_base(services, registry_port=registry_port)
            return await _soak(services, api_key, duration_s, progress)
        finally:
            await services.stop()


async def run(settings: Any, *, progress: Progress = None, duration_s: float = 300.0) -> dict[str, float]:
    return (await run_detailed(settings, progress=progress, duration_s=duration_s)).figures
