"""The bus against real Redis and PostgreSQL: request/response, load sharing, idempotency,
deadlines, refusals, dead letters, priorities, the HTTP path and events."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from prometheus_client import REGISTRY

from shared.lib import metrics
from shared.lib import redis_keys as keys
from shared.lib.agent_events import AgentRequestEvent, Event, sign
from shared.lib.errors import (
    AgentOffline,
    Busy,
    Conflict,
    DeadlineExpired,
    InvalidInput,
    InvalidSignature,
    OrchestratorError,
    PayloadTooLarge,
    RequestRejected,
    ServiceUnavailable,
    Timeout,
)
from shared.lib.event_bus import DeadLetter, EventBus
from support.tests.integration.conftest import BusFactory, run_cli


def _serve(bus: EventBus, agent: str, handler: Any, *, concurrency: int = 8, consumer: str = "c1") -> asyncio.Task:
    return asyncio.create_task(bus.serve(agent, handler, concurrency=concurrency, consumer=consumer))


async def _wait_live(bus: EventBus, agent: str) -> None:
    key = keys.consumers_key(bus.settings.redis_prefix, agent)
    for _ in range(200):
        if await bus.redis.zcard(key):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{agent} never became live")


def _req(target: str = "echo", payload: dict[str, Any] | None = None, **kw: Any) -> AgentRequestEvent:
    return AgentRequestEvent.create(
        source_agent="tester", target_agent=target, request_type="ECHO", payload=payload or {}, **kw
    )


async def _echo(request: AgentRequestEvent) -> dict[str, Any]:
    if request.payload.get("bad"):
        raise InvalidInput("bad is not allowed", field="payload.bad")
    if request.payload.get("unknown"):
        raise RequestRejected("no such request type", field="request_type")
    return {"echo": request.payload, "trace": request.trace}


async def test_round_trip_carries_payload_and_trace(make_bus: BusFactory) -> None:
    """A request reaches the serving handler and its signed response comes back, trace intact."""
    server, client = await make_bus(), await make_bus()
    task = _serve(server, "echo", _echo)
    await _wait_live(client, "echo")
    response = await client.request_agent(_req(payload={"n": 1}, metadata={"trace": {"h": "v"}}), timeout_s=5)
    assert response.status == "success"
    assert response.payload == {"echo": {"n": 1}, "trace": {"h": "v"}}
    assert response.metadata["trace"] == {"h": "v"}
    assert response.served_by == server.instance_id
    await server.stop_serving(grace_s=1)
    await task


async def test_handler_errors_become_error_responses_and_serving_goes_on(make_bus: BusFactory) -> None:
    """InvalidInput -> error naming the field, RequestRejected -> rejected; the loop keeps serving;
    each is counted with its error code (AgentRequestErrorRateHigh leaves callers' mistakes out)."""
    server, client = await make_bus(), await make_bus()
    task = _serve(server, "echo", _echo)
    await _wait_live(client, "echo")
    bad = await client.request_agent(_req(payload={"bad": True}), timeout_s=5)
    assert bad.status == "error"
    assert bad.error is not None
    assert bad.error["code"] == "invalid_input"
    assert bad.error["field"] == "payload.bad"
    rejected = await client.request_agent(_req(payload={"unknown": True}), timeout_s=5)
    assert rejected.status == "rejected"
    with pytest.raises(RequestRejected):
        rejected.raise_for_status()
    ok = await client.request_agent(_req(payload={"n": 2}), timeout_s=5)
    assert ok.raise_for_status() == {"echo": {"n": 2}, "trace": {}}
    counted = {(s["status"], s["code"]) for s in _series("agent_requests_total", target_agent="echo")}
    assert {("error", "invalid_input"), ("rejected", "rejected"), ("success", "")} <= counted
    await server.stop_serving(grace_s=1)
    await task


async def test_two_instances_share_the_load(make_bus: BusFactory) -> None:
    """Two consumers of one agent both serve a burst of concurrent requests."""
    a, b, client = await make_bus(), await make_bus(), await make_bus()

    async def slow(request: AgentRequestEvent) -> dict[str, Any]:
        await asyncio.sleep(0.02)
        return {}

    tasks = [_serve(a, "echo", slow, concurrency=4, consumer="a"), _serve(b, "echo", slow, concurrency=4, consumer="b")]
    await _wait_live(client, "echo")
    responses = await asyncio.gather(*(client.request_agent(_req(), timeout_s=10) for _ in range(40)))
    served = Counter(r.served_by for r in responses)
    assert set(served) == {a.instance_id, b.instance_id}
    assert min(served.values()) >= 8
    for bus in (a, b):
        await bus.stop_serving(grace_s=1)
    await asyncio.gather(*tasks)


async def test_a_repeated_request_id_gets_the_first_response(make_bus: BusFactory) -> None:
    """A request id is one request: a repeat gets the stored response, whatever idempotency key it
    carries, over the stream and over HTTP (``execute``); the handler runs once."""
    server, client = await make_bus(), await make_bus()
    calls: list[str] = []

    async def counting(request: AgentRequestEvent) -> dict[str, Any]:
        calls.append(request.idempotency_key)
        return {"n": len(calls)}

    task = _serve(server, "echo", counting)
    await _wait_live(client, "echo")
    first = _req(idempotency_key="first-key")
    answer = await client.request_agent(first, timeout_s=5)
    assert (await client.request_agent(first, timeout_s=5)).payload == answer.payload == {"n": 1}
    again = first.model_copy(update={"idempotency_key": "another-key"})
    assert (await client.request_agent(again, timeout_s=5)).payload == {"n": 1}
    third = again.model_copy(update={"idempotency_key": "a-third-key", "signature": None})
    over_http = await server.execute(third.signed(server.settings.signing_key.encode()), counting)
    assert over_http.payload == {"n": 1}
    assert calls == ["first-key"]
    fresh = _req(idempotency_key="first-key")  # a new request id under a used key: the key's response
    assert (await client.request_agent(fresh, timeout_s=5)).payload == {"n": 1}
    assert calls == ["first-key"]
    await server.stop_serving(grace_s=1)
    await task


async def test_an_idempotency_key_reused_by_a_different_request_is_a_conflict(make_bus: BusFactory) -> None:
    """A key whose stored response answers another request (another source agent, request type
    or payload) is a Conflict naming idempotency_key, over the stream and over HTTP (execute), also
    when found in flight; it returned that request's answer. The same request again (a retry,
    with a new request id) still gets the stored response, and nothing runs twice."""
    server, client = await make_bus(), await make_bus()
    release, calls = asyncio.Event(), []

    async def recording(request: AgentRequestEvent) -> dict[str, Any]:
        calls.append(request.request_id)
        if request.payload.get("hold"):
            await release.wait()
        return {"secret": request.payload}

    task = _serve(server, "echo", recording)
    await _wait_live(client, "echo")
    first = _req(payload={"path": "/first"}, idempotency_key="shared-key")
    assert (await client.request_agent(first, timeout_s=5)).payload == {"secret": {"path": "/first"}}
    others = [
        _req(payload={"path": "/other"}, idempotency_key="shared-key"),
        AgentRequestEvent.create(
            source_agent="intruder", target_agent="echo", request_type="ECHO", payload={"path": "/first"},
            idempotency_key="shared-key",
        ),
        AgentRequestEvent.create(
            source_agent="tester", target_agent="echo", request_type="OTHER", payload={"path": "/first"},
            idempotency_key="shared-key",
        ),
    ]  # fmt: skip
    key = server.settings.signing_key.encode()
    for other in others:
        with pytest.raises(Conflict) as over_stream:
            await client.request_agent(other, timeout_s=5)
        with pytest.raises(Conflict) as over_http:
            await server.execute(other.signed(key), recording)
        for err in (over_stream, over_http):
            assert (err.value.field, err.value.status_code) == ("idempotency_key", 409)
    retry = _req(payload={"path": "/first"}, idempotency_key="shared-key", metadata={"trace": {"t": "2"}})
    assert (await client.request_agent(retry, timeout_s=5)).payload == {"secret": {"path": "/first"}}
    assert (await server.execute(retry.signed(key), recording)).payload == {"secret": {"path": "/first"}}
    assert calls == [first.request_id]
    held = asyncio.create_task(client.request_agent(_req(payload={"hold": 1}, idempotency_key="k2"), timeout_s=5))
    while len(calls) < 2:
        await asyncio.sleep(0.01)
    in_flight = asyncio.create_task(client.request_agent(_req(payload={"hold": 2}, idempotency_key="k2"), timeout_s=5))
    await asyncio.sleep(0.1)
    release.set()
    assert (await held).payload == {"secret": {"hold": 1}}
    with pytest.raises(Conflict):
        await in_flight
    assert len(calls) == 2
    await server.stop_serving(grace_s=1)
    await task


async def _settled(bus: EventBus, agent: str) -> tuple[int, int, int]:
    """An agent's stream entries, pending entries and dead letters."""
    prefix, redis = bus.settings.redis_prefix, bus.redis
    streams = [keys.request_stream(prefix, agent, band) for band in keys.BANDS]
    entries = sum([await redis.xlen(s) for s in streams])
    pending = sum([(await redis.xpending(s, agent))["pending"] for s in streams])
    return entries, pending, await redis.xlen(keys.dead_letter_stream(prefix, agent))


async def test_a_cancel_notice_cancels_the_running_handler_and_stores_cancelled(make_bus: BusFactory) -> None:
    """A cancel notice cancels the handler's task on the instance running it; the request is
    answered ``cancelled``, acknowledged (not redelivered, not dead-lettered), and a repeat of
    its idempotency key gets that stored answer without running again."""
    server, client = await make_bus(), await make_bus()
    started, stopped, runs = asyncio.Event(), asyncio.Event(), []

    async def sleeper(request: AgentRequestEvent) -> dict[str, Any]:
        runs.append(request.request_id)
        started.set()
        try:
            await asyncio.sleep(30)
        finally:
            stopped.set()
        return {}

    task = _serve(server, "sleeper", sleeper)
    await _wait_live(client, "sleeper")
    request = _req("sleeper", timeout_s=20)
    call = asyncio.create_task(client.request_agent(request, timeout_s=20))
    await asyncio.wait_for(started.wait(), 5)
    call.cancel()  # the caller stops waiting, as a cancelled workflow's node does
    with contextlib.suppress(asyncio.CancelledError):
        await call
    began = time.monotonic()
    response = await client.cancel_request(request, wait_s=5)
    assert response is not None
    assert (response.status, (response.error or {}).get("code")) == ("error", "cancelled")
    assert stopped.is_set()
    assert time.monotonic() - began < 1
    assert await _settled(server, "sleeper") == (0, 0, 0)
    await asyncio.sleep(1.5)  # past the visibility timeout: nothing left to reclaim
    again = await client.request_agent(_req("sleeper", idempotency_key=request.idempotency_key), timeout_s=5)
    assert (again.error or {}).get("code") == "cancelled"
    assert runs == [request.request_id]
    assert await _settled(server, "sleeper") == (0, 0, 0)
    await server.stop_serving(grace_s=1)
    await task


async def test_a_request_cancelled_while_queued_is_answered_cancelled_without_running(make_bus: BusFactory) -> None:
    """A cancel notice for a request still queued is remembered by the instances serving its
    agent: read later, it is answered ``cancelled`` without running; a cancel of a request that
    has finished returns its stored answer and changes nothing."""
    server, client = await make_bus(), await make_bus()
    release, runs = asyncio.Event(), []

    async def one_at_a_time(request: AgentRequestEvent) -> dict[str, Any]:
        runs.append(request.payload["n"])
        await release.wait()
        return {"n": request.payload["n"]}

    task = _serve(server, "single", one_at_a_time, concurrency=1)
    await _wait_live(client, "single")
    first, queued = _req("single", {"n": 1}), _req("single", {"n": 2})
    calls = [asyncio.create_task(client.request_agent(r, timeout_s=10)) for r in (first, queued)]
    while not runs:
        await asyncio.sleep(0.01)
    calls[1].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await calls[1]
    assert await client.cancel_request(queued, wait_s=0.3) is None  # nobody runs it yet
    release.set()
    assert (await calls[0]).payload == {"n": 1}
    again = await client.request_agent(_req("single", {"n": 2}, idempotency_key=queued.idempotency_key), timeout_s=5)
    assert (again.error or {}).get("code") == "cancelled"
    finished = await client.cancel_request(first, wait_s=1)
    assert finished is not None
    assert finished.payload == {"n": 1}
    assert runs == [1]
    assert await _settled(server, "single") == (0, 0, 0)
    await server.stop_serving(grace_s=1)
    await task


async def test_a_duplicate_given_up_in_flight_is_sent_again_once_its_marker_ran_out(make_bus: BusFactory) -> None:
    """A request whose duplicate was taken by an instance that died (its in-flight marker is
    left, nothing is stored) waits for the marker to run out, then is sent and answered: not
    held to its own deadline for a response that will never come."""
    server, client = await make_bus(), await make_bus()
    task = _serve(server, "echo", _echo)
    await _wait_live(client, "echo")
    request = _req(payload={"n": 1})
    marker = keys.response_key(client.settings.redis_prefix, "echo", request.idempotency_key)
    await client.redis.set(marker, b"P", px=500)  # as ADMIT leaves it for a duplicate in flight
    started = time.monotonic()
    response = await client.request_agent(request, timeout_s=10)
    assert response.payload["echo"] == {"n": 1}
    assert 0.4 < time.monotonic() - started < 3
    await server.stop_serving(grace_s=1)
    await task


async def test_execute_runs_a_request_whose_duplicate_was_given_up_in_flight(make_bus: BusFactory) -> None:
    """The HTTP path (execute) as the stream path: a duplicate's in-flight marker left by an
    instance that died is waited out, then this request runs, once, well before its deadline."""
    bus = await make_bus()
    calls: list[str] = []

    async def handler(request: AgentRequestEvent) -> dict[str, Any]:
        calls.append(request.request_id)
        return {"ok": True}

    request = _req(timeout_s=10).signed(bus.settings.signing_key.encode())
    marker = keys.response_key(bus.settings.redis_prefix, "echo", request.idempotency_key)
    await bus.redis.set(marker, b"P", px=500)  # as ADMIT leaves it for a duplicate in flight
    started = time.monotonic()
    response = await bus.execute(request, handler)
    assert response.status == "success"
    assert calls == [request.request_id]
    assert 0.4 < time.monotonic() - started < 3
    assert (await bus.execute(request, handler)).status == "success"  # stored: not run again
    assert calls == [request.request_id]


async def test_reply_lost_while_the_reply_connection_is_down_is_read_from_the_store(make_bus: BusFactory) -> None:
    """A reply published while the requester's reply connection was killed still arrives, at once, from the store."""
    server, client = await make_bus(), await make_bus(visibility_timeout_s=30.0)
    release = asyncio.Event()

    async def held(request: AgentRequestEvent) -> dict[str, Any]:
        await release.wait()
        return {"n": request.payload["n"]}

    task = _serve(server, "held", held)
    await _wait_live(client, "held")
    call = asyncio.create_task(client.request_agent(_req("held", {"n": 7}), timeout_s=10))
    await asyncio.sleep(0.2)  # the request is running in the handler
    name = f"ao-replies-{client.instance_id}"
    victim = next(c["id"] for c in await client.redis.client_list() if c["name"] == name)
    started = time.monotonic()
    await client.redis.client_kill_filter(_id=victim)
    release.set()  # published within ~1 ms, before the 50 ms resubscribe backoff ends: pub/sub drops it
    response = await call
    assert response.payload == {"n": 7}
    assert time.monotonic() - started < 2.0  # the sweep after resubscribing, not the 10 s timeout
    await server.stop_serving(grace_s=1)
    await task


async def test_an_idle_reply_connection_is_pinged_and_keeps_answering(
    make_bus: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quiet spells on the reply connection send PINGs; their answers do not disturb the replies that follow."""
    from shared.lib import event_bus

    monkeypatch.setattr(event_bus, "_REPLY_IDLE_PING_S", 0.05)
    server, client = await make_bus(), await make_bus()
    task = _serve(server, "echo", _echo)
    await _wait_live(client, "echo")
    assert (await client.request_agent(_req(payload={"n": 1}), timeout_s=5)).payload["echo"] == {"n": 1}
    name = f"ao-replies-{client.instance_id}"
    reply_conn = next(c for c in await client.redis.client_list() if c["name"] == name)
    await asyncio.sleep(0.4)  # several idle PINGs
    after = next(c for c in await client.redis.client_list() if c["name"] == name)
    assert after["id"] == reply_conn["id"]  # the same connection, never dropped
    assert after["cmd"] == "ping"
    assert (await client.request_agent(_req(payload={"n": 2}), timeout_s=5)).payload["echo"] == {"n": 2}
    await server.stop_serving(grace_s=1)
    await task


async def test_a_reply_connection_idle_past_the_health_check_interval_is_not_dropped(
    make_bus: BusFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Idle spells longer than the pool's health-check interval keep the reply connection: no loss, no resubscribe."""
    from shared.lib import event_bus

    monkeypatch.setattr(event_bus, "_REPLY_IDLE_PING_S", 0.2)  # 30 s in production, like the interval
    server, client = await make_bus(), await make_bus()
    client.redis.connection_pool.connection_kwargs["health_check_interval"] = 0.1  # 30 s from connect_redis
    task = _serve(server, "echo", _echo)
    await _wait_live(client, "echo")
    assert (await client.request_agent(_req(payload={"n": 1}), timeout_s=5)).payload["echo"] == {"n": 1}
    name = f"ao-replies-{client.instance_id}"
    before = next(c["id"] for c in await client.redis.client_list() if c["name"] == name)
    await asyncio.sleep(1.2)  # several intervals, each ending with an idle PING
    after = next(c["id"] for c in await client.redis.client_list() if c["name"] == name)
    assert after == before
    assert not [r for r in caplog.records if r.name == "shared.lib.event_bus" and r.levelno >= logging.WARNING]
    assert (await client.request_agent(_req(payload={"n": 2}), timeout_s=5)).payload["echo"] == {"n": 2}
    await server.stop_serving(grace_s=1)
    await task


class _SilencingProxy:
    """A TCP proxy to Redis (over TCP or its unix socket, as the embedded server listens) whose
    reply links can be silenced: their bytes are dropped both ways while both sockets stay open,
    as when a NAT or firewall forgets a connection. A reply link is one whose client named
    itself ``ao-replies-...`` (CLIENT SETNAME), which the proxy sees go by."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        if parts.scheme == "unix":
            self._open = functools.partial(asyncio.open_unix_connection, parts.path)
            self._db = parse_qs(parts.query).get("db", ["0"])[0]
        else:
            self._open = functools.partial(asyncio.open_connection, parts.hostname or "127.0.0.1", parts.port or 6379)
            self._db = parts.path.lstrip("/") or "0"
        self._links = itertools.count()
        self._reply_links: set[int] = set()
        self._silenced: set[int] = set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        """Listen on a free port; return a Redis URL through it."""
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/{self._db}"

    def silence_replies(self) -> None:
        """Drop the bytes of the reply links open now (not of those opened later)."""
        self._silenced |= self._reply_links

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._open()
        link = next(self._links)
        for task in (self._pump(reader, up_writer, link, outbound=True), self._pump(up_reader, writer, link)):
            self._pumps.add(asyncio.create_task(task))

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: int, *, outbound: bool = False
    ) -> None:
        try:
            while data := await reader.read(65536):
                if outbound and b"ao-replies-" in data:
                    self._reply_links.add(link)
                if link not in self._silenced:
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


async def test_a_reply_connection_whose_link_goes_silent_is_replaced(
    make_bus: BusFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, redis_url: str
) -> None:
    """A reply connection whose idle PING gets no answer (a link dropped silently) is given up and resubscribed."""
    from shared.lib import event_bus

    monkeypatch.setattr(event_bus, "_REPLY_IDLE_PING_S", 0.1)
    proxy = _SilencingProxy(redis_url)
    try:
        server, client = await make_bus(), await make_bus(redis_url=await proxy.start())
        task = _serve(server, "echo", _echo)
        await _wait_live(client, "echo")
        assert (await client.request_agent(_req(payload={"n": 1}), timeout_s=5)).payload["echo"] == {"n": 1}
        name = f"ao-replies-{client.instance_id}"
        before = next(c for c in await server.redis.client_list() if c["name"] == name)
        proxy.silence_replies()
        for _ in range(100):
            await asyncio.sleep(0.02)
            ids = {c["id"] for c in await server.redis.client_list() if c["name"] == name} - {before["id"]}
            if ids:
                break
        assert ids, "the silent reply connection was never replaced"
        assert any("no answer to PING" in r.getMessage() for r in caplog.records)
        assert (await client.request_agent(_req(payload={"n": 2}), timeout_s=5)).payload["echo"] == {"n": 2}
        await server.stop_serving(grace_s=1)
        await task
    finally:
        await proxy.close()


async def test_offline_agent_fails_at_once(make_bus: BusFactory) -> None:
    """A request to an agent with no live consumer raises AgentOffline without waiting."""
    client = await make_bus()
    start = time.monotonic()
    with pytest.raises(AgentOffline) as err:
        await client.request_agent(_req("nobody"), timeout_s=10)
    assert time.monotonic() - start < 1.0
    assert err.value.field == "target_agent"


async def test_deadline_expiry_times_out_and_expired_work_is_not_run(make_bus: BusFactory) -> None:
    """The caller gets Timeout; a request found expired in the queue is acked and never executed."""
    server, client = await make_bus(), await make_bus()
    calls: list[str] = []

    async def slow(request: AgentRequestEvent) -> dict[str, Any]:
        calls.append(request.request_id)
        await asyncio.sleep(0.5)
        return {}

    task = _serve(server, "echo", slow, concurrency=1)
    await _wait_live(client, "echo")
    first = asyncio.create_task(client.request_agent(_req(), timeout_s=5))
    await asyncio.sleep(0.05)
    with pytest.raises(Timeout):
        await client.request_agent(_req(), timeout_s=0.1)  # queued behind `first`, expires there
    await first
    await asyncio.sleep(0.2)
    assert len(calls) == 1
    assert server.stats()["expired"] == 1
    assert client.stats()["waiting_replies"] == 0
    await server.stop_serving(grace_s=1)
    await task


async def test_send_side_refusals_name_the_field(make_bus: BusFactory) -> None:
    """An oversized payload and an invalid agent id are refused before anything is sent."""
    client = await make_bus(max_payload_bytes=1000)
    with pytest.raises(PayloadTooLarge) as big:
        await client.request_agent(_req(payload={"blob": "x" * 2000}), timeout_s=1)
    assert big.value.field == "payload"
    with pytest.raises(InvalidInput) as bad_id:
        _req(target="Not An Agent!")
    assert bad_id.value.field == "target_agent"


async def test_bad_signature_is_dead_lettered_and_answered(make_bus: BusFactory) -> None:
    """An envelope signed with the wrong key is refused: dead-lettered with its reason, and the
    caller told at once (it waited out its whole timeout), though it cannot verify the answer."""
    server = await make_bus()
    forger = await make_bus(signing_key="a-completely-different-key-0123456")
    task = _serve(server, "echo", _echo)
    await _wait_live(forger, "echo")
    started = time.monotonic()
    refused = await forger.request_agent(_req(), timeout_s=30)
    assert time.monotonic() - started < 10  # told, not timed out
    assert (refused.status, (refused.error or {}).get("code")) == ("error", "bad_signature"), refused
    with pytest.raises(OrchestratorError, match="signature"):
        refused.raise_for_status()
    letters = await server.dead_letters("echo")
    assert [d.reason for d in letters] == ["bad_signature"]
    assert server.stats()["dead_lettered"] == 1
    await server.stop_serving(grace_s=1)
    await task


async def _queue_raw(bus: EventBus, agent: str, **fields: Any) -> None:
    """XADD a request signed with the right key, its ``fields`` set as given (no model between)."""
    data = {**_req(agent).to_dict(), **fields}
    data["signature"] = sign(data, bus.settings.signing_key.encode())
    stream = keys.request_stream(bus.settings.redis_prefix, agent, keys.band_of("normal"))
    await bus.redis.xadd(stream, {"e": orjson.dumps(data)})


async def _dead_letters_of(bus: EventBus, agent: str, count: int) -> list[DeadLetter]:
    for _ in range(250):
        letters = await bus.dead_letters(agent)
        if len(letters) >= count:
            return letters
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {count} dead letters for {agent}")


async def _dead_reasons(bus: EventBus, agent: str, count: int) -> list[str]:
    return [d.reason for d in await _dead_letters_of(bus, agent, count)]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"deadline": 1e308}, "invalid_input"),  # the model refuses it: more than a day after created_at
        ({"deadline": 1e17}, "invalid_input"),
        ({"created_at": time.time() - 3600}, "bad_signature"),  # a replay, outside the window
        ({"target_agent": "another-agent"}, "invalid_input"),  # in the wrong stream: it was `internal`
    ],
)
async def test_a_signed_envelope_refused_off_the_stream_is_dead_lettered_with_its_reason(
    make_bus: BusFactory, fields: dict[str, Any], reason: str
) -> None:
    """A validly signed request with a far deadline, a stale created_at or another agent as its target is
    dead-lettered with its reason, not run; serving goes on."""
    server, client = await make_bus(), await make_bus()
    calls: list[str] = []

    async def recording(request: AgentRequestEvent) -> dict[str, Any]:
        calls.append(request.request_id)
        return {}

    task = _serve(server, "echo", recording)
    await _wait_live(client, "echo")
    await _queue_raw(client, "echo", **fields)
    assert await _dead_reasons(server, "echo", 1) == [reason]
    assert (await client.request_agent(_req(), timeout_s=5)).status == "success"
    assert len(calls) == 1  # only the valid one ran
    await server.stop_serving(grace_s=1)
    await task


def _unreadable(kind: str) -> bytes:
    """An entry no key verifies, that once ended a loop of the server (TypeError off the checks)."""
    data = _req().to_dict()
    if kind == "nested 300 deep":  # orjson writes 254 levels at most: the canonical form raised
        data["payload"] = {"deep": orjson.loads(b"[" * 300 + b"]" * 300)}
        data["signature"] = "00" * 32
    else:  # hmac.compare_digest raises for a non-ASCII str
        data["signature"] = "\u00e9" * 64
    return json.dumps(data).encode()  # the stdlib writes what orjson will not


@pytest.mark.parametrize(
    ("kind", "reason"), [("nested 300 deep", "invalid_input"), ("non-ASCII signature", "bad_signature")]
)
async def test_an_entry_whose_signature_cannot_be_checked_is_dead_lettered_at_once(
    make_bus: BusFactory, kind: str, reason: str
) -> None:
    """An entry whose signature cannot even be checked is refused on its first delivery, with its
    reason (it raised TypeError: redelivered until max_deliveries, then it ended the maintenance
    loop and the instance went offline)."""
    server, client = await make_bus(), await make_bus()
    task = _serve(server, "echo", _echo)
    await _wait_live(client, "echo")
    stream = keys.request_stream(client.settings.redis_prefix, "echo", keys.band_of("normal"))
    await client.redis.xadd(stream, {"e": _unreadable(kind)})
    letters = await _dead_letters_of(server, "echo", 1)
    assert [(d.reason, d.deliveries) for d in letters] == [(reason, 1)]
    assert await _settled(server, "echo") == (0, 0, 1)
    assert (await client.request_agent(_req(payload={"n": 1}), timeout_s=5)).status == "success"
    await server.stop_serving(grace_s=1)
    await task


@pytest.mark.parametrize("holder", ["dead-instance", "c1"])
async def test_an_unreadable_entry_past_max_deliveries_ends_neither_serving_nor_a_start(
    make_bus: BusFactory, holder: str
) -> None:
    """An unreadable entry delivered too often, held by a dead instance (taken over by maintenance)
    or by the server's own name (taken back at start), is dead-lettered as max_deliveries and
    serving goes on: it ended the maintenance loop (the instance went offline) or the start."""
    server, client = await make_bus(), await make_bus()
    stream = keys.request_stream(client.settings.redis_prefix, "echo", keys.band_of("normal"))
    await client.redis.xgroup_create(stream, "echo", id="0", mkstream=True)
    entry_id = await client.redis.xadd(stream, {"e": _unreadable("nested 300 deep")})
    await client.redis.xreadgroup("echo", holder, {stream: ">"})
    await client.redis.xclaim(stream, "echo", holder, 0, [entry_id], retrycount=10)
    task = _serve(server, "echo", _echo, consumer="c1")
    await _wait_live(client, "echo")
    letters = await _dead_letters_of(server, "echo", 1)
    assert [d.reason for d in letters] == ["max_deliveries"]
    await asyncio.sleep(1.5)  # past the consumer's lifetime (1 s): it beats on
    assert not task.done()
    assert (await client.request_agent(_req(payload={"n": 1}), timeout_s=5)).status == "success"
    await server.stop_serving(grace_s=1)
    await task


async def test_a_malformed_reply_does_not_end_the_reply_loop(make_bus: BusFactory) -> None:
    """Whatever is published on a requester's reply channel is dropped, not raised: a request id
    that is a list ended its reply loop (TypeError), and later replies were only read from the
    store once each call timed out."""
    server, client = await make_bus(), await make_bus()
    task = _serve(server, "echo", _echo)
    await _wait_live(client, "echo")
    assert (await client.request_agent(_req(payload={"n": 1}), timeout_s=5)).status == "success"
    channel = keys.reply_channel(client.settings.redis_prefix, client.instance_id)
    for junk in (b'{"request_id": ["x"]}', b"[1]", b"not json", _unreadable("nested 300 deep")):
        await client.redis.publish(channel, junk)
    started = time.monotonic()
    assert (await client.request_agent(_req(payload={"n": 2}), timeout_s=5)).status == "success"
    assert time.monotonic() - started < 2
    await server.stop_serving(grace_s=1)
    await task


async def test_a_loop_that_ends_stops_the_server_and_serve_raises(
    make_bus: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a loop of the server end all the same (a bug), serve() raises naming it and the
    instance leaves the live consumers, so requests fail agent_offline at once rather than wait
    on an instance that serves nothing while it beats."""
    from shared.lib import _bus_serve

    async def broken(self: Any) -> None:
        await asyncio.sleep(0.1)
        raise RuntimeError("a bug in the maintenance")

    monkeypatch.setattr(_bus_serve.Server, "_maintain_loop", broken)
    server, client = await make_bus(), await make_bus()
    task = _serve(server, "echo", _echo)
    await _wait_live(client, "echo")
    with pytest.raises(ServiceUnavailable, match="a bug in the maintenance"):
        await asyncio.wait_for(task, 5)
    assert await client.redis.zcard(keys.consumers_key(client.settings.redis_prefix, "echo")) == 0
    with pytest.raises(AgentOffline):
        await client.request_agent(_req(), timeout_s=5)


async def test_execute_refuses_a_replayed_envelope_as_a_bad_signature(make_bus: BusFactory) -> None:
    """Over HTTP's path a signed envelope made outside the replay window is InvalidSignature (401) naming created_at."""
    bus = await make_bus()
    data = _req().to_dict()
    data["created_at"] -= bus.settings.replay_window_s + 60
    stale = AgentRequestEvent.model_validate(data).signed(bus.settings.signing_key.encode())
    with pytest.raises(InvalidSignature) as err:
        await bus.execute(stale, _echo)
    assert (err.value.code, err.value.status_code, err.value.field) == ("bad_signature", 401, "created_at")
    assert await bus.dead_letters("echo") == []  # answered: nothing stored


def _refused(reason: str) -> float:
    return REGISTRY.get_sample_value("agent_requests_refused_total", {"reason": reason}) or 0.0


async def test_refusals_over_http_are_counted_and_store_nothing(make_bus: BusFactory) -> None:
    """A request refused by execute()'s checks (a forged signature, an oversized payload) is answered
    and counted, and nothing of it is written to Redis: each body went to the dead-letter stream,
    so anyone could grow Redis by a megabyte a request without credentials."""
    bus = await make_bus(max_payload_bytes=1024 * 1024)
    forged = _req(payload={"x": "a" * 1_000_000}).model_copy(update={"signature": "00" * 32})
    too_big = _req(payload={"x": "a" * 1_100_000}).signed(bus.settings.signing_key.encode())
    before = {reason: _refused(reason) for reason in ("bad_signature", "payload_too_large")}
    for _ in range(10):
        with pytest.raises(InvalidSignature):
            await bus.execute(forged, _echo)
    with pytest.raises(PayloadTooLarge):
        await bus.execute(too_big, _echo)
    assert _refused("bad_signature") - before["bad_signature"] == 10
    assert _refused("payload_too_large") - before["payload_too_large"] == 1
    assert [key async for key in bus.redis.scan_iter(match=f"{bus.settings.redis_prefix}:*")] == []


def _series(name: str, **match: str) -> list[dict[str, str]]:
    """The label sets of ``name``'s samples whose labels include ``match``."""
    return [
        sample.labels
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == name and match.items() <= sample.labels.items()
    ]


async def test_random_request_types_and_sources_add_a_bounded_number_of_series(
    make_bus: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random request types are counted as `unsupported`, random source agents past the bound as `other`."""
    monkeypatch.setattr(metrics, "AGENT_NAME_LABELS", metrics.LabelBound())  # the process's own bound stays
    server, client = await make_bus(), await make_bus()
    metrics.declare_request_types("bounded", ["ECHO"])

    async def declared_only(request: AgentRequestEvent) -> dict[str, Any]:
        if request.request_type != "ECHO":
            raise RequestRejected(f"no {request.request_type}", field="request_type")
        return {}

    task = _serve(server, "bounded", declared_only)
    await _wait_live(client, "bounded")
    for i in range(metrics.MAX_LABEL_VALUES + 24):
        request = AgentRequestEvent.create(
            source_agent=f"src-{os.urandom(4).hex()}", target_agent="bounded", request_type=f"RANDOM_{i}"
        )
        assert (await client.request_agent(request, timeout_s=5)).status == "rejected"
    series = _series("agent_requests_total", target_agent="bounded")
    assert {s["request_type"] for s in series} == {metrics.UNSUPPORTED_LABEL}
    sources = {s["source_agent"] for s in series}
    assert len(sources - {metrics.OVERFLOW_LABEL}) <= metrics.MAX_LABEL_VALUES
    assert metrics.OVERFLOW_LABEL in sources
    await server.stop_serving(grace_s=1)
    await task


async def test_poison_message_is_dead_lettered_after_max_deliveries(make_bus: BusFactory) -> None:
    """A handler that keeps crashing: redelivered max_deliveries times, then dead-lettered and requeueable."""
    server = await make_bus(visibility_timeout_s=0.2, max_deliveries=3)
    client = await make_bus()
    attempts: list[int] = []

    async def crashing(request: AgentRequestEvent) -> dict[str, Any]:
        attempts.append(1)
        if len(attempts) <= 3:
            raise RuntimeError("handler bug")
        return {"finally": True}

    task = _serve(server, "echo", crashing)
    await _wait_live(client, "echo")
    response = await client.request_agent(_req(), timeout_s=10)
    assert response.status == "error"
    assert response.error is not None
    assert response.error["code"] == "dead_lettered"
    assert len(attempts) == 3
    letters = await client.dead_letters()
    assert [(d.agent, d.reason, d.deliveries) for d in letters] == [("echo", "max_deliveries", 3)]
    requeued = await client.requeue_dead_letter(letters[0].id)
    stored = keys.response_key(client.settings.redis_prefix, "echo", requeued.idempotency_key)
    for _ in range(100):
        if (await client.redis.get(stored) or b"P") != b"P":
            break
        await asyncio.sleep(0.02)
    assert len(attempts) == 4
    assert await client.dead_letters("echo") == []
    await server.stop_serving(grace_s=1)
    await task


async def test_urgent_requests_are_served_before_normal_ones(make_bus: BusFactory) -> None:
    """With a backlog queued, the urgent band is drained first."""
    client = await make_bus()
    server = await make_bus()
    order: list[str] = []

    async def record(request: AgentRequestEvent) -> dict[str, Any]:
        order.append(request.priority)
        return {}

    # queue first (a live consumer must exist for admission), then start serving
    blocker = _serve(server, "echo", record, concurrency=1, consumer="warm")
    await _wait_live(client, "echo")
    await server.stop_serving(grace_s=1)
    await blocker
    await client.redis.zadd(keys.consumers_key(client.settings.redis_prefix, "echo"), {"fake": 2**62})
    calls = [asyncio.create_task(client.request_agent(_req(priority="low"), timeout_s=10)) for _ in range(5)]
    await asyncio.sleep(0.1)
    calls += [asyncio.create_task(client.request_agent(_req(priority="urgent"), timeout_s=10)) for _ in range(5)]
    await asyncio.sleep(0.1)
    order.clear()
    task = _serve(server, "echo", record, concurrency=1, consumer="drain")
    await asyncio.gather(*calls)
    assert order[:5] == ["urgent"] * 5
    await server.stop_serving(grace_s=1)
    await task


async def test_execute_runs_http_requests_through_the_same_checks(make_bus: BusFactory) -> None:
    """execute(): verified, idempotent, stored; bad signatures and expired deadlines are refused."""
    bus = await make_bus()
    calls: list[str] = []

    async def handler(request: AgentRequestEvent) -> dict[str, Any]:
        calls.append(request.request_id)
        return {"ok": True}

    key = bus.settings.signing_key.encode()
    request = _req().signed(key)
    first = await bus.execute(request, handler)
    again = await bus.execute(request, handler)
    assert first.status == again.status == "success"
    assert calls == [request.request_id]
    with pytest.raises(InvalidSignature):
        await bus.execute(_req().signed(b"wrong-key"), handler)
    with pytest.raises(InvalidSignature):
        await bus.execute(_req(), handler)  # unsigned
    expired = _req(timeout_s=-1).signed(key)
    with pytest.raises(DeadlineExpired):
        await bus.execute(expired, handler)
    assert await bus.dead_letters("echo") == []  # refusals over HTTP are answered, not stored
    assert bus.in_flight == 0


async def test_http_and_the_stream_share_one_concurrency_limit_and_a_full_instance_is_busy(
    make_bus: BusFactory,
) -> None:
    """execute() runs in the slots the stream path uses: with them all taken by stream entries it
    raises Busy at once (it ran a handler per call, without limit), leaving the key free, so
    the same request sent again runs; with them taken over HTTP, queued entries wait their turn."""
    server, client = await make_bus(), await make_bus()
    release, running, most = asyncio.Event(), [0], [0]

    async def held(request: AgentRequestEvent) -> dict[str, Any]:
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            await release.wait()
        finally:
            running[0] -= 1
        return {"n": request.payload.get("n")}

    task = _serve(server, "echo", held, concurrency=2)
    await _wait_live(client, "echo")
    key = server.settings.signing_key.encode()
    calls = [asyncio.create_task(client.request_agent(_req(payload={"n": n}), timeout_s=10)) for n in range(2)]
    while running[0] < 2:
        await asyncio.sleep(0.01)
    over_http = _req(payload={"n": "http"}).signed(key)
    started = time.monotonic()
    with pytest.raises(Busy) as busy:
        await server.execute(over_http, held)
    assert time.monotonic() - started < 0.5
    assert (busy.value.code, busy.value.status_code, busy.value.retryable) == ("busy", 503, True)
    release.set()
    await asyncio.gather(*calls)
    release.clear()
    assert (await asyncio.wait_for(server.execute(over_http, _echo), 2)).status == "success"  # not held to 31 s
    http = [asyncio.create_task(server.execute(_req(payload={"n": n}).signed(key), held)) for n in range(2)]
    while running[0] < 2:
        await asyncio.sleep(0.01)
    queued = [asyncio.create_task(client.request_agent(_req(payload={"n": n}), timeout_s=10)) for n in range(3)]
    await asyncio.sleep(0.3)
    assert running[0] == 2
    release.set()
    assert all(r.status == "success" for r in await asyncio.gather(*http, *queued))
    assert most[0] == 2
    await server.stop_serving(grace_s=1)
    await task


async def test_events_are_persisted_delivered_live_and_replayed(make_bus: BusFactory) -> None:
    """emit() stores the event, live subscribers get it, events_since() reads it back by cursor."""
    bus = await make_bus()
    got: asyncio.Queue[Event] = asyncio.Queue()
    sub = await bus.subscribe("workflow.*", got.put_nowait)
    first = await bus.emit("workflow.started", {"n": 1}, aggregate_type="workflow", aggregate_id="w1")
    second = await bus.emit("workflow.finished", {"n": 2}, aggregate_type="workflow", aggregate_id="w1")
    await bus.emit("other.thing", {"n": 3})
    live = [await asyncio.wait_for(got.get(), 5), await asyncio.wait_for(got.get(), 5)]
    assert [e.id for e in live] == [first.id, second.id]
    assert second.id > first.id
    assert [e.event_type for e in await bus.events_since(first.id, aggregate_id="w1")] == ["workflow.finished"]
    assert len(await bus.events_since(0, event_type="other.thing")) == 1
    await bus.republish(first)
    replayed = await asyncio.wait_for(got.get(), 5)
    assert replayed == first
    await sub.close()
    with contextlib.suppress(asyncio.QueueEmpty):
        got.get_nowait()


async def _two_dead_letters(
    make_bus: BusFactory, agent: str
) -> tuple[EventBus, EventBus, list[str], asyncio.Task[Any]]:
    """An agent served by a handler whose first attempt crashes, with two dead letters: a request
    delivered too often (``max_deliveries``) and an unsigned one queued on its stream
    (``bad_signature``). Returns the server, a client, the handler's attempts and the serving task."""
    server = await make_bus(visibility_timeout_s=0.2, max_deliveries=1)
    client = await make_bus()
    attempts: list[str] = []

    async def crashes_once(request: AgentRequestEvent) -> dict[str, Any]:
        attempts.append(request.request_id)
        if len(attempts) == 1:
            raise RuntimeError("first attempt crashes")
        return {}

    task = _serve(server, agent, crashes_once)
    await _wait_live(client, agent)
    response = await client.request_agent(_req(agent), timeout_s=10)
    assert response.error is not None
    assert response.error["code"] == "dead_lettered"
    stream = keys.request_stream(client.settings.redis_prefix, agent, keys.band_of("normal"))
    await client.redis.xadd(stream, {"e": _req(agent).to_json()})  # unsigned: refused and dead-lettered
    await _dead_letters_of(server, agent, 2)
    return server, client, attempts, task


async def test_cli_lists_and_requeues_dead_letters(make_bus: BusFactory, service_env: dict[str, str]) -> None:
    """`dlq list --json` shows a dead letter with its reason; `dlq requeue` runs it again, with
    the signing key as its only secret; a refused envelope cannot be requeued (one-line error, exit 2),
    and the ids after it in the same command are still requeued."""
    server, _, attempts, task = await _two_dead_letters(make_bus, "echo")
    code, out = await run_cli(service_env, "dlq", "list", "--agent", "echo", "--json")
    assert code == 0, out
    listed = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(d["reason"] for d in listed) == ["bad_signature", "max_deliveries"]
    by_reason = {d["reason"]: d["id"] for d in listed}
    signing_only = {k: v for k, v in service_env.items() if k not in ("AO_REGISTRATION_SECRET", "AO_API_KEYS")}
    code, out = await run_cli(signing_only, "dlq", "requeue", by_reason["bad_signature"], by_reason["max_deliveries"])
    assert code == 2, out
    assert "refused" in out
    assert f"requeued {by_reason['max_deliveries']} as request " in out, out
    for _ in range(100):
        if len(attempts) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(attempts) == 2
    await server.stop_serving(grace_s=1)
    await task


async def test_cli_lists_each_dead_letter_id_whole_at_80_columns(
    make_bus: BusFactory, service_env: dict[str, str]
) -> None:
    """`dlq list` in an 80-column terminal prints each id whole on a line of its own (a table cut
    them to `documenta…`), nothing wider than the terminal, and `dlq requeue` takes an id as printed."""
    server, client, _, task = await _two_dead_letters(make_bus, "documentation")
    code, out = await run_cli({**service_env, "COLUMNS": "80"}, "dlq", "list")
    assert code == 0, out
    lines = out.splitlines()
    by_reason = {d.reason: d.id for d in await client.dead_letters()}
    assert sorted(by_reason) == ["bad_signature", "max_deliveries"]
    assert all(i in lines for i in by_reason.values()), out
    assert max(len(line) for line in lines) <= 80, out
    printed = lines[lines.index(by_reason["max_deliveries"])]
    code, out = await run_cli(service_env, "dlq", "requeue", printed)
    assert (code, out.strip().splitlines()[-1].startswith(f"requeued {printed} as request ")) == (0, True), out
    await server.stop_serving(grace_s=1)
    await task


async def test_cli_replays_events(make_bus: BusFactory, service_env: dict[str, str]) -> None:
    """`events replay --type T --aggregate A:ID` publishes the matching stored events again."""
    bus = await make_bus()
    first = await bus.emit("deploy.done", {"n": 1}, aggregate_type="env", aggregate_id="prod")
    await bus.emit("deploy.done", {"n": 2}, aggregate_type="env", aggregate_id="staging")
    second = await bus.emit("deploy.done", {"n": 3}, aggregate_type="env", aggregate_id="prod")
    got: asyncio.Queue[Event] = asyncio.Queue()
    await bus.subscribe("deploy.*", got.put_nowait)
    code, out = await run_cli(service_env, "events", "replay", "--type", "deploy.done", "--aggregate", "env:prod")
    assert code == 0, out
    assert "replayed 2 events" in out
    assert [(await asyncio.wait_for(got.get(), 5)).id for _ in range(2)] == [first.id, second.id]
    code, out = await run_cli(service_env, "events", "replay", "--since", "yesterday")
    assert code == 2
    assert "--since" in out


async def test_an_event_is_published_after_the_pooled_connections_were_killed(make_bus: BusFactory) -> None:
    """Events are published by a direct command on a pooled connection: connections the server
    closed meanwhile are replaced, and the event still reaches its subscribers."""
    bus = await make_bus()
    seen: asyncio.Queue[Event] = asyncio.Queue()
    sub = await bus.subscribe("workflow.*", seen.put_nowait)
    try:
        await bus.emit("workflow.node", {"n": 1}, aggregate_type="workflow", aggregate_id="wf")
        assert (await asyncio.wait_for(seen.get(), 5)).payload == {"n": 1}
        me = await bus.redis.client_id()
        for c in await bus.redis.client_list(_type="normal"):
            if int(c["id"]) != me:
                await bus.redis.client_kill_filter(_id=c["id"])
        await bus.redis.client_kill_filter(_id=me)  # the pool's connections are all dead now
        await bus.emit("workflow.node", {"n": 2}, aggregate_type="workflow", aggregate_id="wf")
        assert (await asyncio.wait_for(seen.get(), 5)).payload == {"n": 2}
    finally:
        await sub.close()


async def test_own_first_hands_this_buses_events_over_before_publishing_them(make_bus: BusFactory) -> None:
    """A listener subscribed ``own_first`` gets the events its own bus stores as soon as they are
    stored (before emit returns), and once more from Redis; another bus's events only from Redis;
    once closed, nothing more."""
    bus, other = await make_bus(), await make_bus()
    got: list[tuple[str, int]] = []
    done = asyncio.Event()

    def listen(event: Event) -> None:
        got.append((event.event_type, event.id))
        done.set()

    sub = await bus.subscribe("workflow.*", listen, own_first=True)
    try:
        mine = await bus.emit("workflow.node", {"n": 1}, aggregate_type="workflow", aggregate_id="wf")
        assert (("workflow.node", mine.id)) in got  # handed over before emit returned
        theirs = await other.emit("workflow.node", {"n": 2}, aggregate_type="workflow", aggregate_id="wf")
        await bus.emit("agent.other", {"n": 3})  # another pattern: not handed over
        async with asyncio.timeout(5):
            while Counter(i for _, i in got) != Counter({mine.id: 2, theirs.id: 1}):
                done.clear()
                await done.wait()
    finally:
        await sub.close()
    got.clear()
    await bus.emit("workflow.node", {"n": 4}, aggregate_type="workflow", aggregate_id="wf")
    assert got == []  # closed: no longer handed over


async def test_events_emitted_at_once_are_all_published_each_once(make_bus: BusFactory) -> None:
    """Publishes of one loop iteration share a write: every event still reaches a subscriber
    once, and each workflow's events in the order they were stored."""
    bus, listener = await make_bus(), await make_bus()
    got: list[Event] = []
    sub = await listener.subscribe("workflow.*", got.append)
    try:

        async def three(wf: str) -> list[int]:
            out = []
            for n in range(3):
                event = await bus.emit("workflow.node", {"n": n}, aggregate_type="workflow", aggregate_id=wf)
                out.append(event.id)
            return out

        emitted = await asyncio.gather(*(three(f"wf-{i}") for i in range(20)))
        async with asyncio.timeout(5):
            while len(got) < 60:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert sorted(e.id for e in got) == sorted(i for ids in emitted for i in ids)  # each once
        for i, ids in enumerate(emitted):
            assert [e.id for e in got if e.aggregate_id == f"wf-{i}"] == ids  # in order per workflow
    finally:
        await sub.close()
