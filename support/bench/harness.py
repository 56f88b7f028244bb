"""What every benchmark suite shares: warm-up, repeats, interleaved rounds, percentiles,
throughput at a fixed number of requests in flight, the machine line, and where the
processes run (the CPU placement).

Variants compared in one suite are measured in interleaved rounds (a round of A,
a round of B, a round of A...), so load from anything else on this shared
machine weighs on each alike and the ratio between them stays meaningful.

Placement. On this VM a wake-up across CPUs costs about 40 us more than one on the same
CPU, and the kernel puts a client and its server on the same CPU or not as it pleases: the
same ``pg_try_advisory_lock`` + ``pg_advisory_unlock`` pair measured 0.039 ms on one CPU
and 0.169 ms across two (``python -m support.bench.locks``), and in an unpinned run the
floor's connection and ours need not land alike. So when the harness starts the servers
itself, the ``servers`` placement (the default) starts PostgreSQL and Redis on the last
CPU, and the processes of ours and of the peers talk to them across CPUs alike, as they
would to servers on their own hosts; the clients stay free to use every CPU. ``split``
also pins every client to the other CPUs (all the Python on one core of two: it cut the
messaging throughput by about 10 % and Celery's by 40 %); ``free`` leaves it all to the
kernel.

``AO_BENCH_SCALE`` (a float, default 1) scales every repeat count and duration:
the harness's own test runs suites at 0.02.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PLACEMENTS",
    "Op",
    "Plan",
    "Progress",
    "SuiteResult",
    "Timing",
    "machine_info",
    "measure",
    "percentile",
    "quantiles",
    "say",
    "scale",
    "scratch_database",
    "servers",
    "standalone",
    "throughput",
    "timed",
]

#: ``servers``: the servers on the last CPU; ``split``: and every other process on the other CPUs;
#: ``free``: the kernel places every process.
PLACEMENTS = ("servers", "split", "free")

Progress = Callable[[str], None] | None
"""Receives one line saying what a suite is doing now (the CLI shows it beside the bar)."""
Op = Callable[[], Awaitable[Any]]


def scale() -> float:
    """The repeat and duration multiplier from ``AO_BENCH_SCALE`` (default 1)."""
    return max(float(os.environ.get("AO_BENCH_SCALE") or 1.0), 0.001)


def say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]: a value that was actually observed."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(max(math.ceil(q * len(ordered)) - 1, 0), len(ordered) - 1)]


def quantiles(samples: Sequence[float], *, points: int = 101) -> list[float]:
    """``points`` evenly spaced percentiles (0 %..100 %): a compact distribution for the plots."""
    if not samples:
        return []
    return [percentile(samples, i / (points - 1)) for i in range(points)]


@dataclass(frozen=True)
class Timing:
    """Latency samples of one operation, in milliseconds."""

    samples_ms: tuple[float, ...]

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.samples_ms, 0.99)


@dataclass(frozen=True)
class Plan:
    """How much to measure: warm-up calls, then ``rounds`` rounds of ``per_round`` calls per variant."""

    warmup: int = 100
    rounds: int = 10
    per_round: int = 100

    def scaled(self) -> Plan:
        f = scale()
        return Plan(
            warmup=max(int(self.warmup * f), 1),
            rounds=max(int(self.rounds * min(f * 4, 1)), 2),
            per_round=max(int(self.per_round * f), 2),
        )


@dataclass
class SuiteResult:
    """A suite's figures (name -> number), plus what the report plots and what it should say in words."""

    figures: dict[str, float] = field(default_factory=dict)
    distributions: dict[str, list[float]] = field(default_factory=dict)
    """Latency quantiles (0..100 %) per operation, in milliseconds."""
    series: dict[str, list[list[float]]] = field(default_factory=dict)
    """Named (x, y) curves, e.g. throughput against requests in flight."""
    notes: dict[str, str] = field(default_factory=dict)

    def merge(self, other: SuiteResult) -> None:
        self.figures.update(other.figures)
        self.distributions.update(other.distributions)
        self.series.update(other.series)
        self.notes.update(other.notes)


async def timed(op: Op) -> float:
    """Milliseconds one call of ``op`` takes."""
    started = time.perf_counter()
    await op()
    return (time.perf_counter() - started) * 1000


async def _timed(op: Op, n: int, out: list[float]) -> None:
    for _ in range(n):
        out.append(await timed(op))


async def measure(ops: dict[str, Op], *, plan: Plan, progress: Progress = None, label: str = "") -> dict[str, Timing]:
    """Warm every op up, then time them in interleaved rounds; one :class:`Timing` per op."""
    plan = plan.scaled()
    for name, op in ops.items():
        say(progress, f"{label}: warming up {name}")
        await _timed(op, plan.warmup, [])
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for i in range(plan.rounds):
        say(progress, f"{label}: round {i + 1}/{plan.rounds}")
        for name, op in ops.items():
            await _timed(op, plan.per_round, samples[name])
    return {name: Timing(tuple(s)) for name, s in samples.items()}


async def throughput(op: Op, *, in_flight: int, duration_s: float) -> float:
    """Completed calls per second with ``in_flight`` callers looping on ``op`` for ``duration_s``."""
    duration_s = max(duration_s * scale(), 0.2)
    done = 0
    started = time.perf_counter()
    stop_at = started + duration_s

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await op()
            done += 1

    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return done / (time.perf_counter() - started)


def machine_info(*, postgres: str, redis: str) -> dict[str, Any]:
    """The machine line: cores, load average, where the processes ran and the versions the figures were taken with."""
    load = os.getloadavg()
    return {
        "cores": os.cpu_count() or 0,
        "load_1m": round(load[0], 2),
        "load_5m": round(load[1], 2),
        "load_15m": round(load[2], 2),
        "placement": describe_placement(),
        "postgres": postgres,
        "redis": redis,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
    }


_placed = ""


def describe_placement() -> str:
    """Where this run's servers and clients ran, in words (for the machine line)."""
    return _placed or "unpinned: the kernel placed every process"


def _server_and_client_cpus() -> tuple[set[int], set[int]] | None:
    """(server CPUs, client CPUs): the last CPU and the others; None with fewer than 2 CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


def _start_placed(embedded: Any, settings: Any, placement: str) -> tuple[tuple[str, str], set[int] | None, str]:
    """Start (or reuse) the servers; embedded ones on their own CPU unless ``placement`` is ``free``.

    Runs in a worker thread: affinity is per thread and a child inherits its parent
    thread's, so the servers started here land on the server CPU, and the thread is
    put back afterwards. Returns the URLs, the client CPUs (None: leave the caller
    unpinned) and the placement in words.
    """
    cpus = _server_and_client_cpus() if placement in ("split", "servers") else None
    configured = settings.database_url is not None or settings.redis_url is not None
    urls = (settings.database_url, settings.redis_url)
    if cpus is None or configured:
        return (
            embedded.ensure(database_url=urls[0], redis_url=urls[1]),
            None,
            "unpinned: " + ("configured servers" if configured else f"placement {placement}"),
        )
    server, clients = cpus
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, server)
    try:
        started = embedded.ensure(database_url=urls[0], redis_url=urls[1])
    finally:
        os.sched_setaffinity(0, before)
    if placement == "servers":
        return started, None, f"servers: PostgreSQL and Redis on CPU {min(server)}, the rest unpinned"
    cpu_list = ",".join(map(str, sorted(clients)))
    return started, clients, f"split: PostgreSQL and Redis on CPU {min(server)}, the rest on CPU {cpu_list}"


@contextlib.asynccontextmanager
async def servers(
    settings: Any, *, data_dir: Path | None = None, placement: str = "servers"
) -> AsyncIterator[tuple[str, str]]:
    """(admin PostgreSQL URL, Redis URL): the configured ones, or embedded servers started for the run
    and placed as ``placement`` says (see the module's docstring). The caller's CPUs are
    given back at the end."""
    from shared.lib.embedded import EmbeddedServers

    global _placed
    own_cpus = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="aobench", dir="/tmp") as tmp:
        embedded = EmbeddedServers(data_dir or Path(tmp))
        try:
            urls, clients, _placed = await asyncio.to_thread(_start_placed, embedded, settings, placement)
            if clients is not None:
                os.sched_setaffinity(0, clients)  # this thread starts every other process: they inherit it
            yield urls
        finally:
            os.sched_setaffinity(0, own_cpus)
            await asyncio.to_thread(embedded.stop)


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str, *, label: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one suite, dropped afterwards."""
    from shared.lib.connections import create_database, drop_database, with_database
    from shared.lib.migrations import apply_migrations

    name = f"aobench_{label}_{uuid.uuid4().hex[:8]}"
    url = await create_database(admin_url, name)
    try:
        await apply_migrations(url)
        yield url
    finally:
        await drop_database(with_database(admin_url, "postgres"), name)


def standalone(run: Callable[..., Awaitable[dict[str, float]]]) -> None:
    """``python -m support.bench.<suite>``: run one suite on embedded (or configured) servers, print JSON.

    ``AO_BENCH_PLACEMENT`` (``servers``, ``split`` or ``free``) sets the placement, as ``--placement`` does.
    """
    import json
    import sys

    from shared.lib.settings import load_settings

    async def main() -> dict[str, float]:
        settings = load_settings(dev_mode=True)
        placement = os.environ.get("AO_BENCH_PLACEMENT", "servers")
        async with (
            servers(settings, placement=placement) as (admin_url, redis_url),
            scratch_database(admin_url, label="solo") as db_url,
        ):
            update = {"database_url": db_url, "redis_url": redis_url, "redis_prefix": f"bench{uuid.uuid4().hex[:8]}"}
            return await run(settings.model_copy(update=update), progress=lambda m: print(m, file=sys.stderr))

    import uvloop  # as `agent-orchestrator bench` runs them: the services run on uvloop

    print(json.dumps(uvloop.run(main()), indent=2))
