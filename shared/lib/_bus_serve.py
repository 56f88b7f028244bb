"""The serving side of the bus: one consumer of an agent's request streams.

A reader task blocks on XREADGROUP over the agent's priority bands (high band
first), a maintenance task renews liveness, keeps the claims of running
handlers alive (XCLAIM ... JUSTID) and their in-flight markers set (a Redis
restarted without its data lost them), reclaims entries idle past the visibility
timeout (XAUTOCLAIM), takes over at once the entries of consumers no longer
live (an instance killed mid-work: its liveness runs out sooner than the
visibility timeout) and dead-letters those delivered too often. At start it
runs again what its own name still held from an earlier life. Each entry
runs in its own task under the concurrency limit the agent's requests over HTTP
share (``_bus_core.Slots``): it reads only as many entries as slots are free. A cancel notice
(``cancel``) cancels the task running its request, which is answered ``cancelled``.

An entry that cannot be read (not JSON, not an envelope, no canonical form to verify:
nested past orjson's 254 levels, say) is ``invalid_input`` and dead-lettered at once.
Neither loop ends on an error: it is logged and the loop goes on. Should one end all
the same (a bug), the server stops and :meth:`Server.run` raises, so the instance does
not look live while it serves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from shared.lib import _bus_scripts as scripts
from shared.lib import metrics
from shared.lib import redis_keys as keys
from shared.lib._bus_core import Handler, HandlerOutcome, _Core
from shared.lib.agent_events import AgentRequestEvent, parse_envelope, request_from_dict
from shared.lib.connections import run_command
from shared.lib.errors import (
    Cancelled,
    DeadLettered,
    InvalidInput,
    InvalidSignature,
    OrchestratorError,
    ServiceUnavailable,
)
from shared.lib.settings import Settings

__all__ = ["Server"]

_log = logging.getLogger("shared.lib.event_bus")

#: How long one XREADGROUP blocks; also the longest a stop waits for the reader.
_BLOCK_MS = 250
#: Longest wait for a slot to be given back before the read loop looks again (slots are also
#: freed by a request's task ending, which wakes nothing).
_ROOM_WAIT_S = 0.05
#: Loop turns a fast handler needs to reach its reply write (task start, batch, flush).
_REPLY_TURNS = 4
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
#: After a failed maintenance tick, the first retry comes this soon (doubling up to the interval),
#: so liveness and markers are back within about this long of Redis coming back.
_MAINTAIN_RETRY_S = 0.05
_MAINTAIN_RETRY_MAX_S = 0.5


def consumer_lifetime_s(settings: Settings) -> float:
    """How long a consumer stays live after its last beat: past it, it is taken for dead."""
    return min(settings.consumer_dead_after_s, settings.visibility_timeout_s)


def maintain_interval_s(settings: Settings) -> float:
    """How often a consumer beats, renews its claims and looks for entries to reclaim: a third
    of its lifetime (at most 5 s), so two missed beats do not make a live consumer look dead."""
    return max(min(consumer_lifetime_s(settings) / 3, 5.0), 0.05)


def markers_renewed_within_s(settings: Settings) -> float:
    """How soon after Redis comes back every instance has set again the in-flight markers of the
    requests it runs: at its next maintenance tick, or its next retry of a failed one."""
    return maintain_interval_s(settings) + _MAINTAIN_RETRY_MAX_S


def _field(fields: list[bytes] | None, name: bytes) -> bytes | None:
    """A field of a raw stream entry ([field, value, ...]; None for an entry deleted while pending)."""
    if not fields:
        return None
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == name:
            return fields[i + 1]
    return None


@dataclass
class _Entry:
    stream: str
    entry_id: Any
    raw: bytes | None
    deliveries: int


def _read(raw: bytes | None, *, max_bytes: int, key: bytes | None) -> tuple[dict[str, Any], AgentRequestEvent]:
    """The envelope of a stream entry and its request, verified with ``key`` (None: read, not
    verified). Whatever cannot be read is an OrchestratorError (``invalid_input`` when the
    envelope's own checks did not name it), never another exception: an entry is anyone's input."""
    try:
        data = parse_envelope(raw or b"", max_bytes=max_bytes)
        return data, request_from_dict(data, key=key)
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidInput(f"the envelope cannot be read ({e!r}); send a valid request", field="envelope") from e


class Server:
    """Serves ``agent`` as ``consumer`` until :meth:`stop`; see ``EventBus.serve``."""

    def __init__(self, core: _Core, agent: str, handler: Handler, *, concurrency: int, consumer: str) -> None:
        self.core = core
        self.agent = agent
        self.handler = handler
        self.consumer = consumer
        self.concurrency = concurrency
        self.streams = [keys.request_stream(core.prefix, agent, band) for band in keys.BANDS]
        self._slots = core.slots(agent, size=concurrency)  # shared with EventBus.execute
        # At most half the slots per read: the first half's replies are written while the
        # second half is read and run, so requester, Redis and this instance overlap instead
        # of passing one convoy of `concurrency` requests around. 64 in flight through
        # support/bench/messaging.py: median 1.16x the requests/s of reading every free slot
        # at once (5 paired runs, 0.94x-1.32x, on a 2-core VM).
        self._read_batch = max(1, concurrency // 2)
        self._held: dict[Any, str] = {}  # entry id -> stream, for keepalive
        # idempotency key -> (its handler's task, its request's deadline)
        self._running: dict[str, tuple[asyncio.Task[Any], float]] = {}
        self._cancelled: dict[str, float] = {}  # idempotency key -> Unix time to forget its cancel notice
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._done = asyncio.Event()
        self._backlog = True  # until a read proves otherwise
        self.queue_depth = 0
        self.pending = 0
        self.redelivered = 0
        self._beat_at_ms = 0  # the server's clock at the last beat
        self.failure: BaseException | None = None  # why a loop ended, when one did without a stop

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until :meth:`stop`; raises ServiceUnavailable, having stopped, if a loop ended on its own."""
        await self._join()
        await self._beat()
        await self._take_back_own()
        self._loops = [
            asyncio.create_task(self._read_loop(), name=f"bus-read-{self.agent}"),
            asyncio.create_task(self._maintain_loop(), name=f"bus-maintain-{self.agent}"),
        ]
        for loop in self._loops:
            loop.add_done_callback(self._loop_ended)
        await self._done.wait()
        if self.failure is not None:
            await self.stop(grace_s=0)  # out of the consumers: a live instance takes its entries over
            raise ServiceUnavailable(
                f"{self.consumer} stopped serving {self.agent}: {self.failure!r}; restart the instance",
                resource=self.agent,
            ) from self.failure

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop ended: by :meth:`stop`, or on its own (a bug), which stops the server."""
        if self._stopping.is_set():
            return
        error = None if task.cancelled() else task.exception()
        self.failure = error or RuntimeError(f"{task.get_name()} ended")
        _log.critical("%s stopped serving %s: %s ended (%r)", self.consumer, self.agent, task.get_name(), error)
        self._done.set()

    async def stop(self, *, grace_s: float) -> None:
        """Stop reading, let running handlers finish for ``grace_s``, cancel the rest
        (their entries stay pending and are reclaimed by a live instance)."""
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self.core.heartbeat(keys=[keys.consumers_key(self.core.prefix, self.agent)], args=[self.consumer, 0])
        self._done.set()

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def _join(self) -> None:
        """Create the agent's consumer groups (and streams) if missing, and list the agent among
        those that served (for ``dlq list``): at start, and when Redis lost its data."""
        await self._ensure_groups()
        await self.core.redis.sadd(keys.agents_set(self.core.prefix), self.agent)  # type: ignore[misc]

    async def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.core.redis.xgroup_create(stream, self.agent, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def _beat(self) -> None:
        """Stay live for one lifetime; keeps the server's clock (ms) of the beat for :meth:`_live_consumers`."""
        lifetime_ms = int(consumer_lifetime_s(self.core.settings) * 1000)
        self._beat_at_ms = int(
            await self.core.heartbeat(
                keys=[keys.consumers_key(self.core.prefix, self.agent)], args=[self.consumer, lifetime_ms]
            )
        )

    # -- reading -----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        delay_s, recovering, rejoin = 0.05, False, False
        while not self._stopping.is_set():
            try:
                if rejoin:  # the server lost its data (restart without persistence)
                    await self._join()
                    rejoin = False
                if recovering:  # renew liveness at once: an outage may have outlasted it
                    await self._beat()
                    recovering = False
                await self._read_once()
                delay_s = 0.05
            except _TRANSIENT as e:
                _log.warning("reading requests for %s failed (%s); retrying in %.2fs", self.agent, e, delay_s)
                await asyncio.sleep(delay_s)
                delay_s, recovering = min(delay_s * 2, 0.5), True
            except Exception as e:  # noqa: BLE001 - no error ends the loop: it is logged and reading goes on
                rejoin = isinstance(e, ResponseError) and "NOGROUP" in str(e)
                if not rejoin:
                    _log.exception("reading requests for %s failed; retrying in %.2fs", self.agent, delay_s)
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, 0.5)

    async def _read_once(self) -> None:
        """One XREADGROUP over all bands (high first). While a backlog may exist (the last read
        came back full), the high band is drained on its own first, so an urgent request queued
        behind normal ones is started next; otherwise one blocking read serves (one round trip)."""
        free = min(self._free(), self._read_batch)
        if free <= 0:
            await self._room()
            return
        reply = None
        if self._backlog:
            reply = await self._xreadgroup(self.streams[:1], count=free, block_ms=None)
        if not reply:
            reply = await self._xreadgroup(self.streams, count=free, block_ms=_BLOCK_MS)
        by_stream = {keys.as_text(s): entries for s, entries in reply or []}
        self._backlog = any(len(entries) >= free for entries in by_stream.values())
        for stream in self.streams:  # high band first
            for entry_id, fields in by_stream.get(stream, []):
                self._dispatch(_Entry(stream, entry_id, _field(fields, b"e"), 1))
        if by_stream:
            await self._let_fast_handlers_reply()

    async def _room(self) -> None:
        """Wait until a slot is given back (a request ended, here or over HTTP), or
        :data:`_ROOM_WAIT_S` at most: with every slot taken by long requests (test suites run
        for minutes) the read loop no longer wakes every millisecond to look."""
        self._slots.freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slots.freed.wait(), _ROOM_WAIT_S)
        await asyncio.sleep(0)  # the ended request's task leaves self._tasks

    def _free(self) -> int:
        """How many more entries it may take on: slots neither running a request (off the stream
        or over HTTP) nor promised to an entry it holds already."""
        return min(self.concurrency - len(self._tasks), self._slots.free)

    async def _xreadgroup(self, streams: list[str], *, count: int, block_ms: int | None) -> Any:
        """XREADGROUP as the server answers it: None, or [[stream, [[id, [field, value, ...]], ...]], ...]
        (by :func:`run_command`: redis-py's per-command wrapper cost more than the parsing)."""
        args: list[Any] = ["XREADGROUP", "GROUP", self.agent, self.consumer, "COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        return await run_command(self.core.redis, *args, "STREAMS", *streams, *[">"] * len(streams))

    @staticmethod
    async def _let_fast_handlers_reply() -> None:
        """Give just-dispatched handlers a few loop turns before the next XREADGROUP, so a
        fast handler's reply is written to Redis ahead of the next read, not behind it.
        A socket write here costs ~0.1 ms (2-core VM); in that order the sequential p50
        of ``python -m support.bench.messaging`` dropped from ~0.7 ms (see its output now)."""
        for _ in range(_REPLY_TURNS):
            await asyncio.sleep(0)

    def _dispatch(self, entry: _Entry) -> None:
        self._held[entry.entry_id] = entry.stream
        task = asyncio.create_task(self._handle(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- handling ----------------------------------------------------------------------
    async def _handle(self, entry: _Entry) -> None:
        try:
            async with self._slots:
                await self._process(entry)
        except asyncio.CancelledError:
            raise
        except OrchestratorError as e:  # raised by our own checks before the handler
            _log.warning("request %s to %s left pending: %s", entry.entry_id, self.agent, e)
        except Exception:  # noqa: BLE001 - a handler bug must not end the loop; the entry is redelivered
            _log.exception("handler for %s failed; the request stays pending for redelivery", self.agent)
        finally:
            self._held.pop(entry.entry_id, None)

    async def _process(self, entry: _Entry) -> None:
        core = self.core
        try:
            data, request = _read(entry.raw, max_bytes=core.settings.max_payload_bytes, key=core.verify_key(self.agent))
            self._check_target(request)
            core.check_window(request, now=time.time())
        except OrchestratorError as e:
            await self._refuse(entry, e)
            return
        if request.deadline < time.time():
            await self._expire(entry, request, data)
            return
        if entry.deliveries > 1 and await self._replay_stored(entry, request):
            return
        if request.idempotency_key in self._cancelled:  # cancelled while queued: not run
            outcome = self._cancelled_outcome(request, duration_s=0.0)
        else:
            outcome = await self._run(request)
        # No asyncio.shield (a task per request): the write runs in the finisher's own batch
        # task (``_bus_batch``), which cancelling this handler task does not cancel.
        await self._finish(request, outcome.raw, entry)

    async def _run(self, request: AgentRequestEvent) -> HandlerOutcome:
        """The handler's outcome; ``cancelled`` when a cancel notice cancelled it (its child
        processes are the handler's to end on CancelledError). A cancel of another kind (a stop)
        goes on up: the entry stays pending for a live instance."""
        key, task = request.idempotency_key, asyncio.current_task()
        assert task is not None
        self._running[key] = (task, request.deadline)
        started = time.perf_counter()
        try:
            return await self.core.run_handler(request, self.handler, agent=self.agent)
        except asyncio.CancelledError:
            if key not in self._cancelled:
                raise
            task.uncancel()
            return self._cancelled_outcome(request, duration_s=time.perf_counter() - started)
        finally:
            if self._running.get(key, (None,))[0] is task:
                del self._running[key]

    def _cancelled_outcome(self, request: AgentRequestEvent, *, duration_s: float) -> HandlerOutcome:
        self.core.count("cancelled")
        error = Cancelled("the request was cancelled by its sender; send a new one to run it").to_dict()
        return self.core.outcome(request, "error", {}, error=error, duration_s=duration_s)

    def cancel(self, idempotency_key: str, *, forget_at: float) -> bool:
        """A cancel notice: cancel the handler running ``idempotency_key`` here, if any, and
        remember the key until ``forget_at`` (Unix time) so that, read later, it is answered
        ``cancelled`` without running. Whether a handler was running it here."""
        now = time.time()
        for key in [k for k, until in self._cancelled.items() if until < now]:
            del self._cancelled[key]
        self._cancelled[idempotency_key] = forget_at
        running = self._running.get(idempotency_key)
        if running is None:
            return False
        running[0].cancel()
        return True

    def _check_target(self, request: AgentRequestEvent) -> None:
        """Refuse, as the sender's input error, a request found in the stream of another agent."""
        if request.target_agent != self.agent:
            raise InvalidInput(
                f"request addressed to {request.target_agent!r} found in the stream of {self.agent!r}",
                field="target_agent",
            )

    async def _finish(self, request: AgentRequestEvent, raw: bytes, entry: _Entry) -> None:
        """The finishing write, retried through a Redis outage for up to the visibility timeout."""
        try:  # the common case, without building a retry loop per request
            await self.core.finish(request, raw, stream=entry.stream, entry_id=entry.entry_id)
            return
        except _TRANSIENT as e:
            _log.warning("storing a response of %s failed (%s); retrying", self.agent, e)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_TRANSIENT),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            stop=stop_after_delay(self.core.settings.visibility_timeout_s),
            reraise=True,
        ):
            with attempt:
                await self.core.finish(request, raw, stream=entry.stream, entry_id=entry.entry_id)

    async def _refuse(self, entry: _Entry, exc: OrchestratorError) -> None:
        await self.core.dead_letter(
            self.agent,
            entry.raw,
            reason=exc.code,
            message=exc.message,
            stream=entry.stream,
            entry_id=entry.entry_id,
            deliveries=entry.deliveries,
        )
        if isinstance(exc, InvalidSignature):
            await self._tell_bad_signature(entry, exc)

    async def _tell_bad_signature(self, entry: _Entry, exc: InvalidSignature) -> None:
        """Tell the sender of a request refused for its signature at once, rather than leaving
        it to wait out its timeout: its key differs from this agent's (a mismatched
        ``AO_SIGNING_KEY``), so it cannot verify the answer and takes it on its code alone."""
        with contextlib.suppress(OrchestratorError):  # too broken to answer: dead-lettered only
            # read, not trusted: only to address the answer
            data, request = _read(entry.raw, max_bytes=self.core.settings.max_payload_bytes, key=None)
            outcome = self.core.outcome(request, "error", {}, error=exc.to_dict())
            await self.core.notify(data, outcome.raw)

    async def _expire(self, entry: _Entry, request: AgentRequestEvent, data: dict[str, Any]) -> None:
        """Not executed: ack it and tell the caller (who has given up or is about to)."""
        error = {"code": "deadline_expired", "message": "the request's deadline passed before it could run"}
        outcome = self.core.outcome(request, "timeout", {}, error=error)
        pipe = self.core.redis.pipeline(transaction=True)
        pipe.xack(entry.stream, self.agent, entry.entry_id)
        pipe.xdel(entry.stream, entry.entry_id)
        await pipe.execute()
        await self.core.notify(data, outcome.raw)
        self.core.count("expired")

    async def _replay_stored(self, entry: _Entry, request: AgentRequestEvent) -> bool:
        """A redelivered request whose response was already stored is answered from the store."""
        key = keys.response_key(self.core.prefix, self.agent, request.idempotency_key)
        stored = await self.core.redis.get(key)
        if not stored or stored == scripts.IN_FLIGHT:
            return False
        await self.core.finish(request, stored, stream=entry.stream, entry_id=entry.entry_id)
        return True

    # -- maintenance -------------------------------------------------------------------
    async def _maintain_loop(self) -> None:
        """A tick every interval; after a failed one (Redis down), retries soon, backing off."""
        interval_s = maintain_interval_s(self.core.settings)
        wait_s = interval_s
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait_s)
            if self._stopping.is_set():
                return
            try:
                await self._maintain()
                wait_s = interval_s
            except (RedisError, OSError) as e:
                wait_s = _MAINTAIN_RETRY_S if wait_s == interval_s else min(wait_s * 2, _MAINTAIN_RETRY_MAX_S)
                _log.warning("maintenance of %s failed (%s); retrying in %.2fs", self.agent, e, wait_s)
            except Exception:  # noqa: BLE001 - one bad entry must not end liveness and reclaiming
                wait_s = interval_s
                _log.exception("maintenance of %s failed; trying again in %.2fs", self.agent, wait_s)

    async def _maintain(self) -> None:
        await self._beat()
        await self._keep_claims()
        pipe = self.core.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xlen(stream)
            pipe.xpending(stream, self.agent)
        results = await pipe.execute()
        # Claims move entries between consumers, not out of the group: these counts hold after them.
        self.queue_depth = sum(results[0::2])
        self.pending = sum(int(p["pending"]) for p in results[1::2])
        metrics.AGENT_REQUEST_QUEUE_DEPTH.labels(self.agent).set(self.queue_depth)
        holders = [{keys.as_text(c["name"]) for c in p.get("consumers") or []} - {self.consumer} for p in results[1::2]]
        live = await self._live_consumers() if any(holders) else set()
        for stream, held_by in zip(self.streams, holders, strict=True):
            await self._reclaim(stream, dead=sorted(held_by - live))

    async def _live_consumers(self) -> set[str]:
        """The consumers of this agent live at the last beat (the server's clock)."""
        live = await self.core.redis.zrange(
            keys.consumers_key(self.core.prefix, self.agent), self._beat_at_ms, "+inf", byscore=True
        )
        return {keys.as_text(m) for m in live}

    async def _keep_claims(self) -> None:
        """Reset the idle time of every entry this instance holds, so none is reclaimed, and set
        again the in-flight marker of each request it runs where none is (SET NX): a Redis back
        without its data lost them, and a requester sends a request again whose key is empty
        (``EventBus._sweep``); marked, it waits for this run's answer instead."""
        by_stream: dict[str, list[Any]] = {}
        for entry_id, stream in list(self._held.items()):
            by_stream.setdefault(stream, []).append(entry_id)
        if not by_stream and not self._running:
            return
        pipe = self.core.redis.pipeline(transaction=False)
        now = time.time()
        for key, (_, deadline) in self._running.items():
            if deadline > now:
                ttl_ms = int((deadline - now) * 1000) + keys.IN_FLIGHT_MARKER_MARGIN_MS
                pipe.set(keys.response_key(self.core.prefix, self.agent, key), scripts.IN_FLIGHT, px=ttl_ms, nx=True)
        for stream, ids in by_stream.items():
            pipe.xclaim(stream, self.agent, self.consumer, 0, ids, justid=True)
        await pipe.execute()

    async def _reclaim(self, stream: str, *, dead: list[str]) -> None:
        """Claim the entries idle past the visibility timeout, then those held by ``dead``
        (consumers holding entries of ``stream`` that are no longer live)."""
        free = self._free()
        if free <= 0:
            return
        min_idle_ms = int(self.core.settings.visibility_timeout_s * 1000)
        result = await self.core.redis.xautoclaim(stream, self.agent, self.consumer, min_idle_ms, "0-0", count=free)
        claimed = [(eid, fields) for eid, fields in result[1] if eid is not None]
        claimed += await self._take_over_dead(stream, dead, count=free - len(claimed))
        await self._redeliver_claimed(stream, [(eid, fields) for eid, fields in claimed if eid not in self._held])

    async def _take_back_own(self) -> None:
        """At start, before reading: run again the entries still pending under this consumer's
        name from an earlier life (a restart under the same instance id after a kill), up to the
        concurrency per band, instead of leaving them to the visibility timeout. None of them can
        be running here yet."""
        for stream in self.streams:
            claimed = await self._claim_held_by(stream, [self.consumer], count=self.concurrency, min_idle_ms=0)
            await self._redeliver_claimed(stream, claimed)

    async def _redeliver_claimed(self, stream: str, claimed: list[tuple[Any, Any]]) -> None:
        if not claimed:
            return
        counts = await self._delivery_counts(stream, [eid for eid, _ in claimed])
        for entry_id, fields in claimed:
            entry = _Entry(stream, entry_id, (fields or {}).get(b"e"), counts.get(entry_id, 2))
            try:
                await self._redeliver(entry)
            except (RedisError, OSError):
                raise
            except Exception:  # noqa: BLE001 - one bad entry must not stop the others, nor a start
                _log.exception("redelivering %s of %s failed; it is reclaimed again later", entry_id, self.agent)

    async def _take_over_dead(self, stream: str, dead: list[str], *, count: int) -> list[tuple[Any, Any]]:
        """Claim up to ``count`` entries of ``stream`` held by consumers no longer live (killed
        mid-work), without waiting for the visibility timeout. Only entries idle for a maintenance
        interval are taken: when several live instances try at once, the first one's claim resets
        their idle time and the others take nothing."""
        if count <= 0 or not dead:
            return []
        min_idle_ms = int(maintain_interval_s(self.core.settings) * 1000)
        return await self._claim_held_by(stream, dead, count=count, min_idle_ms=min_idle_ms)

    async def _claim_held_by(
        self, stream: str, consumers: list[str], *, count: int, min_idle_ms: int
    ) -> list[tuple[Any, Any]]:
        """Claim (XCLAIM) up to ``count`` entries of ``stream`` pending under ``consumers``."""
        ids: list[Any] = []
        for consumer in consumers:
            if len(ids) >= count:
                break
            rows = await self.core.redis.xpending_range(
                stream, self.agent, min="-", max="+", count=count - len(ids), consumername=consumer
            )
            ids += [row["message_id"] for row in rows]
        if not ids:
            return []
        claimed = await self.core.redis.xclaim(stream, self.agent, self.consumer, min_idle_ms, ids)
        return [(eid, fields) for eid, fields in claimed if eid is not None]

    async def _delivery_counts(self, stream: str, ids: list[Any]) -> dict[Any, int]:
        pipe = self.core.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(stream, self.agent, min=entry_id, max=entry_id, count=1)
        counts: dict[Any, int] = {}
        for rows in await pipe.execute():
            for row in rows:
                counts[row["message_id"]] = int(row["times_delivered"])
        return counts

    async def _redeliver(self, entry: _Entry) -> None:
        if entry.raw is None:  # trimmed from the stream while pending: nothing left to run
            await self.core.redis.xack(entry.stream, self.agent, entry.entry_id)
            return
        if entry.deliveries > self.core.settings.max_deliveries:
            await self.core.dead_letter(
                self.agent,
                entry.raw,
                reason="max_deliveries",
                message=f"delivered {entry.deliveries - 1} times without a stored response",
                stream=entry.stream,
                entry_id=entry.entry_id,
                deliveries=entry.deliveries - 1,
            )
            await self._clear_marker(entry)
            return
        self.redelivered += 1
        self.core.count("redelivered")
        metrics.AGENT_REQUESTS_REDELIVERED.labels(self.agent).inc()
        self._dispatch(entry)

    async def _clear_marker(self, entry: _Entry) -> None:
        """Tell the caller at once, and let a retry of a dead-lettered request be admitted again."""
        settings = self.core.settings
        try:
            data, request = _read(entry.raw, max_bytes=settings.max_payload_bytes, key=self.core.verify_key(self.agent))
        except OrchestratorError:  # not a request it could have sent: nobody to tell
            return
        key = keys.response_key(self.core.prefix, self.agent, request.idempotency_key)
        if await self.core.redis.get(key) == scripts.IN_FLIGHT:
            await self.core.redis.delete(key)
        error = DeadLettered("the request was redelivered too often; see `dlq list`").to_dict()
        await self.core.notify(data, self.core.outcome(request, "error", {}, error=error).raw)
