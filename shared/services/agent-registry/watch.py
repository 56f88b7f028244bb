"""Change feed for ``GET /agents/watch``, fed by PostgreSQL LISTEN/NOTIFY.

A trigger on the table NOTIFYs every registration, status change and removal,
whichever replica made it. Each registry process holds one dedicated LISTEN
connection and fans the notifications out to its subscribers' queues. A lost
connection is re-established with backoff; what was notified meanwhile is missed,
so every subscriber is dropped when it is lost (its stream ends: the client lists
again and watches again), and :attr:`ChangeFeed.listening` is false until it is back.
A subscriber too slow to keep up is dropped too, rather than letting its queue grow
without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from shared.lib.connections import connect_postgres
from shared.lib.errors import StartupError
from shared.lib.registry_models import AgentChange

__all__ = ["CHANNEL", "ChangeFeed"]

_log = logging.getLogger(__name__)

#: The channel the table's trigger notifies (config/state/agent_registry.sql).
CHANNEL = "agent_registry_changes"

_QUEUE_SIZE = 1000
_ALIVE_CHECK_S = 2.0
_CLOSED = None


class ChangeFeed:
    """One LISTEN connection per process, fanned out to any number of subscribers."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._subscribers: set[asyncio.Queue[AgentChange | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._stopping = False

    async def start(self, *, timeout_s: float = 10.0) -> None:
        """Start listening; returns once the first LISTEN is in place."""
        self._task = asyncio.create_task(self._run(), name="registry-change-feed")
        listening = asyncio.create_task(self._listening.wait())
        await asyncio.wait({self._task, listening}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()  # raises what stopped the feed
        if not listening.done():
            listening.cancel()
            await self.stop()
            raise StartupError(f"could not LISTEN on {CHANNEL} within {timeout_s}s; is PostgreSQL reachable?")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in list(self._subscribers):
            self._close(queue)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[AgentChange | None]]:
        """A queue receiving every change from now on; ``None`` means the feed dropped it."""
        queue: asyncio.Queue[AgentChange | None] = asyncio.Queue(maxsize=_QUEUE_SIZE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    async def _run(self) -> None:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((OSError, asyncpg.PostgresError, asyncpg.InterfaceError, StartupError)),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
            reraise=True,
        ):
            with attempt:
                await self._listen_until_lost()

    @property
    def listening(self) -> bool:
        """Whether changes are followed right now (False while the LISTEN connection is re-made)."""
        return self._listening.is_set()

    async def _listen_until_lost(self) -> None:
        conn = await connect_postgres(self._url)
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
            self._listening.set()
            while not conn.is_closed():
                await asyncio.sleep(_ALIVE_CHECK_S)
                async with asyncio.timeout(_ALIVE_CHECK_S):
                    await conn.execute("SELECT 1")
        finally:
            self._lost()
            with contextlib.suppress(Exception):
                await conn.close(timeout=1.0)
        raise ConnectionError("LISTEN connection closed")

    def _lost(self) -> None:
        """End every stream: the changes notified until the connection is back are missed."""
        if self._listening.is_set() and not self._stopping:
            _log.warning("the registry's LISTEN connection was lost; ending %d watch streams", len(self._subscribers))
        self._listening.clear()
        for queue in list(self._subscribers):
            self._close(queue)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            change = AgentChange.model_validate_json(str(payload))
        except ValidationError:
            _log.warning("ignoring a malformed registry notification: %.200s", payload)
            return
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                _log.warning("a /agents/watch subscriber fell %d changes behind; closing its stream", _QUEUE_SIZE)
                self._close(queue)

    def _close(self, queue: asyncio.Queue[AgentChange | None]) -> None:
        self._subscribers.discard(queue)
        if queue.full():
            queue.get_nowait()  # make room for the end marker, so the stream wakes up and ends
        queue.put_nowait(_CLOSED)
