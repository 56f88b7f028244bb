"""Messaging benchmark: the bus against Celery, on the same Redis, in the same run.

Set-up: a no-op handler; requester and responder in separate processes (uvloop),
with acknowledgements, idempotency (stored responses) and HMAC signing on.
Celery 5 is the peer: a ``-P solo`` worker, Redis as broker and result backend,
``delay().get()`` of a no-op task.

Figures: ``rpc_p50_ms``/``rpc_p99_ms`` (sequential calls), ``rpc_throughput_rps``
(64 in flight), ``celery_p50_ms``, ``celery_throughput_rps`` (64 in flight), and the
floor: ``bare_streams_rtt_p50_ms``, a bare Streams round trip between the same two
processes (XADD; XREADGROUP and PUBLISH of the id; the reply read from pub/sub) with
nothing of the bus on it, and ``rpc_p50_vs_bare_streams``.

Run alone: ``uv run python -m support.bench.messaging`` prints the figures as JSON
(embedded servers, placed as ``harness`` says, unless DATABASE_URL / REDIS_URL are set).
The process also runs as each role: ``--role responder|requester|celery-client``
(``celery_app`` is the worker's app).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from support.bench.harness import Progress, percentile, standalone

__all__ = ["run"]

AGENT = "bench"
IN_FLIGHT = 64
RPC_SEQUENTIAL = 3000
BARE_WARMUP = 300
RPC_THROUGHPUT_S = 4.0
CELERY_SEQUENTIAL = 400
CELERY_BATCH = 3000
_ROLE_TIMEOUT_S = 300.0


# -- the bus: responder and requester processes ---------------------------------------
async def _responder() -> None:
    from shared.lib.connections import connect_redis
    from shared.lib.event_bus import EventBus
    from shared.lib.settings import load_settings

    settings = load_settings()
    client = await connect_redis(settings.redis_url or "")
    bus = EventBus(client, settings)

    async def noop(request: Any) -> dict[str, Any]:
        return {}

    loop = asyncio.get_running_loop()
    import signal

    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(bus.stop_serving(grace_s=1)))
    echo = asyncio.create_task(_bare_echo(client, settings.redis_prefix))
    await bus.serve(AGENT, noop, concurrency=IN_FLIGHT, consumer="responder")
    echo.cancel()
    await bus.close()
    await client.aclose()


# -- the floor: a bare Streams round trip, no envelope, signing, idempotency or ack ----------
def _bare_keys(prefix: str) -> tuple[str, str]:
    return f"{prefix}:bare:requests", f"{prefix}:bare:replies"


async def _bare_echo(client: Any, prefix: str) -> None:
    """XREADGROUP a request, PUBLISH its id back: the least any Streams request/response does."""
    stream, replies = _bare_keys(prefix)
    await client.xgroup_create(stream, "bare", id="0", mkstream=True)
    while True:
        for _, entries in await client.xreadgroup("bare", "echo", {stream: ">"}, count=64, block=1000) or []:
            for _, fields in entries:
                await client.publish(replies, fields[b"i"])


async def _bare_round_trips(client: Any, prefix: str) -> list[float]:
    stream, replies = _bare_keys(prefix)
    pubsub = client.pubsub()
    await pubsub.subscribe(replies)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    samples = []
    for i in range(BARE_WARMUP + RPC_SEQUENTIAL):
        start = time.perf_counter()
        await client.xadd(stream, {"i": i})
        while (message := await pubsub.get_message(timeout=10)) is None or message["type"] != "message":
            pass
        samples.append((time.perf_counter() - start) * 1000)
    await pubsub.aclose()
    return samples[BARE_WARMUP:]


async def _requester() -> dict[str, float]:
    from shared.lib.agent_events import AgentRequestEvent
    from shared.lib.connections import connect_redis
    from shared.lib.errors import AgentOffline
    from shared.lib.event_bus import EventBus
    from shared.lib.settings import load_settings

    settings = load_settings()
    client = await connect_redis(settings.redis_url or "", max_connections=IN_FLIGHT + 8)
    bus = EventBus(client, settings)

    async def call() -> None:
        request = AgentRequestEvent.create(source_agent="requester", target_agent=AGENT, request_type="NOOP")
        response = await bus.request_agent(request, timeout_s=10)
        assert response.status == "success"

    deadline = time.monotonic() + 30
    while True:
        try:
            await call()
            break
        except AgentOffline:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    for _ in range(500):  # warm-up
        await call()
    samples = []
    for _ in range(RPC_SEQUENTIAL):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    bare = await _bare_round_trips(client, settings.redis_prefix)
    done = 0
    stop_at = time.perf_counter() + RPC_THROUGHPUT_S

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    elapsed = time.perf_counter() - start
    await bus.close()
    await client.aclose()
    return {
        "rpc_p50_ms": statistics.median(samples),
        "rpc_p99_ms": percentile(samples, 0.99),
        "rpc_throughput_rps": done / elapsed,
        "bare_streams_rtt_p50_ms": statistics.median(bare),
    }


# -- Celery ----------------------------------------------------------------------------
def _celery_url(redis_url: str) -> str:
    """kombu and Celery's backend spell a unix socket ``redis+socket://``."""
    return "redis+socket://" + redis_url.removeprefix("unix://") if redis_url.startswith("unix://") else redis_url


def _make_celery_app() -> Any:
    from celery import Celery

    url = os.environ["AO_BENCH_CELERY_URL"]
    app = Celery("ao_bench", broker=url, backend=url)
    app.conf.update(
        task_default_queue=os.environ["AO_BENCH_CELERY_QUEUE"],
        result_expires=300,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name="ao_bench.noop")  # type: ignore[untyped-decorator]
    def noop() -> None:
        return None

    return app


_celery_cache: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """``celery_app`` is built on first access (by the worker's ``-A``), never at import."""
    if name == "celery_app":
        if "app" not in _celery_cache:
            _celery_cache["app"] = _make_celery_app()
        return _celery_cache["app"]
    raise AttributeError(name)


def _celery_client() -> dict[str, float]:
    app = __getattr__("celery_app")
    noop = app.tasks["ao_bench.noop"]
    noop.delay().get(timeout=60)  # the worker is up
    for _ in range(50):
        noop.delay().get(timeout=10)
    samples = []
    for _ in range(CELERY_SEQUENTIAL):
        start = time.perf_counter()
        noop.delay().get(timeout=10)
        samples.append((time.perf_counter() - start) * 1000)
    window: deque[Any] = deque()
    start = time.perf_counter()
    for _ in range(CELERY_BATCH):
        if len(window) >= IN_FLIGHT:
            window.popleft().get(timeout=30)
        window.append(noop.delay())
    while window:
        window.popleft().get(timeout=30)
    elapsed = time.perf_counter() - start
    return {"celery_p50_ms": statistics.median(samples), "celery_throughput_rps": CELERY_BATCH / elapsed}


# -- orchestration -------------------------------------------------------------------------
def _env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AO_")}
    env.update(
        {
            "REDIS_URL": redis_url,
            "AO_REDIS_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
            "AO_SIGNING_KEY": secrets.token_urlsafe(32),
            "AO_REGISTRATION_SECRET": secrets.token_urlsafe(32),
            "AO_API_KEYS": secrets.token_urlsafe(16),
            "AO_DEV_MODE": "false",
            "AO_BENCH_CELERY_URL": _celery_url(redis_url),
            "AO_BENCH_CELERY_QUEUE": f"aobench{uuid.uuid4().hex[:8]}",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        }
    )
    return env


async def _spawn(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *args, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def _background(env: dict[str, str], *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await _spawn(env, *args)
    try:
        yield proc
    finally:
        await _stop(proc)


async def _role(env: dict[str, str], role: str) -> dict[str, float]:
    proc = await _spawn(env, sys.executable, "-m", "support.bench.messaging", "--role", role)
    out, err = await asyncio.wait_for(proc.communicate(), _ROLE_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"bench role {role} failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def _run_bus(env: dict[str, str], progress: Progress) -> dict[str, float]:
    if progress:
        progress("messaging: bus round trips (responder and requester processes)")
    async with _background(env, sys.executable, "-m", "support.bench.messaging", "--role", "responder"):
        return await _role(env, "requester")


async def _run_celery(env: dict[str, str], progress: Progress) -> dict[str, float]:
    if progress:
        progress("messaging: Celery -P solo, delay().get()")
    worker = [sys.executable, "-m", "celery", "-A", "support.bench.messaging:celery_app", "worker", "-P", "solo"]
    worker += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"]
    async with _background(env, *worker):
        return await _role(env, "celery-client")


async def run(settings: Any, *, progress: Progress = None) -> dict[str, float]:
    """Run both benchmarks on ``settings.redis_url``."""
    env = _env(settings.redis_url)
    results = await _run_bus(env, progress)
    results.update(await _run_celery(env, progress))
    results["p50_speedup_vs_celery"] = results["celery_p50_ms"] / results["rpc_p50_ms"]
    results["rpc_p50_vs_bare_streams"] = results["rpc_p50_ms"] / results["bare_streams_rtt_p50_ms"]
    results["throughput_ratio_vs_celery"] = results["rpc_throughput_rps"] / results["celery_throughput_rps"]
    return results


def _main() -> None:
    args = sys.argv[1:]
    role = args[args.index("--role") + 1] if "--role" in args else None
    if role in ("responder", "requester"):
        import uvloop

        result = uvloop.run(_responder() if role == "responder" else _requester())
        if result is not None:
            print(json.dumps(result))
        return
    if role == "celery-client":
        print(json.dumps(_celery_client()))
        return
    standalone(run)


if __name__ == "__main__":
    _main()
