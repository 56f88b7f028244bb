"""The bus: request/response to named agents over Redis Streams, and broadcast events.

Request path (one Redis round trip each way):

1. ``request_agent`` signs the envelope and runs one Lua script that returns a
   stored response for a repeated idempotency key, refuses an agent with no
   live consumer (``AgentOffline``) or a full queue, and otherwise sets an
   in-flight marker and XADDs the request to the agent's stream for its
   priority band.
2. An instance serving the agent (``serve``) reads it with XREADGROUP (group =
   agent name, consumer = instance), verifies and runs the handler, then in one
   MULTI stores the response under the idempotency key (TTL), PUBLISHes it on
   the requester instance's reply channel and XACKs (+XDELs) the entry.
3. One reader task per requester instance resolves the waiting future.

Pub/sub can drop a reply (no listener, a reconnect); the stored response is the
durable copy, read back after a reconnect and before giving up on a timeout. A
request whose key holds nothing after a reconnect, not even its in-flight marker,
was lost with Redis's data (a restart without persistence) and is sent again.
A request held by a dead instance is reclaimed with XAUTOCLAIM after
``Settings.visibility_timeout_s``; running handlers renew their claim; a
request delivered more than ``Settings.max_deliveries`` times goes to the
agent's dead-letter stream with its reason, as does any envelope refused off
the stream (one refused over HTTP is answered, not stored).
``cancel_request`` publishes a cancel notice on the agent's cancel channel, heard
by its instances on their reply connections: the one running the request cancels
its handler and stores the answer ``cancelled``.

Trust: envelopes are signed (HMAC-SHA256, see ``agent_events``) and verified on
receipt. Replays are stopped by ``request_id``/idempotency key at admission
(a repeat gets the stored response, never a second run; a different request
under a used key gets ``Conflict``: each response names the request it
answers, ``_bus_core.request_digest``) and by the ``created_at`` replay window
on receipt.

Events: ``emit`` INSERTs into the append-only ``events`` table, then PUBLISHes;
``events_since`` reads the table (ids increase: usable as SSE ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import itertools
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from shared.lib import _bus_events, metrics
from shared.lib import _bus_scripts as scripts
from shared.lib import redis_keys as keys
from shared.lib._bus_batch import Batcher
from shared.lib._bus_core import REQUEST_DIGEST, Handler, _Core, request_digest
from shared.lib._bus_events import CHANGE_APPLIED, EventCallback, Statement, Subscription
from shared.lib._bus_serve import Server, markers_renewed_within_s
from shared.lib.agent_events import (
    AgentRequestEvent,
    AgentResponseEvent,
    Event,
    check_payload_size,
    parse_envelope,
    request_from_dict,
    response_from_dict,
)
from shared.lib.connections import Along, run_commands
from shared.lib.errors import (
    AgentOffline,
    Busy,
    Conflict,
    DeadlineExpired,
    InvalidInput,
    InvalidSignature,
    NotFound,
    OrchestratorError,
    ServiceUnavailable,
    Timeout,
)
from shared.lib.settings import AGENT_ID_PATTERN, Settings

__all__ = ["CHANGE_APPLIED", "DeadLetter", "EventBus", "EventCallback", "Handler", "Subscription"]

_log = logging.getLogger(__name__)

_AGENT_RE = re.compile(AGENT_ID_PATTERN)
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
#: Dead-letter reasons that are safe to requeue (the envelope itself was valid).
_REQUEUEABLE = {"max_deliveries"}
#: How often a caller whose duplicate is in flight elsewhere looks for the stored response.
_POLL_S = 0.02
_TRANSIENT = (RedisError, OSError)
#: An idle reply connection is PINGed after this long, so a dead one is noticed and replaced.
_REPLY_IDLE_PING_S = 30.0
#: When a request refused as ``busy`` over HTTP is best sent again (its ``Retry-After``).
_BUSY_RETRY_AFTER_S = 1
#: How long a cancel that got no answer in time spends reading the stored response.
_CANCEL_LAST_LOOK_S = 1.0
_Admission = tuple[list[str], list[bytes | str | int]]


@dataclass
class _Waiter:
    future: asyncio.Future[AgentResponseEvent]
    target: str
    idempotency_key: str
    queued: bool = False
    """Admitted and queued by this process, so its key holds at least the in-flight marker."""


class _RequestLost(Exception):
    """A queued request's key holds nothing: Redis lost it with its data; it is sent again."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered request. ``id`` is ``"<agent>/<stream entry id>"`` (for requeue)."""

    id: str
    agent: str
    reason: str
    message: str
    deliveries: int
    dead_at: float
    request: dict[str, Any] | None


def _default_instance_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:60]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _check_agent(name: str, *, field: str) -> None:
    if not isinstance(name, str) or not _AGENT_RE.match(name):
        raise InvalidInput(f"{field} {name!r} must match {AGENT_ID_PATTERN}", field=field)


def _count_timeout(agent: str) -> None:
    metrics.AGENT_REQUEST_TIMEOUTS.labels(metrics.AGENT_NAME_LABELS(agent)).inc()


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class EventBus:
    """Agent request/response and broadcast events over Redis (and PostgreSQL for events).

    ``EventBus(redis, settings, *, pool=None, instance_id=None)``: ``redis`` is a
    redis-py asyncio client (not closed by the bus), ``pool`` an asyncpg pool
    needed by ``emit``/``events_since``, ``instance_id`` names this process's
    reply channel (default: host-pid-random). Call ``await bus.close()`` at the end.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: Settings,
        *,
        pool: asyncpg.Pool | None = None,
        instance_id: str | None = None,
    ) -> None:
        instance_id = instance_id or _default_instance_id()
        if not _INSTANCE_RE.match(instance_id):
            raise InvalidInput(f"instance_id {instance_id!r} must match {_INSTANCE_RE.pattern}", field="instance_id")
        self.settings = settings
        self.pool = pool
        self.instance_id = instance_id
        self._core = _Core.build(redis, settings, instance_id)
        self._waiters: dict[str, _Waiter] = {}
        self._admissions: Batcher[_Admission, Any] = Batcher(self._flush_admissions)
        self._publishes: Batcher[Sequence[Event], Any] = Batcher(self._flush_publishes, ordered=True)
        self._reply_task: asyncio.Task[None] | None = None
        self._replies_ready = asyncio.Event()
        self._reply_conn: Any = None  # the reply connection while it is up (cancel channels are added on it)
        self._cancel_channels: dict[bytes, str] = {}  # cancel channel -> agent, of the agents served here
        self._subscribed: set[bytes] = set()  # the channels subscribed on the current reply connection
        self._cancel_script = redis.register_script(scripts.CANCEL)
        self._servers: list[Server] = []
        self._subscriptions: set[Subscription] = set()
        self._own: list[tuple[str, EventCallback]] = []  # in-process listeners of this bus's events
        self._sweeps: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def redis(self) -> aioredis.Redis:
        return self._core.redis

    # -- lifecycle and introspection ---------------------------------------------------
    async def close(self) -> None:
        """Stop serving (no grace), stop the reply reader, fail waiting calls, end subscriptions."""
        self._closed = True
        await self.stop_serving(grace_s=0)
        tasks = [t for t in (self._reply_task, *self._sweeps) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(ServiceUnavailable("the event bus was closed while waiting"))
        for sub in list(self._subscriptions):
            await sub.close()

    @property
    def in_flight(self) -> int:
        """Requests this process's handlers are running now (stream and HTTP); busy if > 0."""
        return self._core.in_flight

    def stats(self) -> dict[str, Any]:
        """A snapshot: in flight, waiting calls, counters, and per served agent its queue
        depth and pending entries (as of the last maintenance tick)."""
        counters = self._core.counters
        return {
            "instance_id": self.instance_id,
            "in_flight": self.in_flight,
            "waiting_replies": len(self._waiters),
            "redelivered": counters.get("redelivered", 0),
            "dead_lettered": counters.get("dead_lettered", 0),
            "expired": counters.get("expired", 0),
            "agents": {
                s.agent: {
                    "consumer": s.consumer,
                    "concurrency": s.concurrency,
                    "active": s.active,
                    "queue_depth": s.queue_depth,
                    "pending": s.pending,
                    "redelivered": s.redelivered,
                }
                for s in self._servers
            },
        }

    # -- requesting --------------------------------------------------------------------
    async def request_agent(self, request: AgentRequestEvent, *, timeout_s: float) -> AgentResponseEvent:
        """Send ``request`` to ``request.target_agent`` and wait for its response.

        The deadline is the earlier of the request's and now + ``timeout_s``.
        Returns the response (status success, error or rejected); raises
        ``Timeout`` if none arrives in time (or the agent reports the deadline
        passed), ``AgentOffline`` at once if the agent has no live consumer,
        ``PayloadTooLarge``/``InvalidInput`` for a bad envelope and
        ``ServiceUnavailable`` when Redis cannot be reached or the queue is full.
        A repeated ``idempotency_key`` gets the stored response, not a second run;
        ``Conflict`` naming it if that response answers a different request
        (another source agent, request type or payload).
        """
        if self._closed:
            raise ServiceUnavailable("the event bus is closed")
        check_payload_size(request.payload, max_bytes=self.settings.max_payload_bytes)
        now = time.time()
        deadline = min(request.deadline, now + timeout_s)
        if deadline <= now:
            raise DeadlineExpired("the request's deadline has already passed; set a later one", field="deadline")
        await self._ensure_replies()
        data = request.to_dict()
        data.update(created_at=now, deadline=deadline, reply_to=self.instance_id)
        raw = self._core.signed_json(data, request.target_agent)
        rid = request.request_id
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), request.target_agent, request.idempotency_key)
        mine = rid not in self._waiters
        if mine:
            self._waiters[rid] = waiter
        try:
            return await self._send(request, raw, waiter, deadline)
        finally:
            if mine:
                del self._waiters[rid]

    async def _send(
        self, request: AgentRequestEvent, raw: bytes, waiter: _Waiter, deadline: float
    ) -> AgentResponseEvent:
        stream = keys.request_stream(self._core.prefix, request.target_agent, keys.band_of(request.priority))
        code, value = await self._admit(request, raw, stream=stream, deadline=deadline, queue=True)
        if code == scripts.ADMIT_AS:  # its request id was sent before under another key: it is that request
            request, raw = self._as_first(request, raw, value)
            waiter.idempotency_key = request.idempotency_key
            return await self._send(request, raw, waiter, deadline)
        if code == scripts.ADMIT_STORED:
            return self._stored_answer(value, request)
        if code == scripts.ADMIT_OFFLINE:
            raise AgentOffline(
                f"agent {request.target_agent!r} has no live instance; start one or check the registry",
                field="target_agent",
                resource=request.target_agent,
            )
        if code == scripts.ADMIT_FULL:
            raise ServiceUnavailable(
                f"the queue of agent {request.target_agent!r} is full ({self.settings.stream_maxlen}); retry later",
                resource=request.target_agent,
            )
        if code == scripts.ADMIT_IN_FLIGHT:
            stored = await self._await_stored(request, deadline)
            if stored is None:  # the duplicate was given up (its sender died): send this one
                return await self._send(request, raw, waiter, deadline)
            return stored
        return await self._await_queued(request, raw, waiter, deadline)

    def _as_first(self, request: AgentRequestEvent, raw: bytes, first: Any) -> tuple[AgentRequestEvent, bytes]:
        """``request`` under the idempotency key its request id was first admitted with (ADMIT_AS),
        and its envelope signed again with it."""
        key = keys.as_text(first)
        if raw:  # the stream path's envelope; the HTTP path sends none
            raw = self._core.signed_json({**orjson.loads(raw), "idempotency_key": key}, request.target_agent)
        return request.model_copy(update={"idempotency_key": key}), raw

    async def _await_queued(
        self, request: AgentRequestEvent, raw: bytes, waiter: _Waiter, deadline: float
    ) -> AgentResponseEvent:
        """The reply to a request just queued; the request is sent again if Redis lost it."""
        waiter.queued = True
        try:
            return await self._await_reply(request, waiter, deadline)
        except _RequestLost:
            _log.warning("request %s to %s was lost by Redis; sending it again", request.request_id, waiter.target)
            waiter.queued, waiter.future = False, asyncio.get_running_loop().create_future()
            return await self._send(request, raw, waiter, deadline)

    async def _admit(
        self, request: AgentRequestEvent, raw: bytes, *, stream: str, deadline: float, queue: bool
    ) -> tuple[int, Any]:
        agent = request.target_agent
        marker_ms = int(max(deadline - time.time(), 0) * 1000) + keys.IN_FLIGHT_MARKER_MARGIN_MS
        mode = ("1", "x") if queue else ("0", "n")  # check liveness and queue, or only mark
        ttl_ms = self.settings.response_ttl_s * 1000
        args: list[bytes | str | int] = [
            raw,
            marker_ms,
            self.settings.stream_maxlen,
            *mode,
            ttl_ms,
            request.idempotency_key,
        ]
        script_keys = [
            keys.response_key(self._core.prefix, agent, request.idempotency_key),
            stream,
            keys.consumers_key(self._core.prefix, agent),
            keys.request_id_key(self._core.prefix, agent, request.request_id),
        ]
        try:
            result = await self._admissions.submit((script_keys, args))
            if isinstance(result, Exception):
                raise result
        except _TRANSIENT as e:
            raise ServiceUnavailable(f"cannot reach Redis to send the request: {e}; retry it") from e
        code, value = result
        return int(code), value

    async def _flush_admissions(self, items: list[_Admission]) -> list[Any]:
        """All admissions of one loop iteration in one pipeline; a result per item (or its error)."""
        sha = self._core.admit.sha
        if len(items) == 1:  # the sequential case: a plain command is cheaper than a pipeline
            script_keys, args = items[0]
            try:
                return [await self._core.run_script(self._core.admit, script_keys, args)]
            except _TRANSIENT as e:
                return [e]
        pipe = self._core.redis.pipeline(transaction=False)
        for script_keys, args in items:
            pipe.evalsha(sha, len(script_keys), *script_keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if isinstance(result, NoScriptError):  # the server restarted or flushed its scripts
                script_keys, args = items[i]
                try:
                    results[i] = await self._core.admit(keys=script_keys, args=args)
                except _TRANSIENT as e:
                    results[i] = e
        return results

    async def _await_reply(self, request: AgentRequestEvent, waiter: _Waiter, deadline: float) -> AgentResponseEvent:
        # A timer on the future itself: asyncio.wait_for adds a future and a task step per call.
        timer = asyncio.get_running_loop().call_later(max(deadline - time.time(), 0.0), _time_out, waiter.future)
        try:
            response = await waiter.future
        except TimeoutError:
            stored = await self._fetch_stored(request.target_agent, request.idempotency_key)
            if stored is None:
                _count_timeout(request.target_agent)
                raise Timeout(
                    f"agent {request.target_agent!r} did not answer {request.request_type} in time; "
                    "retry with the same request_id to get its response if it finishes",
                    resource=request.target_agent,
                ) from None
            response = stored
        finally:
            timer.cancel()
        if response.status == "timeout":
            _count_timeout(request.target_agent)
            raise Timeout(f"agent {request.target_agent!r} got {request.request_type} after its deadline")
        return response

    async def _await_stored(self, request: AgentRequestEvent, deadline: float) -> AgentResponseEvent | None:
        """A duplicate is in flight (sent elsewhere): wait for its stored response. None when its
        in-flight marker ran out with nothing stored: it passed its deadline unanswered (the
        instance holding it died, say), and the key is free to send this request."""
        while time.time() < deadline:
            value = await self._stored_raw(request.target_agent, request.idempotency_key)
            if value is None:
                return None
            if value != scripts.IN_FLIGHT:
                return self._stored_answer(value, request)
            await asyncio.sleep(_POLL_S)
        _count_timeout(request.target_agent)
        raise Timeout(f"agent {request.target_agent!r} did not finish the in-flight duplicate in time")

    async def _fetch_stored(self, agent: str, idempotency_key: str) -> AgentResponseEvent | None:
        value = await self._stored_raw(agent, idempotency_key)
        return None if value is None or value == scripts.IN_FLIGHT else self._decode_stored(value, agent)

    async def _stored_raw(self, agent: str, idempotency_key: str) -> bytes | None:
        """What the response key holds: a stored response, the in-flight marker, or None (nothing);
        the marker too when Redis cannot be read (nothing is known to be lost)."""
        try:
            value: bytes | None = await self._core.redis.get(
                keys.response_key(self._core.prefix, agent, idempotency_key)
            )
        except _TRANSIENT:
            return scripts.IN_FLIGHT
        return value or None

    def _stored_answer(self, raw: bytes, request: AgentRequestEvent) -> AgentResponseEvent:
        """The response stored under ``request``'s idempotency key, when it answers this request
        (the same source agent, request type and payload: a retry); Conflict naming the key when
        it answers another. Keys are per target agent, not per caller, so without this a key
        reused by another request (or another caller) got that request's answer."""
        response = self._decode_stored(raw, request.target_agent)
        digest = response.metadata.get(REQUEST_DIGEST)
        if digest is None:  # stored without one (an earlier version): what it names must match
            same = (response.target_agent, response.request_type) == (request.source_agent, request.request_type)
        else:
            same = digest == request_digest(request)
        if not same:
            raise Conflict(
                f"idempotency_key {request.idempotency_key!r} already answers a different request (another "
                "source agent, request type or payload); send this request under a key of its own",
                field="idempotency_key",
            )
        return response

    def _decode_stored(self, raw: bytes, agent: str) -> AgentResponseEvent:
        data = parse_envelope(raw, max_bytes=self.settings.max_payload_bytes)
        return response_from_dict(data, key=self._core.verify_key(agent))

    # -- replies -----------------------------------------------------------------------
    async def _ensure_replies(self) -> None:
        if self._replies_ready.is_set():
            return
        if self._reply_task is None:
            self._reply_task = asyncio.create_task(self._reply_loop())
        try:
            await asyncio.wait_for(self._replies_ready.wait(), 5.0)
        except TimeoutError as e:
            raise ServiceUnavailable("cannot subscribe to the reply channel on Redis; retry") from e

    async def _reply_loop(self) -> None:
        """Read this instance's reply channel on a connection of its own, replies as the server
        sends them: redis-py's PubSub wraps each message in a parse, a lock and a dict, which
        cost more than the rest of taking the reply. The connection is named
        ``ao-replies-<instance id>`` in CLIENT LIST. An idle one is PINGed, and one whose PING
        gets no answer within another idle spell is given up as dead (a link dropped silently);
        a lost one is resubscribed and the waiters' stored responses are swept up."""
        channel = keys.reply_channel(self._core.prefix, self.instance_id).encode()
        delay_s, first = 0.05, True
        while True:
            conn = self._new_reply_connection()
            try:
                await conn.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
                self._subscribed = {channel, *self._cancel_channels}
                await conn.send_command("SUBSCRIBE", *self._subscribed)
                self._reply_conn = conn
                async for kind, name, data in self._read_replies(conn):
                    if kind == "message":
                        if name == channel:
                            self._on_reply(data)
                        else:
                            self._on_cancel_notice(name, data)
                    elif kind == "subscribe" and name == channel:
                        delay_s = 0.05
                        if not first:
                            self._start_sweep()
                        first = False
                        self._replies_ready.set()
            except _TRANSIENT as e:
                _log.warning("reply channel lost (%s); resubscribing in %.2fs", e, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)
            finally:
                self._reply_conn = None
                with contextlib.suppress(*_TRANSIENT):
                    await conn.disconnect()

    def _new_reply_connection(self) -> AbstractConnection:
        """A connection like the pool's, but without redis-py's health check: that one PINGs and
        wants ``PONG``, which a subscribed connection answers as ``[b"pong", b""]``, so every
        idle ``health_check_interval`` (30 s, :func:`connect_redis`) it would raise "Bad
        response from PING health check" and drop a live connection. :meth:`_read_replies`
        checks it instead."""
        pool = self._core.redis.connection_pool
        name = f"ao-replies-{self.instance_id}"
        return pool.connection_class(**{**pool.connection_kwargs, "client_name": name, "health_check_interval": 0})

    @staticmethod
    async def _read_replies(conn: AbstractConnection) -> AsyncIterator[tuple[str, bytes, Any]]:
        """The (kind, channel, data) of each push on the subscribed ``conn``. After
        ``_REPLY_IDLE_PING_S`` of quiet it sends PING; when nothing at all (not even the pong)
        comes in the next spell either, the connection is dead: ConnectionError."""
        pinged = False
        while True:
            reply = await conn.read_response(timeout=_REPLY_IDLE_PING_S)
            if reply is None:
                if pinged:
                    raise RedisConnectionError(f"no answer to PING within {_REPLY_IDLE_PING_S:g}s")
                await conn.send_command("PING")  # answered as [b"pong", b""]
                pinged = True
                continue
            pinged = False
            name = reply[1] if isinstance(reply[1], bytes) else keys.as_text(reply[1]).encode()
            yield keys.as_text(reply[0]), name, reply[2] if len(reply) > 2 else None

    def _on_reply(self, raw: bytes) -> None:
        try:
            data = orjson.loads(raw)
            waiter = self._waiters.get(data.get("request_id"))
            if waiter is None or waiter.future.done():
                metrics.AGENT_RESPONSES_DROPPED.labels("late").inc()
                return
            response = _verified_or_refusal(data, key=self._core.verify_key(waiter.target))
        except (ValueError, TypeError, AttributeError, OrchestratorError) as e:  # anything published: no crash
            metrics.AGENT_RESPONSES_DROPPED.labels("invalid").inc()
            _log.warning("dropped an invalid response: %s", e)
            return
        if response.source_agent != waiter.target:
            metrics.AGENT_RESPONSES_DROPPED.labels("invalid").inc()
            return
        waiter.future.set_result(response)

    def _start_sweep(self) -> None:
        task = asyncio.create_task(self._sweep())
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def _sweep(self) -> None:
        """After a reconnect: responses published while we were away are read from the store.

        A queued request whose key holds nothing, not even its in-flight marker, was lost with
        Redis's data. An instance may still be running it (read before the loss): each sets the
        markers of what it runs again within ``markers_renewed_within_s``, so only the requests
        whose keys are still empty after that long are sent again (no second run of one that runs)."""
        empty = await self._sweep_once(list(self._waiters.values()))
        if not empty:
            return
        await asyncio.sleep(markers_renewed_within_s(self.settings))
        for waiter in await self._sweep_once(empty):
            waiter.future.set_exception(_RequestLost())

    async def _sweep_once(self, waiters: list[_Waiter]) -> list[_Waiter]:
        """Resolve the ``waiters`` whose response is stored; return the queued ones whose key is empty."""
        empty = []
        for waiter in waiters:
            if waiter.future.done():
                continue
            value = await self._stored_raw(waiter.target, waiter.idempotency_key)
            if waiter.future.done():
                continue
            if value is None and waiter.queued:
                empty.append(waiter)
            elif value is not None and value != scripts.IN_FLIGHT:
                waiter.future.set_result(self._decode_stored(value, waiter.target))
        return empty

    # -- serving -----------------------------------------------------------------------
    async def serve(self, agent_name: str, handler: Handler, *, concurrency: int, consumer: str) -> None:
        """Serve requests to ``agent_name`` as ``consumer`` until :meth:`stop_serving`.

        ``handler(request) -> dict`` returns the success payload; an
        OrchestratorError it raises becomes an ``error`` response naming the
        problem (``RequestRejected`` -> ``rejected``); any other exception leaves
        the request pending for redelivery (and, past ``max_deliveries``, the
        dead-letter stream). At most ``concurrency`` handlers run at once. Should
        serving end on its own (a loop of the server ended: a bug), it stops and
        raises ``ServiceUnavailable`` naming the error.
        """
        _check_agent(agent_name, field="agent_name")
        if not _INSTANCE_RE.match(consumer):
            raise InvalidInput(f"consumer {consumer!r} must match {_INSTANCE_RE.pattern}", field="consumer")
        if concurrency < 1:
            raise InvalidInput("concurrency must be at least 1", field="concurrency")
        server = Server(self._core, agent_name, handler, concurrency=concurrency, consumer=consumer)
        self._servers.append(server)
        try:
            await self._listen_for_cancels(agent_name)
            await server.run()
        except asyncio.CancelledError:
            await asyncio.shield(server.stop(grace_s=0))
            raise
        finally:
            self._servers.remove(server)

    async def _listen_for_cancels(self, agent: str) -> None:
        """Subscribe to ``agent``'s cancel channel on this instance's reply connection (no
        connection of its own): added on the live connection, and on every reconnect."""
        channel = keys.cancel_channel(self._core.prefix, agent).encode()
        self._cancel_channels[channel] = agent
        await self._ensure_replies()
        conn = self._reply_conn
        if conn is not None and channel not in self._subscribed:
            self._subscribed.add(channel)
            await conn.send_command("SUBSCRIBE", channel)  # the reply loop reads its confirmation

    def _on_cancel_notice(self, channel: bytes, raw: bytes) -> None:
        agent = self._cancel_channels.get(channel)
        if agent is None:
            return
        notice = self._core.read_cancel_notice(raw, agent)
        if notice is None:
            return
        for server in self._servers:
            if server.agent == agent and server.cancel(notice[0], forget_at=notice[1]):
                _log.info("cancelled the request %s to %s on notice", notice[0], agent)

    async def cancel_request(self, request: AgentRequestEvent, *, wait_s: float) -> AgentResponseEvent | None:
        """Cancel ``request`` (sent with :meth:`request_agent`) at the agent: the instance running
        it cancels its handler and stores an ``error`` response with code ``cancelled``, so its
        idempotency key never runs again; an instance that reads it later, still queued, answers
        it so without running it. Waits up to ``wait_s`` for that response and returns it, or the
        stored response of a request that finished first; None when none came in time (nobody
        was running it, or the notice was lost: pub/sub drops what nobody hears) or Redis could
        not be reached. Only for work that must not go on: a call that another replica sends
        again with the same key would get ``cancelled``."""
        agent, rid = request.target_agent, request.request_id
        loop = asyncio.get_running_loop()
        waiter = self._waiters.get(rid)
        mine = waiter is None or waiter.future.done()  # the call's own waiter once it returned or was cancelled
        if mine:
            waiter = self._waiters[rid] = _Waiter(loop.create_future(), agent, request.idempotency_key)
        assert waiter is not None
        try:
            async with asyncio.timeout(wait_s):
                await self._ensure_replies()
                response_key = keys.response_key(self._core.prefix, agent, request.idempotency_key)
                notice = self._core.cancel_notice(request)
                channel = keys.cancel_channel(self._core.prefix, agent)
                code, value = await self._core.run_script(self._cancel_script, [response_key], [channel, notice])
                if int(code) == scripts.CANCEL_STORED:
                    return self._decode_stored(value, agent)
                if int(code) == scripts.CANCEL_NOT_IN_FLIGHT:
                    return None
                return await waiter.future
        except (TimeoutError, OrchestratorError, *_TRANSIENT) as e:
            _log.info("cancel of %s to %s: no answer (%s); reading the stored response", rid, agent, e)
            with contextlib.suppress(TimeoutError, OrchestratorError):
                async with asyncio.timeout(_CANCEL_LAST_LOOK_S):
                    return await self._fetch_stored(agent, request.idempotency_key)
            return None
        finally:
            if mine and self._waiters.get(rid) is waiter:
                del self._waiters[rid]

    async def stop_serving(self, *, grace_s: float = 10.0) -> None:
        """Stop taking work; running handlers get ``grace_s`` to finish, the rest stay
        pending and are reclaimed by a live instance after the visibility timeout."""
        await asyncio.gather(*(s.stop(grace_s=grace_s) for s in list(self._servers)))

    async def execute(self, request: AgentRequestEvent, handler: Handler) -> AgentResponseEvent:
        """Run a request that arrived over HTTP through the same checks as the stream path.

        Raises ``PayloadTooLarge``, ``InvalidSignature`` (also for a ``created_at``
        outside the replay window) or ``DeadlineExpired`` for a refused envelope
        (answered, not dead-lettered: see :meth:`_refuse_bad`); returns the
        stored response for a repeat (``Conflict`` if it answers a different
        request), else the handler's response, stored under the
        idempotency key. The handler runs in one of the agent's slots, which the stream
        path shares (``_bus_core.Slots``); with none free it raises ``Busy`` at once
        rather than wait: nothing runs and the key is left free for a retry.
        """
        core = self._core
        agent = request.target_agent
        self._refuse_bad(request)
        if request.deadline < time.time():
            raise DeadlineExpired("the request's deadline has passed; send it with a later one", field="deadline")
        stream = keys.request_stream(core.prefix, agent, keys.band_of(request.priority))
        while True:  # a duplicate in flight: its response, or this one runs once the duplicate was given up
            code, value = await self._admit(request, b"", stream=stream, deadline=request.deadline, queue=False)
            if code == scripts.ADMIT_AS:  # its request id was sent before under another key: it is that request
                request, _ = self._as_first(request, b"", value)
                continue
            if code == scripts.ADMIT_STORED:
                return self._stored_answer(value, request)
            if code != scripts.ADMIT_IN_FLIGHT:
                break
            if (stored := await self._await_stored(request, request.deadline)) is not None:
                return stored
        slots = core.slots(agent, size=self.settings.agent_concurrency)
        if not await slots.try_take():
            await self._free_key(request)
            raise self._busy(agent, slots.size)
        try:
            outcome = await core.run_handler(request, handler, agent=agent)
            await core.finish(request, outcome.raw, stream=None, entry_id=None)  # runs in the batch task: shielded
        finally:
            slots.give()
        return outcome.response

    async def _free_key(self, request: AgentRequestEvent) -> None:
        """Remove the in-flight marker this admission set for a request that will not run, so a
        retry of its key runs instead of waiting for the marker to run out at its deadline."""
        with contextlib.suppress(*_TRANSIENT):  # else the retry waits: the marker still runs out
            await self._core.redis.delete(
                keys.response_key(self._core.prefix, request.target_agent, request.idempotency_key)
            )

    @staticmethod
    def _busy(agent: str, size: int) -> Busy:
        metrics.AGENT_REQUESTS_REFUSED.labels(Busy.code).inc()
        return Busy(
            f"this instance of {agent} runs {size} requests at once (AO_AGENT_CONCURRENCY) and all are "
            f"running; retry in {_BUSY_RETRY_AFTER_S} s, or send the request on the bus, where it waits its turn",
            resource=agent,
            details={"retry_after_s": _BUSY_RETRY_AFTER_S},
        )

    def _refuse_bad(self, request: AgentRequestEvent) -> None:
        """Raise the refusal of a request over HTTP that fails the size, signature or replay
        checks. It is counted (``agent_requests_refused_total``) and logged, not dead-lettered:
        the caller has it as its answer, and storing the bodies of callers nobody authenticated
        let anyone fill Redis (200 bogus 1 MB envelopes grew it by 190 MB)."""
        core = self._core
        try:
            check_payload_size(request.payload, max_bytes=self.settings.max_payload_bytes)
            key = core.verify_key(request.target_agent)
            if key is not None:
                request.verify(key)
            core.check_window(request, now=time.time())
        except OrchestratorError as e:
            metrics.AGENT_REQUESTS_REFUSED.labels(e.code).inc()
            _log.warning("refused a request to %s over HTTP: %s (%s)", request.target_agent, e.code, e.message)
            raise

    # -- dead letters ------------------------------------------------------------------
    async def dead_letters(self, agent_name: str | None = None, *, limit: int = 100) -> list[DeadLetter]:
        """Newest first, for one agent or every agent that ever served."""
        if agent_name is not None:
            _check_agent(agent_name, field="agent_name")
            agents = [agent_name]
        else:
            members = await self._core.redis.smembers(keys.agents_set(self._core.prefix))  # type: ignore[misc]
            agents = sorted(keys.as_text(m) for m in members)
        letters: list[DeadLetter] = []
        for agent in agents:
            rows = await self._core.redis.xrevrange(keys.dead_letter_stream(self._core.prefix, agent), count=limit)
            letters.extend(self._dead_letter(agent, entry_id, fields) for entry_id, fields in rows)
        letters.sort(key=lambda d: d.dead_at, reverse=True)
        return letters[:limit]

    def _dead_letter(self, agent: str, entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
        raw = fields.get(b"e") or b""
        try:
            request: dict[str, Any] | None = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            request = None
        return DeadLetter(
            id=f"{agent}/{keys.as_text(entry_id)}",
            agent=agent,
            reason=keys.as_text(fields.get(b"reason", b"")),
            message=keys.as_text(fields.get(b"message", b"")),
            deliveries=int(fields.get(b"deliveries", b"0") or 0),
            dead_at=float(fields.get(b"dead_at", b"0") or 0),
            request=request if isinstance(request, dict) else None,
        )

    async def requeue_dead_letter(self, entry_id: str) -> AgentRequestEvent:
        """Send a dead-lettered request again (fresh timestamps and deadline, re-signed) and
        remove it from the dead-letter stream. Refused envelopes cannot be requeued."""
        agent, _, sid = entry_id.partition("/")
        _check_agent(agent, field="entry_id")
        dead_key = keys.dead_letter_stream(self._core.prefix, agent)
        rows = await self._core.redis.xrange(dead_key, min=sid, max=sid) if sid else []
        if not rows:
            raise NotFound(f"no dead letter {entry_id!r}; list them with `dlq list`", resource=entry_id)
        letter = self._dead_letter(agent, rows[0][0], rows[0][1])
        if letter.reason not in _REQUEUEABLE or letter.request is None:
            raise Conflict(
                f"dead letter {entry_id!r} was refused ({letter.reason}); send a new, valid request instead",
                resource=entry_id,
            )
        request = request_from_dict(letter.request, key=self._core.verify_key(agent))
        now = time.time()
        span_s = max(request.deadline - request.created_at, 1.0)
        data = request.to_dict()
        data.update(created_at=now, deadline=now + span_s)
        raw = self._core.signed_json(data, agent)
        pipe = self._core.redis.pipeline(transaction=True)
        stream = keys.request_stream(self._core.prefix, agent, keys.band_of(request.priority))
        pipe.xadd(stream, {"e": raw}, maxlen=self.settings.stream_maxlen, approximate=True)
        pipe.xdel(dead_key, sid)
        await pipe.execute()
        return AgentRequestEvent.model_validate(orjson.loads(raw))

    # -- events ------------------------------------------------------------------------
    async def emit(
        self,
        event_type: str,
        data: dict[str, Any],
        *,
        aggregate_type: str | None = None,
        aggregate_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Event:
        """INSERT the event into ``events`` (the record), then PUBLISH it to live subscribers."""
        event = await self.emit_after(
            None, event_type, data, aggregate_type=aggregate_type, aggregate_id=aggregate_id, metadata=metadata
        )
        assert event is not None  # no change to condition it on
        return event

    async def emit_after(
        self,
        change: Statement | None,
        event_type: str,
        data: dict[str, Any],
        *,
        aggregate_type: str | None = None,
        aggregate_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        also: Sequence[Along] = (),
        before: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> Event | None:
        """Apply ``change`` (SQL and its parameters; it returns a row when it applied) and store the
        event in the same statement, one commit; then publish it. None when the change did not
        apply: neither was written. ``also`` go in the same statement, applied either way.
        ``before`` (``(event_type, data)``) are events stored and published ahead of this one,
        in that order, on the same terms. Without a change this is :meth:`emit`."""
        return await _bus_events.emit(
            self.pool,
            self._publish,
            event_type,
            data,
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            metadata=metadata,
            after=change,
            also=also,
            before=before,
            stored=self._stored,
        )

    def insert_along(
        self,
        *events: tuple[str, dict[str, Any]],
        aggregate_type: str | None = None,
        aggregate_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Along:
        """The INSERT of ``events`` (``(event_type, data)``, stored in that order), to go in
        another statement (such as a launch's: see ``WorkflowStateManager.create_workflow_along``);
        its parameters are numbered from the ``int`` given. Pass the rows it returns to
        :meth:`announce`, in id order, once committed."""
        return _bus_events.insert_along(
            events, aggregate_type=aggregate_type, aggregate_id=aggregate_id, metadata=metadata
        )

    async def announce(self, *rows: dict[str, Any]) -> list[Event]:
        """Publish the event rows another statement stored (see :meth:`insert_along`), together
        and in the order given."""
        return await _bus_events.announce(self._publish, rows, stored=self._stored)

    async def _publish(self, events: Sequence[Event]) -> None:
        """Publish stored events; those published in the same loop iteration go in one write."""
        result = await self._publishes.submit(events)
        if isinstance(result, Exception):
            raise result

    async def _flush_publishes(self, batches: list[Sequence[Event]]) -> list[Any]:
        """Every batch's PUBLISHes in one write; a result per batch (None, or its first error)."""
        replies = iter(await run_commands(self._core.redis, *[
            command for events in batches for command in _bus_events.publish_commands(self._core.prefix, events)
        ]))  # fmt: skip
        results: list[Any] = []
        for events in batches:
            errors = [r for r in itertools.islice(replies, len(events)) if isinstance(r, Exception)]
            results.append(errors[0] if errors else None)
        return results

    def _stored(self, event: Event) -> None:
        for pattern, callback in self._own:
            if fnmatch.fnmatchcase(event.event_type, pattern):
                callback(event)

    async def subscribe(
        self,
        pattern: str,
        callback: EventCallback,
        *,
        on_resubscribed: Callable[[], None] | None = None,
        own_first: bool = False,
    ) -> Subscription:
        """Call ``callback(event)`` for each live event whose type matches the glob ``pattern``.
        Returns once subscribed; ``await sub.close()`` ends it. ``on_resubscribed()`` is called
        when it listens again after losing Redis (events published meanwhile were missed).

        With ``own_first`` (a synchronous callback), the events this bus stores itself are also
        handed over as soon as they are stored, before they are published: a listener in this
        process gets them without the Redis round trip, and then once more from Redis (dedupe
        by ``event.id``)."""
        own = (pattern, callback)

        def closed(sub: Subscription) -> None:
            self._subscriptions.discard(sub)
            if own in self._own:
                self._own.remove(own)

        sub = await _bus_events.subscribe(
            self._core.redis,
            self._core.prefix,
            pattern,
            callback,
            on_close=closed,
            on_resubscribed=on_resubscribed,
        )
        self._subscriptions.add(sub)
        if own_first:
            self._own.append(own)
        return sub

    async def events_since(
        self,
        after_id: int,
        *,
        event_type: str | None = None,
        aggregate_type: str | None = None,
        aggregate_id: str | None = None,
        since: datetime | None = None,
        limit: int = 1000,
    ) -> list[Event]:
        """Stored events with ``id > after_id`` matching the filters, oldest first."""
        return await _bus_events.events_since(
            self.pool,
            after_id,
            event_type=event_type,
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            since=since,
            limit=limit,
        )

    async def republish(self, event: Event) -> None:
        """Publish a stored event again (replay); subscribers dedupe by ``event.id``."""
        await _bus_events.publish(self._core.redis, self._core.prefix, event)


def _verified_or_refusal(data: dict[str, Any], *, key: bytes | None) -> AgentResponseEvent:
    """The response, verified; or, when it does not verify, the agent's refusal of this caller's
    signature (``bad_signature``), taken on its code alone: a caller whose key differs from the
    agent's cannot verify anything the agent sends, and would otherwise wait out its timeout.
    A forged refusal could only fail a call, which anyone able to publish on Redis can do anyway."""
    try:
        return response_from_dict(data, key=key)
    except InvalidSignature:
        refusal = response_from_dict(data, key=None)
        if refusal.status != "error" or (refusal.error or {}).get("code") != InvalidSignature.code:
            raise
        return refusal
