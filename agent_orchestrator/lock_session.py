"""The runner's lock session: one dedicated PostgreSQL connection that holds the advisory locks
of the runs a replica runs and hears the runs' NOTIFYs.

The locks live and die with the session. When the connection is lost (the server restarted or
crashed, the network dropped it) every lock it held is gone at once: ``on_lost`` is called, so
the runner stops the runs it no longer owns, and the session reconnects in the background,
retrying with backoff for as long as it takes. ``on_back`` is called once it is back. Meanwhile
:meth:`LockSession.conn` raises :class:`~shared.lib.errors.ServiceUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from shared.lib.connections import connect_postgres
from shared.lib.errors import ServiceUnavailable

__all__ = ["LockSession"]

_log = logging.getLogger(__name__)

Listener = Callable[[Any, int, str, str], None]
"""An asyncpg NOTIFY listener: ``(connection, pid, channel, payload)``."""


class LockSession:
    """A dedicated connection that comes back by itself when it is lost."""

    def __init__(
        self,
        url: str,
        *,
        listeners: dict[str, Listener],
        on_lost: Callable[[], None],
        on_back: Callable[[], None],
        retry_max_s: float = 2.0,
    ) -> None:
        self.url = url
        self.mutex = asyncio.Lock()
        """Held around each use: one statement at a time on the session."""
        self._listeners = listeners
        self._on_lost = on_lost
        self._on_back = on_back
        self._retry_max_s = retry_max_s
        self._conn: asyncpg.Connection | None = None
        self._closing = False
        self._reconnecting: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect the first time; a failure here is a start-up failure (:class:`StartupError`)."""
        self._conn = await self._connect()

    @property
    def up(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    def conn(self) -> asyncpg.Connection:
        """The live connection; :class:`ServiceUnavailable` while it is being restored."""
        if self._conn is None or self._conn.is_closed():
            raise ServiceUnavailable("the runner's lock session is reconnecting to PostgreSQL")
        return self._conn

    async def close(self) -> None:
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), timeout=2)

    async def _connect(self) -> asyncpg.Connection:
        conn = await connect_postgres(self.url)
        try:
            for channel, listener in self._listeners.items():
                await conn.add_listener(channel, listener)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._terminated)
        return conn

    def _terminated(self, conn: asyncpg.Connection) -> None:
        """asyncpg's termination listener: called when the connection closes, for any reason."""
        if self._closing or conn is not self._conn:
            return
        self._conn = None
        _log.warning("the lock session to PostgreSQL was lost, and the advisory locks with it; reconnecting")
        self._on_lost()
        self._reconnecting = asyncio.create_task(self._reconnect(), name="runner-lock-session")

    async def _reconnect(self) -> None:
        retrying = AsyncRetrying(  # until it is back, whatever the failure: the replica needs it
            wait=wait_exponential_jitter(multiplier=0.1, max=self._retry_max_s),
            retry=retry_if_exception_type(Exception),
            before_sleep=_log_retry,
        )
        conn: asyncpg.Connection = await retrying(self._connect)
        if self._closing:
            conn.terminate()
            return
        self._conn = conn
        _log.info("the lock session to PostgreSQL is back")
        self._on_back()


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    _log.debug("lock session: reconnecting failed (attempt %d): %r", state.attempt_number, error)
