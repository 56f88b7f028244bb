"""What the requesting and the serving side of the bus share: connections, keys,
signing, the handler path (errors to responses) and the writes that finish or
dead-letter a request."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from shared.lib import _bus_scripts as scripts
from shared.lib import metrics
from shared.lib import redis_keys as keys
from shared.lib._bus_batch import Batcher
from shared.lib.agent_events import (
    AgentRequestEvent,
    AgentResponseEvent,
    error_to_payload,
    sign,
    signing_key_for,
    verify,
    window_skew_s,
)
from shared.lib.connections import run_command
from shared.lib.errors import (
    DeadlineExpired,
    InvalidInput,
    InvalidSignature,
    OrchestratorError,
    RequestRejected,
    Timeout,
)
from shared.lib.safe_input import check_text
from shared.lib.settings import Settings

__all__ = ["REQUEST_DIGEST", "Handler", "HandlerOutcome", "Slots", "_Core", "request_digest"]

_log = logging.getLogger("shared.lib.event_bus")

Handler = Callable[[AgentRequestEvent], Awaitable[dict[str, Any]]]
"""``async def handler(request) -> dict``: the success payload, or raise an OrchestratorError."""

#: The response's ``metadata`` entry naming the request it answers (:func:`request_digest`):
#: a stored response is returned to a repeat of its idempotency key only when it matches.
REQUEST_DIGEST = "request_digest"


def request_digest(request: AgentRequestEvent) -> str | None:
    """What makes two requests under one idempotency key the same request: a digest of their
    source agent, request type and payload (keys sorted); not their ids, times, priority or
    metadata, which a retry may change. None for a payload orjson cannot write."""
    try:
        body = orjson.dumps([request.source_agent, request.request_type, request.payload], option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    return hashlib.blake2b(body, digest_size=16).hexdigest()


@dataclass(frozen=True)
class HandlerOutcome:
    """A signed response: its JSON object and wire bytes (the model is built only on demand)."""

    data: dict[str, Any]
    raw: bytes

    @property
    def response(self) -> AgentResponseEvent:
        return AgentResponseEvent.model_validate(self.data)


def _status_for(exc: OrchestratorError) -> str:
    if isinstance(exc, RequestRejected):
        return "rejected"
    if isinstance(exc, DeadlineExpired | Timeout):
        return "timeout"
    return "error"


class Slots:
    """How many requests to one agent this process runs at once, off the stream and over HTTP
    together (``concurrency`` of ``EventBus.serve``, else ``AO_AGENT_CONCURRENCY``): a stream
    entry waits for a slot (:meth:`take`); an HTTP request takes one only if one is free
    (:meth:`try_take`) and is otherwise answered ``busy``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.taken = 0
        self._semaphore = asyncio.Semaphore(size)
        self.freed = asyncio.Event()
        """Set when a slot is given back: a reader waiting for room clears it and waits."""

    @property
    def free(self) -> int:
        return self.size - self.taken

    async def take(self) -> None:
        await self._semaphore.acquire()
        self.taken += 1

    async def try_take(self) -> bool:
        """Take a free slot at once, or none: False when all are taken or waited for."""
        if self._semaphore.locked():
            return False
        await self._semaphore.acquire()  # not locked: returns at once, nothing can come between
        self.taken += 1
        return True

    def give(self) -> None:
        self.taken -= 1
        self._semaphore.release()
        self.freed.set()

    async def __aenter__(self) -> None:
        await self.take()

    async def __aexit__(self, *exc_info: object) -> None:
        self.give()


@dataclass(frozen=True)
class _Finish:
    request: AgentRequestEvent
    raw: bytes
    stream: str | None
    entry_id: Any


@dataclass
class _Core:
    """Per-bus state shared by :class:`EventBus` and its servers."""

    redis: aioredis.Redis
    settings: Settings
    instance_id: str
    admit: AsyncScript
    heartbeat: AsyncScript
    finish_script: AsyncScript
    in_flight: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    _keys: dict[str, bytes] = field(default_factory=dict)
    finisher: Batcher[_Finish, None] = field(init=False)
    _metric_children: dict[tuple[str, ...], tuple[Any, Any]] = field(default_factory=dict)
    _active_gauges: dict[str, Any] = field(default_factory=dict)
    _slots: dict[str, Slots] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.finisher = Batcher(self._flush_finishes)

    @classmethod
    def build(cls, redis: aioredis.Redis, settings: Settings, instance_id: str) -> _Core:
        return cls(
            redis=redis,
            settings=settings,
            instance_id=instance_id,
            admit=redis.register_script(scripts.ADMIT),
            heartbeat=redis.register_script(scripts.HEARTBEAT),
            finish_script=redis.register_script(scripts.FINISH),
        )

    async def run_script(self, script: AsyncScript, script_keys: list[Any], args: list[Any]) -> Any:
        """EVALSHA of one of the bus's scripts by :func:`run_command`; loaded first if the
        server does not know it (a restart, SCRIPT FLUSH)."""
        try:
            return await run_command(self.redis, "EVALSHA", script.sha, len(script_keys), *script_keys, *args)
        except NoScriptError:
            return await script(keys=script_keys, args=args)

    @property
    def prefix(self) -> str:
        return self.settings.redis_prefix

    def slots(self, agent: str, *, size: int) -> Slots:
        """The :class:`Slots` of ``agent`` in this process, made with ``size`` by the first to ask."""
        slots = self._slots.get(agent)
        if slots is None:
            slots = self._slots[agent] = Slots(size)
        return slots

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def key_for(self, agent: str) -> bytes:
        """The HMAC key of calls to ``agent`` (cached: it is on every hot path)."""
        key = self._keys.get(agent)
        if key is None:
            key = self._keys[agent] = signing_key_for(self.settings, agent)
        return key

    def verify_key(self, agent: str) -> bytes | None:
        """The key to verify with, or None in development mode (which still signs)."""
        return None if self.settings.dev_mode else self.key_for(agent)

    def signed_json(self, data: dict[str, Any], agent: str) -> bytes:
        data["signature"] = sign(data, self.key_for(agent))
        return orjson.dumps(data)

    def check_window(self, request: AgentRequestEvent, *, now: float) -> None:
        """Refuse envelopes made outside the replay window (replays, or badly skewed clocks).

        A replayed signature is a bad signature (``InvalidSignature``, 401): the HMAC proves
        who made the envelope, ``created_at`` under it proves when, and a stale one proves
        neither for this call (docs/EVENT_PROTOCOL.md, Errors)."""
        if window_skew_s(request.created_at, self.settings.replay_window_s, now=now) is not None:
            raise InvalidSignature(
                f"envelope created_at is outside the {self.settings.replay_window_s:.0f}s replay window "
                "(a replay, or a skewed clock); sign a fresh envelope with the current time",
                field="created_at",
            )

    async def run_handler(self, request: AgentRequestEvent, handler: Handler, *, agent: str) -> HandlerOutcome:
        """Run ``handler`` and turn its result or error into a signed response (never raises
        for handler errors: OrchestratorErrors name the problem, anything else is ``internal``)."""
        start = time.perf_counter()
        self.in_flight += 1
        active = self._active_gauges.get(agent)
        if active is None:
            active = self._active_gauges[agent] = metrics.AGENT_REQUESTS_ACTIVE.labels(agent)
        active.inc()
        try:
            check_text(request.payload, field="payload")  # HTTP and bus alike; ~0.7 µs (safe_input)
            payload = await handler(request)
            if not isinstance(payload, dict):
                raise InvalidInput("handler returned a non-object payload", field="payload")
            status, error = "success", None
        except OrchestratorError as e:
            payload, status, error = {}, _status_for(e), error_to_payload(e)
        finally:
            self.in_flight -= 1
            active.dec()
        elapsed = time.perf_counter() - start
        return self.outcome(request, status, payload, error=error, duration_s=elapsed)

    def outcome(
        self,
        request: AgentRequestEvent,
        status: str,
        payload: dict[str, Any],
        *,
        error: dict[str, Any] | None = None,
        duration_s: float = 0.0,
    ) -> HandlerOutcome:
        """Sign the response to ``request`` (naming it: :data:`REQUEST_DIGEST`) and record it in the metrics."""
        data = request.response_dict(
            status, payload, error=error, served_by=self.instance_id, duration_ms=duration_s * 1000
        )
        if (digest := request_digest(request)) is not None:
            data["metadata"][REQUEST_DIGEST] = digest  # a dict of its own (response_dict)
        raw = self.signed_json(data, request.target_agent)
        target = metrics.AGENT_NAME_LABELS(request.target_agent)
        labels = (
            metrics.AGENT_NAME_LABELS(request.source_agent),
            target,
            metrics.request_type_label(request.target_agent, request.request_type),
            status,
            error["code"] if error else "",  # the error hierarchy's codes: a bounded set
        )  # bounded: a caller's random names add no series (nor entries to this cache)
        children = self._metric_children.get(labels)
        if children is None:  # labels() takes a lock and builds a tuple: cache it per label set
            children = self._metric_children[labels] = (
                metrics.AGENT_REQUESTS.labels(*labels),
                metrics.AGENT_REQUEST_DURATION.labels(target),
            )
        children[0].inc()
        children[1].observe(duration_s)
        return HandlerOutcome(data=data, raw=raw)

    def cancel_notice(self, request: AgentRequestEvent) -> bytes:
        """The signed notice that cancels ``request`` at the instance running it."""
        data = {
            "request_id": request.request_id,
            "idempotency_key": request.idempotency_key,
            "deadline": request.deadline,
            "created_at": time.time(),
        }
        return self.signed_json(data, request.target_agent)

    def read_cancel_notice(self, raw: bytes, agent: str) -> tuple[str, float] | None:
        """The idempotency key a notice to ``agent`` cancels and until when to remember it
        (Unix time); None for a malformed, wrongly signed or stale one (logged)."""
        try:
            data = orjson.loads(raw)
            key, deadline, created_at = data["idempotency_key"], float(data["deadline"]), float(data["created_at"])
            verify_key = self.verify_key(agent)
            if verify_key is not None:
                verify(data, verify_key)
            if not isinstance(key, str) or window_skew_s(created_at, self.settings.replay_window_s) is not None:
                raise InvalidInput("a cancel notice needs an idempotency_key and a fresh created_at")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OrchestratorError) as e:
            _log.warning("ignored a cancel notice to %s: %s", agent, e)
            return None
        return key, deadline + keys.IN_FLIGHT_MARKER_MARGIN_MS / 1000

    async def finish(self, request: AgentRequestEvent, raw: bytes, *, stream: str | None, entry_id: Any) -> None:
        """Store the response under its idempotency key, push it to the requester and ack
        the stream entry, all in one MULTI: the ack never lands without the response.
        Finishes issued in the same loop iteration share one MULTI (see ``_bus_batch``)."""
        await self.finisher.submit(_Finish(request, raw, stream, entry_id))

    async def _flush_finishes(self, items: list[_Finish]) -> list[None]:
        by_agent: dict[str, list[_Finish]] = {}
        for item in items:
            by_agent.setdefault(item.request.target_agent, []).append(item)
        for agent, group in by_agent.items():  # one MULTI per agent: its keys share a hash slot
            await self._finish_group(agent, group)
        return [None] * len(items)

    async def _finish_group(self, agent: str, items: list[_Finish]) -> None:
        streams = [keys.request_stream(self.prefix, agent, band) for band in keys.BANDS]
        script_keys: list[Any] = list(streams)
        args: list[Any] = [self.settings.response_ttl_s, agent, len(streams)]
        for item in items:
            request = item.request
            script_keys.append(keys.response_key(self.prefix, agent, request.idempotency_key))
            channel = keys.reply_channel(self.prefix, request.reply_to) if request.reply_to else ""
            index = streams.index(item.stream) + 1 if item.stream is not None else 0
            args += [item.raw, channel, index, item.entry_id if item.stream is not None else ""]
        await self.run_script(self.finish_script, script_keys, args)

    async def dead_letter(
        self,
        agent: str,
        raw: bytes | None,
        *,
        reason: str,
        message: str,
        stream: str | None = None,
        entry_id: Any = None,
        deliveries: int = 1,
    ) -> None:
        """Move a request to the agent's dead-letter stream with its reason (and ack it)."""
        fields: dict[Any, Any] = {
            "e": raw or b"",
            "reason": reason,
            "message": message[:2000],
            "deliveries": deliveries,
            "dead_at": f"{time.time():.3f}",
            "stream": stream or "http",
            "entry_id": entry_id or "",
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            keys.dead_letter_stream(self.prefix, agent), fields, maxlen=self.settings.stream_maxlen, approximate=True
        )
        if stream is not None:
            pipe.xack(stream, agent, entry_id)
            pipe.xdel(stream, entry_id)
        await pipe.execute()
        metrics.AGENT_REQUESTS_DEAD_LETTERED.labels(reason).inc()
        self.count("dead_lettered")
        _log.warning("dead-lettered a request to %s: %s (%s)", agent, reason, message)

    async def notify(self, request_data: dict[str, Any], raw: bytes) -> None:
        """Push a response that is not stored (expired, dead-lettered) so the caller learns at once."""
        reply_to = request_data.get("reply_to")
        if isinstance(reply_to, str) and reply_to:
            await self.redis.publish(keys.reply_channel(self.prefix, reply_to), raw)
