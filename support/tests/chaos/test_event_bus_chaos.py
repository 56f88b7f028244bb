"""The bus under failure: an instance killed with SIGKILL while holding requests, and
Redis restarted while load is running (also without its data).

Run as a module (``python -m support.tests.chaos.test_event_bus_chaos CONSUMER``), this
file is also the serving process the kill test starts: it serves agent ``chaos`` with a
handler that records a side effect per execution before it sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.lib import redis_keys as keys
from shared.lib.agent_events import AgentRequestEvent
from shared.lib.connections import connect_redis
from shared.lib.embedded import EmbeddedRedis
from shared.lib.errors import AgentOffline, ServiceUnavailable, Timeout
from shared.lib.event_bus import EventBus
from shared.lib.settings import Settings, load_settings

AGENT = "chaos"
HANDLER_SLEEP_S = 0.5


def _effects_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:{{{AGENT}}}:effects:{request_id}"


async def _worker(consumer: str) -> None:
    """Serve AGENT until SIGTERM; each execution appends this consumer to the request's effects."""
    settings = load_settings()
    client = await connect_redis(settings.redis_url or "")
    bus = EventBus(client, settings, instance_id=consumer)

    async def handler(request: AgentRequestEvent) -> dict[str, Any]:
        await client.rpush(_effects_key(settings.redis_prefix, request.request_id), consumer)  # type: ignore[misc]
        await asyncio.sleep(HANDLER_SLEEP_S)
        return {"by": consumer}

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(bus.stop_serving(grace_s=2)))
    await bus.serve(AGENT, handler, concurrency=8, consumer=consumer)
    await bus.close()
    await client.aclose()


@pytest.fixture
def workers(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start serving processes (this module as __main__); all are killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(consumer: str, **settings: float) -> subprocess.Popen[bytes]:
        env = {
            **service_env,
            "AO_VISIBILITY_TIMEOUT_S": "1",
            **{f"AO_{k.upper()}": str(v) for k, v in settings.items()},
        }
        log = (tmp_path / f"{consumer}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "support.tests.chaos.test_event_bus_chaos", consumer],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _wait_consumers(url: str, prefix: str, count: int, *, timeout_s: float = 30) -> None:
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if client.zcard(keys.consumers_key(prefix, AGENT)) >= count:
                return
            time.sleep(0.05)
    finally:
        client.close()
    raise AssertionError(f"{count} consumers of {AGENT} never became live")


#: Long enough for a takeover, shorter than the visibility timeout of the takeover case.
REQUEST_TIMEOUT_S = 20


def _request() -> AgentRequestEvent:
    return AgentRequestEvent.create(
        source_agent="tester", target_agent=AGENT, request_type="WORK", timeout_s=REQUEST_TIMEOUT_S
    )


def _send(bus: EventBus, n: int) -> tuple[list[AgentRequestEvent], list[asyncio.Task[Any]]]:
    """``n`` requests to AGENT, each awaited in a task of its own."""
    requests = [_request() for _ in range(n)]
    return requests, [asyncio.create_task(bus.request_agent(r, timeout_s=REQUEST_TIMEOUT_S)) for r in requests]


async def _ran(client: Any, prefix: str, requests: list[AgentRequestEvent]) -> dict[str, list[str]]:
    """Which consumers ran each request, in order (the side effects the handler records)."""
    return {
        r.request_id: [e.decode() for e in await client.lrange(_effects_key(prefix, r.request_id), 0, -1)]
        for r in requests
    }


async def _in_flight(client: Any, prefix: str, request: AgentRequestEvent) -> bool:
    return bool(await client.get(keys.response_key(prefix, AGENT, request.idempotency_key)) == b"P")


async def _answered_and_busy(
    client: Any, prefix: str, consumer: str, requests: list[AgentRequestEvent], calls: list[asyncio.Task[Any]]
) -> None:
    """Wait until ``consumer`` has answered a request and is running another (not on a fixed
    sleep, which a busy machine outruns). Running means its side effect is recorded and its
    response is not stored yet (the in-flight marker): a call not yet done on this side may
    only be a reply still on its way."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answered = any(c.done() and c.result().served_by == consumer for c in calls)
        if answered:
            for request, call in zip(requests, calls, strict=True):
                ran = await client.lrange(_effects_key(prefix, request.request_id), 0, -1)
                if not call.done() and consumer.encode() in ran and await _in_flight(client, prefix, request):
                    return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{consumer} never answered one request while running another")


@pytest.mark.slow
@pytest.mark.parametrize(
    "bus_settings",
    [
        pytest.param({"visibility_timeout_s": 1.0}, id="reclaimed-past-the-visibility-timeout"),
        # The visibility timeout outlasts the calls' deadline: only the takeover of a consumer
        # that stopped being live answers the killed instance's requests in time.
        pytest.param(
            {"visibility_timeout_s": 60.0, "consumer_dead_after_s": 1.5}, id="taken-over-from-a-dead-consumer"
        ),
    ],
)
async def test_kill9_with_requests_in_flight_loses_nothing(
    workers: Callable[..., subprocess.Popen[bytes]],
    settings_factory: Callable[..., Settings],
    redis_url: str,
    bus_settings: dict[str, float],
) -> None:
    """SIGKILL of an instance mid-work: the survivor answers every request, and no request whose
    result was stored ran again (only the killed instance's unfinished work ran twice)."""
    settings = settings_factory(**bus_settings)
    victim = workers("worker-a", **bus_settings)
    workers("worker-b", **bus_settings)
    _wait_consumers(redis_url, settings.redis_prefix, 2)
    client = await connect_redis(redis_url)
    bus = EventBus(client, settings)
    try:
        requests, calls = _send(bus, 48)
        await _answered_and_busy(client, settings.redis_prefix, "worker-a", requests, calls)
        os.kill(victim.pid, signal.SIGKILL)
        responses = await asyncio.gather(*calls)
        effects = await _ran(client, settings.redis_prefix, requests)
    finally:
        await bus.close()
        await client.aclose()
    assert all(r.status == "success" for r in responses)
    served = Counter(r.served_by for r in responses)
    assert served["worker-b"] > 0
    assert served["worker-a"] > 0
    twice = 0
    for response in responses:
        ran = effects[response.request_id]
        assert ran[-1] == response.served_by  # the stored result came from the last execution
        assert len(ran) <= 2
        if len(ran) == 2:
            assert ran == ["worker-a", "worker-b"]  # only work the dead instance had not finished
            twice += 1
    assert twice >= 1  # the kill really caught requests in flight


@pytest.mark.slow
async def test_an_instance_restarted_under_its_name_runs_again_what_it_held(
    workers: Callable[..., subprocess.Popen[bytes]], settings_factory: Callable[..., Settings], redis_url: str
) -> None:
    """SIGKILL of the only instance mid-work, restarted at once under the same instance id (as a
    supervisor restarts it): the new process runs again the requests its name still held before
    their deadline. No other instance would take them (the old name still looks live) and the
    visibility timeout outlasts the deadline: only the restart's own take-back answers them."""
    bus_settings = {"visibility_timeout_s": 60.0, "consumer_dead_after_s": 60.0}
    settings = settings_factory(**bus_settings)
    victim = workers("worker-a", **bus_settings)
    _wait_consumers(redis_url, settings.redis_prefix, 1)
    client = await connect_redis(redis_url)
    bus = EventBus(client, settings)
    try:
        requests, calls = _send(bus, 4)
        deadline = time.monotonic() + 20
        while not all((await _ran(client, settings.redis_prefix, requests)).values()):
            assert time.monotonic() < deadline, "the requests never started running"
            await asyncio.sleep(0.005)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        workers("worker-a", **bus_settings)
        responses = await asyncio.gather(*calls)
        ran = list((await _ran(client, settings.redis_prefix, requests)).values())
    finally:
        await bus.close()
        await client.aclose()
    assert all(r.status == "success" for r in responses)
    assert all(r.served_by == "worker-a" for r in responses)
    assert sum(len(r) == 2 for r in ran) >= 1  # the kill caught work in flight, run again after the restart
    assert all(r in (["worker-a"], ["worker-a", "worker-a"]) for r in ran)


@contextlib.asynccontextmanager
async def _served(url: str, settings: Settings, handler: Any, *, concurrency: int) -> AsyncIterator[EventBus]:
    """A bus serving ``AGENT`` with ``handler`` on ``url``; yields a requester's bus on its own
    connection. Both are stopped and closed on the way out."""
    server_client, client = await connect_redis(url), await connect_redis(url)
    server, bus = EventBus(server_client, settings), EventBus(client, settings)
    serving = asyncio.create_task(server.serve(AGENT, handler, concurrency=concurrency, consumer="s1"))
    try:
        yield bus
    finally:
        await server.stop_serving(grace_s=1)
        await serving
        await bus.close()
        await server.close()
        await client.aclose()
        await server_client.aclose()


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own (short unix-socket path), so it can be stopped and started."""
    with tempfile.TemporaryDirectory(prefix="aoredis", dir="/tmp") as tmp:
        server = EmbeddedRedis(Path(tmp))
        yield server
        server.stop()


@pytest.mark.slow
async def test_redis_restart_under_load(
    private_redis: EmbeddedRedis, settings_factory: Callable[..., Settings]
) -> None:
    """Redis stopped and restarted mid-load: every request is answered or fails with a clear
    error (ServiceUnavailable / Timeout), none hangs, and service resumes afterwards."""
    url = await asyncio.to_thread(private_redis.start)
    settings = settings_factory(redis_url=url, visibility_timeout_s=1.0)

    async def handler(request: AgentRequestEvent) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"ok": True}

    outcomes: Counter[str] = Counter()
    restarted = asyncio.Event()

    async def call() -> None:
        try:
            response = await bus.request_agent(_request(), timeout_s=8)
            outcomes[response.status] += 1
        except (ServiceUnavailable, Timeout, AgentOffline) as e:
            outcomes[type(e).__name__] += 1

    async def load() -> None:
        """Rounds of 8 concurrent calls until 0.5 s after Redis is back."""
        while not restarted.is_set():
            await asyncio.gather(*(call() for _ in range(8)))
        await asyncio.sleep(0)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            await asyncio.gather(*(call() for _ in range(8)))

    async with _served(url, settings, handler, concurrency=16) as bus:
        await asyncio.sleep(0.2)
        running = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        in_flight_at_stop = sum(outcomes.values())
        await asyncio.to_thread(private_redis.stop)
        await asyncio.sleep(1.0)
        assert await asyncio.to_thread(private_redis.start) == url
        restarted.set()
        await asyncio.wait_for(running, 60)
        before = outcomes["success"]
        await asyncio.wait_for(asyncio.gather(*(call() for _ in range(16))), 30)
    assert in_flight_at_stop > 0  # load was running when Redis went down
    # AgentOffline: the outage outlasted the consumer's liveness (1 s here) until its next beat
    assert set(outcomes) <= {"success", "ServiceUnavailable", "Timeout", "AgentOffline"}
    assert sum(outcomes.values()) % 8 == 0  # every call of every round came back
    assert outcomes["success"] - before == 16  # fully recovered


async def _wipe_and_start(server: EmbeddedRedis) -> str:
    """Start ``server`` again on the same address with none of its data (its append-only file gone)."""
    for path in server.dir.glob("appendonly*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return await asyncio.to_thread(server.start)


@pytest.mark.slow
async def test_redis_back_empty_loses_no_request_and_runs_none_twice(
    private_redis: EmbeddedRedis, settings_factory: Callable[..., Settings]
) -> None:
    """Redis killed and started again without its data while one request runs and two wait
    queued: the queued ones, lost with the data, are sent again and answered; the running one
    is marked in flight again by its instance, so it is answered once and not run a second time."""
    url = await asyncio.to_thread(private_redis.start)
    settings = settings_factory(redis_url=url, visibility_timeout_s=1.0)
    ran: list[str] = []

    async def handler(request: AgentRequestEvent) -> dict[str, Any]:
        ran.append(request.request_id)
        await asyncio.sleep(2.0)
        return {"ok": True}

    async with _served(url, settings, handler, concurrency=1) as bus:
        await asyncio.to_thread(_wait_consumers, url, settings.redis_prefix, 1)
        requests, calls = _send(bus, 3)
        while not ran:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(private_redis.kill)
        assert await _wipe_and_start(private_redis) == url
        responses = await asyncio.wait_for(asyncio.gather(*calls), REQUEST_TIMEOUT_S)
    assert [r.status for r in responses] == ["success"] * 3
    assert sorted(ran) == sorted(r.request_id for r in requests)  # each ran once


if __name__ == "__main__":
    asyncio.run(_worker(sys.argv[1]))
