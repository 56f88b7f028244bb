"""Resource locks: leases over PostgreSQL session-level advisory locks.

A lease is a session-level advisory lock held on a *dedicated* connection that
stays checked out for the whole lease. Never a pooled one: it goes back to other
callers between queries (and asyncpg's default reset, which the project's pools
skip, runs ``pg_advisory_unlock_all()``). Because the lock lives in the
session, a holder whose process dies loses it at once (its backend exits).

A grant takes the lock and bumps the resource's fencing token in the same
transaction, and records the grant. The common case is one plain statement
(``_FAST_GRANT_SQL``), one round trip; first grants, contention and abandoned
leases take a second, to ``resource_lock_grant`` or ``resource_lock_want`` in
``config/state``. A
lease past its TTL is expired by the session that holds it (this process's
sweep) or, when that session is stuck, by terminating it; no session ever
unlocks a lock it does not hold. Every write a lease makes is fenced by its
token, so a stale holder's ``renew()`` or ``release()`` raises
:class:`~shared.lib.errors.LockLost` and frees nothing.

Waiters hold no connection while they sleep: one LISTEN session per manager
wakes them when a release is notified, with a bounded backoff as the fallback
(a holder that died sends no notification).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

import asyncpg

from shared.lib import metrics
from shared.lib.connections import connect_postgres
from shared.lib.errors import (
    Conflict,
    InvalidInput,
    LockContended,
    LockLost,
    NotFound,
    OrchestratorError,
    ServiceUnavailable,
    StartupError,
)
from shared.lib.settings import Settings
from shared.lib.tasks import cancel_and_wait
from shared.lib.wakeups import Wakeups

__all__ = ["Emit", "Lease", "LockInfo", "ResourceLockManager", "lock_key", "resource_type"]

_log = logging.getLogger(__name__)

#: NOTIFY channel of releases and expiries (payload: the resource id).
_CHANNEL = "resource_lock_released"
#: Lock sessions show up under this name in pg_stat_activity.
_APP_NAME = "ao-resource-lock"
#: A grant is one short transaction; losing its commit to a crash is covered by the
#: fence epoch (see resource_locks.sql), so it need not wait for the WAL flush.
_SESSION_SETTINGS = {"application_name": _APP_NAME, "synchronous_commit": "off"}
#: Longest a lock statement may run: a grant can wait up to 2 s for an expired holder to end.
_STATEMENT_TIMEOUT_S = 10.0
#: How long an acquire may wait for a free lock session when all are in use.
_SESSION_WAIT_S = 5.0
_FIRST_BACKOFF_S = 0.01
_EMIT_TIMEOUT_S = 5.0
_MAX_RESOURCE_ID = 512  # NOTIFY payloads are limited to 8000 bytes
_MAX_OWNER = 200
_MAX_TTL_S = 7 * 24 * 3600.0
_MAX_WAIT_S = 24 * 3600.0
_TYPE_RE = re.compile(r"^[a-z0-9_.-]{1,32}$")
_CONNECTION_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)

#: The uncontended grant in one plain statement: take the lock and, when the row is free and
#: its fence from this server start, bump the token and record the grant. ``token`` is NULL
#: otherwise: ``granted`` false when another session holds the lock; true when the row needs
#: ``resource_lock_grant`` (first grant, first after a server start, abandoned lease), and
#: then the lock has been handed back for that function to take.
_FAST_GRANT_SQL = """
WITH l AS MATERIALIZED (SELECT pg_try_advisory_lock($2) AS got),
g AS (
    UPDATE resource_locks r
       SET fence = r.fence + 1, owner = $3, backend_pid = pg_backend_pid(), acquired_at = clock_timestamp(),
           expires_at = clock_timestamp() + $4 * interval '1 second', ttl_s = $4, updated_at = clock_timestamp()
      FROM l
     WHERE l.got AND r.resource_id = $1 AND r.owner IS NULL AND r.fence_epoch = pg_postmaster_start_time()
    RETURNING r.fence, r.expires_at, r.acquired_at
),
h AS (
    INSERT INTO resource_lock_history (resource_id, token, owner, event, wait_s)
    SELECT $1, g.fence, $3, 'granted', $5 FROM g
)
SELECT l.got AS granted, g.fence AS token, $3 AS holder, g.expires_at, g.acquired_at AS db_now,
       CASE WHEN l.got AND g.fence IS NULL THEN pg_advisory_unlock($2) END AS handed_back
  FROM l LEFT JOIN g ON true
"""
#: A grant the fast statement could not complete (resource_locks.sql). Both functions return
#: (granted, token, holder, expires_at, db_now).
_GRANT_SQL = "SELECT * FROM resource_lock_grant($1, $2, $3, $4, $5)"
#: A lock another session holds: ask to be notified of its release, then try (fast_path.sql).
_WANT_SQL = "SELECT * FROM resource_lock_want($1, $2, $3, $4, $5)"
#: Release (or expire) the caller's own lease in one statement: a row only when it was still
#: ours. Waiters are notified only when one asked for the lock during the lease, or when the
#: lease ended other than by release.
_FAST_RELEASE_SQL = """
WITH r AS (
    UPDATE resource_locks
       SET owner = NULL, backend_pid = NULL, expires_at = NULL, ttl_s = NULL, updated_at = clock_timestamp()
     WHERE resource_id = $1 AND fence = $3 AND backend_pid = pg_backend_pid() AND owner IS NOT NULL
    RETURNING acquired_at, wanted_at >= acquired_at AS wanted
),
h AS (
    INSERT INTO resource_lock_history (resource_id, token, owner, event, held_s, reason)
    SELECT $1, $3, $4, $5, extract(epoch FROM clock_timestamp() - r.acquired_at), $6 FROM r
)
SELECT pg_advisory_unlock($2),
       CASE WHEN r.wanted OR $5 <> 'released' THEN pg_notify('resource_lock_released', $1) END
  FROM r
"""
_RENEW_SQL = "SELECT resource_lock_renew($1, $2, $3, $4)"


class Emit(Protocol):
    """The shape of ``EventBus.emit``: record and publish one event."""

    def __call__(
        self,
        event_type: str,
        data: dict[str, Any],
        *,
        aggregate_type: str | None = None,
        aggregate_id: str | None = None,
    ) -> Awaitable[Any]: ...


@functools.lru_cache(maxsize=4096)
def lock_key(resource_id: str) -> int:
    """The 64-bit advisory-lock key of a resource: the first 8 bytes of its SHA-256, signed.

    ``hashtext`` is 32-bit: two of ~77,000 resources share a key with even odds.
    With 64 bits that takes ~5 billion, and the table refuses a collision anyway.
    """
    return int.from_bytes(hashlib.sha256(resource_id.encode()).digest()[:8], "big", signed=True)


@functools.lru_cache(maxsize=4096)
def resource_type(resource_id: str) -> str:
    """The metrics label of a resource: its id's prefix before the first ``:``.

    Ids without a prefix, or with one that is not a short lowercase word, map to
    ``untyped`` / ``other``, and so do new prefixes past the first few
    (``metrics.RESOURCE_TYPE_LABELS``), so the label's cardinality stays bounded.
    """
    prefix, sep, _ = resource_id.partition(":")
    if not sep:
        return "untyped"
    return metrics.RESOURCE_TYPE_LABELS(prefix) if _TYPE_RE.match(prefix) else metrics.OVERFLOW_LABEL


@dataclass(frozen=True)
class LockInfo:
    """A lease as operators see it. ``state``: held, expired (TTL passed, holder not yet
    ended) or abandoned (the holder's session ended without releasing)."""

    resource_id: str
    owner: str
    token: int
    acquired_at: datetime
    expires_at: datetime
    state: str
    backend_pid: int | None


def _validate(resource_id: str, owner: str, ttl_s: float, wait_s: float) -> None:
    _check_resource_id(resource_id)
    if not isinstance(owner, str) or not 0 < len(owner) <= _MAX_OWNER:
        raise InvalidInput(f"owner must be a non-empty string of at most {_MAX_OWNER} characters", field="owner")
    if not (isinstance(ttl_s, int | float) and 0 < ttl_s <= _MAX_TTL_S):
        raise InvalidInput(f"ttl_s must be a number of seconds in (0, {_MAX_TTL_S:.0f}]", field="ttl_s")
    if not (isinstance(wait_s, int | float) and 0 <= wait_s <= _MAX_WAIT_S):
        raise InvalidInput(f"wait_s must be a number of seconds in [0, {_MAX_WAIT_S:.0f}]", field="wait_s")


def _check_resource_id(resource_id: str) -> None:
    if not isinstance(resource_id, str) or not 0 < len(resource_id) <= _MAX_RESOURCE_ID or "\x00" in resource_id:
        raise InvalidInput(
            f"resource_id must be a non-empty string of at most {_MAX_RESOURCE_ID} characters, e.g. 'repo:acme/api'",
            field="resource_id",
        )


class _LockSessions:
    """Dedicated connections for leases, kept apart from the asyncpg pool.

    A few idle ones are kept open so a grant costs one round trip, not a connect.
    ``discard`` terminates a connection whose state is unknown: closing the
    session frees any lock it might hold.
    """

    def __init__(self, dsn: str, *, max_size: int, max_idle: int, demand: Callable[[], int]) -> None:
        self._dsn = dsn
        self._max_size = max_size
        self._max_idle = max_idle
        self._demand = demand  # one extra idle session per resource being waited for
        self._slots = asyncio.Semaphore(max_size)
        self._idle: list[asyncpg.Connection] = []

    async def take(self, *, timeout_s: float) -> asyncpg.Connection:
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout_s)
            except TimeoutError as e:
                raise ServiceUnavailable(
                    f"all {self._max_size} lock sessions of this process are in use; "
                    "release leases sooner or raise AO_LOCK_MAX_CONNECTIONS"
                ) from e
        else:
            await self._slots.acquire()
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
        try:
            return await connect_postgres(
                self._dsn, server_settings=_SESSION_SETTINGS, command_timeout=_STATEMENT_TIMEOUT_S
            )
        except BaseException:
            self._slots.release()
            raise

    def give_back(self, conn: asyncpg.Connection) -> None:
        # Closing and reopening sessions under contention cut 64-task throughput from ~1,350 to
        # ~160 grants/s (support/bench/locks.py): keep one more per contended resource, not per waiter.
        limit = self._max_idle + self._demand()
        if len(self._idle) < limit and not conn.is_closed() and not conn.is_in_transaction():
            self._idle.append(conn)
        else:
            conn.terminate()
        self._slots.release()

    def discard(self, conn: asyncpg.Connection) -> None:
        conn.terminate()
        self._slots.release()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(*_CONNECTION_ERRORS, TimeoutError):
                await conn.close(timeout=2.0)


class _ReleaseListener:
    """One LISTEN session per manager; wakes this process's waiters on a release.

    If the session is lost, waiters keep going on their backoff and the
    manager's sweep reconnects it.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self.wakeups = Wakeups()  # by resource id

    async def ensure(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            return
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return
            try:
                conn = await connect_postgres(self._dsn, server_settings={"application_name": f"{_APP_NAME}-listen"})
                await conn.add_listener(_CHANNEL, self._on_notify)
            except (OrchestratorError, *_CONNECTION_ERRORS, asyncpg.PostgresError) as e:
                _log.warning("lock release listener unavailable, waiters poll instead: %s", e)
                return
            conn.add_termination_listener(self._on_lost)
            self._conn = conn

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.wakeups.wake(payload)

    def _on_lost(self, _conn: object) -> None:
        self._conn = None
        self.wakeups.wake_all()

    def waiting(self) -> int:
        """How many resources this process's acquirers are waiting for right now."""
        return len(self.wakeups)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(*_CONNECTION_ERRORS, TimeoutError):
                await conn.close(timeout=2.0)


class Lease:
    """A granted lock on one resource, held on its own database session.

    ``token`` is the fencing token: pass it with every write to the resource so
    the resource can refuse a stale holder's writes. ``held`` turns false once
    the lease is released, expired or force-released.
    """

    def __init__(
        self,
        manager: ResourceLockManager,
        conn: asyncpg.Connection,
        *,
        resource_id: str,
        owner: str,
        token: int,
        expires_at: datetime,
        ttl_s: float,
        deadline: float,
        waited_s: float,
    ) -> None:
        self.resource_id = resource_id
        self.owner = owner
        self.token = token
        self.expires_at = expires_at
        self.ttl_s = ttl_s
        self.waited_s = waited_s
        self.acquired_monotonic = time.monotonic()
        self._manager = manager
        self._conn = conn
        self._key = lock_key(resource_id)
        self._deadline = deadline
        self._state = "held"
        self._op_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Lease({self.resource_id!r}, owner={self.owner!r}, token={self.token}, state={self._state})"

    @property
    def held(self) -> bool:
        """True while the lease is ours: not released, expired, force-released or disconnected."""
        return self._state == "held" and not self._conn.is_closed()

    async def renew(self, *, ttl_s: float | None = None) -> datetime:
        """Extend the lease by ``ttl_s`` (default: its TTL) from now; LockLost if it is no longer ours."""
        return await asyncio.shield(self._manager._renew(self, self.ttl_s if ttl_s is None else ttl_s))

    async def release(self) -> None:
        """Free the lock. A second call does nothing; LockLost if it expired or was taken away.

        Cancelled midway, it still frees the lock: the lease's session is closed.
        """
        await self._manager._release(self)


class _Acquisition:
    """``async with locks.acquire(...) as lease``: releases on exit, even on error."""

    def __init__(self, manager: ResourceLockManager, resource_id: str, kwargs: dict[str, Any]) -> None:
        self._manager = manager
        self._resource_id = resource_id
        self._kwargs = kwargs
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._manager.acquire_lease(self._resource_id, **self._kwargs)
        return self._lease

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._lease is not None
        try:
            await self._lease.release()
        except LockLost:
            if exc_type is None:
                raise  # the body finished, but not under the lock: the caller must know
            _log.warning("lease on %s was lost before the failing block ended", self._resource_id)


class ResourceLockManager:
    """Leases on named resources (``repo:acme/api``, ``env:staging``) for one process.

    ``pool`` serves reads and operator actions; leases use dedicated sessions to
    ``dsn`` (default: ``settings.database_url``). ``emit`` (``EventBus.emit``)
    receives ``resource.locked`` / ``resource.unlocked``. Use ``async with`` or
    call :meth:`start` / :meth:`close`.
    """

    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, *, dsn: str | None = None, emit: Emit | None = None
    ) -> None:
        url = dsn or settings.database_url
        if not url:
            raise StartupError("ResourceLockManager needs a PostgreSQL URL: pass dsn= or set DATABASE_URL")
        self._pool = pool
        self._emit = emit
        self._default_ttl_s = settings.lock_ttl_s
        self._poll_max_s = settings.lock_poll_max_s
        self._sweep_interval_s = settings.lock_sweep_interval_s
        self._listener = _ReleaseListener(url)
        self._sessions = _LockSessions(
            url,
            max_size=settings.lock_max_connections,
            max_idle=settings.lock_idle_connections,
            demand=self._listener.waiting,
        )
        self._leases: set[Lease] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> ResourceLockManager:
        """Open the release listener and start the sweep that expires overdue leases."""
        await self._listener.ensure()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="resource-lock-sweep")
        return self

    async def close(self) -> None:
        """Release every lease this manager still holds, then close its sessions."""
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        for lease in list(self._leases):
            with contextlib.suppress(LockLost):
                await lease.release()
        await self._listener.close()
        await self._sessions.close()

    async def __aenter__(self) -> ResourceLockManager:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # -- acquiring -----------------------------------------------------------------
    def acquire(self, resource_id: str, *, owner: str, ttl_s: float | None = None, wait_s: float = 0.0) -> _Acquisition:
        """``async with locks.acquire(rid, owner=..., ttl_s=..., wait_s=...) as lease:``."""
        return _Acquisition(self, resource_id, {"owner": owner, "ttl_s": ttl_s, "wait_s": wait_s})

    async def acquire_lease(
        self, resource_id: str, *, owner: str, ttl_s: float | None = None, wait_s: float = 0.0
    ) -> Lease:
        """Take the lock, waiting up to ``wait_s`` for it; the caller must ``release()`` the lease.

        ``wait_s=0`` fails at once with LockContended naming the holder, its token
        and when its lease ends. For longer leases, ``renew()`` within ``ttl_s``.
        """
        ttl = self._default_ttl_s if ttl_s is None else ttl_s
        _validate(resource_id, owner, ttl, wait_s)
        started = time.monotonic()
        lease, row = await self._attempt(resource_id, owner, ttl, started)
        if lease is not None:
            return lease
        rtype = resource_type(resource_id)
        metrics.RESOURCE_LOCK_CONTENTIONS.labels(rtype).inc()
        if wait_s <= 0:
            metrics.RESOURCE_LOCK_ACQUISITIONS.labels(rtype, "contended").inc()
            raise _contended(resource_id, row, waited_s=0.0)
        return await self._wait(resource_id, owner, ttl, started, started + wait_s)

    async def _wait(self, resource_id: str, owner: str, ttl: float, started: float, deadline: float) -> Lease:
        await self._listener.ensure()
        backoff = _FIRST_BACKOFF_S
        with self._listener.wakeups.waiting(resource_id) as event:
            while True:
                event.clear()
                lease, row = await self._attempt(resource_id, owner, ttl, started)
                if lease is not None:
                    return lease
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    metrics.RESOURCE_LOCK_ACQUISITIONS.labels(resource_type(resource_id), "timeout").inc()
                    raise _contended(resource_id, row, waited_s=time.monotonic() - started)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(backoff, remaining, _until_expiry(row)))
                backoff = min(backoff * 2, self._poll_max_s)

    async def _attempt(
        self, resource_id: str, owner: str, ttl: float, started: float
    ) -> tuple[Lease | None, asyncpg.Record]:
        """One grant round trip on a lock session; the session stays with the lease if granted."""
        for retry in (False, True):
            conn = await self._sessions.take(timeout_s=_SESSION_WAIT_S)
            sent = time.monotonic()
            try:
                row = await _grant(conn, resource_id, owner, ttl, sent - started)
            except _CONNECTION_ERRORS as e:
                self._sessions.discard(conn)  # e.g. an idle session the server closed
                if retry:
                    raise ServiceUnavailable(f"lock session lost while acquiring {resource_id}: {e}") from e
                continue
            except asyncpg.UniqueViolationError as e:
                self._sessions.discard(conn)
                raise Conflict(str(e), resource=resource_id) from e
            except BaseException:
                self._sessions.discard(conn)  # cancelled mid-grant: closing the session frees the lock
                raise
            if not row["granted"]:
                self._sessions.give_back(conn)
                return None, row
            return await self._granted(conn, resource_id, owner, ttl, row, started, sent), row
        raise AssertionError("unreachable")

    async def _granted(
        self,
        conn: asyncpg.Connection,
        resource_id: str,
        owner: str,
        ttl: float,
        row: asyncpg.Record,
        started: float,
        sent: float,
    ) -> Lease:
        waited = sent - started
        lease = Lease(
            self,
            conn,
            resource_id=resource_id,
            owner=owner,
            token=row["token"],
            expires_at=row["expires_at"],
            ttl_s=ttl,
            deadline=sent + ttl,
            waited_s=waited,
        )
        self._leases.add(lease)
        granted, wait, active = _grant_metrics(resource_type(resource_id))
        granted.inc()
        wait.observe(waited)
        active.inc()
        if self._emit is not None:
            await self._send(
                "resource.locked",
                resource_id,
                {"owner": owner, "token": lease.token, "expires_at": lease.expires_at.isoformat(), "wait_s": waited},
            )
        return lease

    # -- a lease's own operations ------------------------------------------------------
    async def _renew(self, lease: Lease, ttl_s: float) -> datetime:
        if not (isinstance(ttl_s, int | float) and 0 < ttl_s <= _MAX_TTL_S):
            raise InvalidInput(f"ttl_s must be a number of seconds in (0, {_MAX_TTL_S:.0f}]", field="ttl_s")
        async with lease._op_lock:
            _require_held(lease)
            sent = time.monotonic()
            try:
                expires = await lease._conn.fetchval(_RENEW_SQL, lease.resource_id, lease._key, lease.token, ttl_s)
            except _CONNECTION_ERRORS as e:
                self._lose(lease)
                raise _lost(lease, "its session ended (force-released or expired)") from e
            if expires is None:
                self._lose(lease, expired=True)
                raise _lost(lease, "its TTL passed before the renewal")
            lease.expires_at, lease.ttl_s, lease._deadline = expires, ttl_s, sent + ttl_s
            return expires  # type: ignore[no-any-return]

    async def _release(self, lease: Lease) -> None:
        if lease._state == "released":
            return
        if not await self._end(lease, event="released", reason=None):
            raise _lost(lease, "it expired or was force-released before the release")

    async def _end(self, lease: Lease, *, event: str, reason: str | None) -> bool:
        """Release (or expire) the lease on its own session; False if it was no longer ours."""
        async with lease._op_lock:
            if lease._state != "held":
                return False
            try:
                held_by = (lease.resource_id, lease._key, lease.token, lease.owner)
                ok = await lease._conn.fetchrow(_FAST_RELEASE_SQL, *held_by, event, reason) is not None
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError):
                ok = False
            except BaseException:
                self._lose(lease)  # cancelled mid-release: closing the session frees the lock
                raise
            if not ok:
                self._lose(lease)
                return False
            self._forget(lease, "released" if event == "released" else "lost")
            self._sessions.give_back(lease._conn)
        if self._emit is not None:
            held_s = time.monotonic() - lease.acquired_monotonic
            await self._send(
                "resource.unlocked",
                lease.resource_id,
                {"owner": lease.owner, "token": lease.token, "reason": event, "held_s": held_s},
            )
        return True

    def _forget(self, lease: Lease, state: str) -> None:
        if lease._state == "held":
            _grant_metrics(resource_type(lease.resource_id))[2].dec()
        lease._state = state
        self._leases.discard(lease)

    def _lose(self, lease: Lease, *, expired: bool = False) -> None:
        """The lease is not ours any more; drop its session (which frees anything it still holds)."""
        if lease._state != "held":
            return
        self._forget(lease, "lost")
        self._sessions.discard(lease._conn)
        if expired:
            metrics.RESOURCE_LOCK_EXPIRATIONS.inc()

    async def _send(self, event_type: str, resource_id: str, data: dict[str, Any]) -> None:
        """Emit an event; a failing bus is logged and never fails the lock operation."""
        assert self._emit is not None
        try:
            await asyncio.wait_for(
                self._emit(
                    event_type,
                    {"resource_id": resource_id, **data},
                    aggregate_type="resource",
                    aggregate_id=resource_id,
                ),
                _EMIT_TIMEOUT_S,
            )
        except Exception as e:  # noqa: BLE001 - the lock is granted/released either way; log and carry on
            _log.warning("could not emit %s for %s: %s", event_type, resource_id, e)

    # -- inspection and operators -------------------------------------------------------
    async def is_locked(self, resource_id: str) -> bool:
        """Whether some session holds the lock right now (the advisory lock is the truth)."""
        _check_resource_id(resource_id)
        async with self._pool.acquire() as conn:
            pid = await conn.fetchval("SELECT resource_lock_holder_pid($1)", lock_key(resource_id))
        return pid is not None

    async def holder(self, resource_id: str) -> LockInfo | None:
        """The live lease on the resource (state held or expired), or None when it is free."""
        _check_resource_id(resource_id)
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM resource_lock_status WHERE resource_id = $1", resource_id)
        if row is None or row["state"] == "abandoned":
            return None
        return _info(row)

    async def list_locks(self) -> list[LockInfo]:
        """Every lease the table knows of that has not ended, by resource id."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM resource_lock_status ORDER BY resource_id")
        return [_info(r) for r in rows]

    async def history(self, resource_id: str, *, limit: int = 50) -> list[dict[str, Any]]:
        """The latest ``limit`` events of a resource, newest first."""
        _check_resource_id(resource_id)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT token, owner, event, wait_s, held_s, reason, at FROM resource_lock_history "
                "WHERE resource_id = $1 ORDER BY id DESC LIMIT $2",
                resource_id,
                limit,
            )
        return [dict(r) for r in rows]

    async def force_release(self, resource_id: str, reason: str) -> LockInfo:
        """For operators: end the lease whoever holds it, by ending the holder's session."""
        _check_resource_id(resource_id)
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidInput("reason is required: say why the lock is being taken away", field="reason")
        info = await self.holder(resource_id)
        async with self._pool.acquire() as conn:
            try:
                row = await conn.fetchrow("SELECT * FROM resource_lock_force_release($1, $2)", resource_id, reason)
            except asyncpg.LockNotAvailableError as e:
                raise Conflict(str(e), resource=resource_id) from e
        if row is None or row["owner"] is None:
            raise NotFound(f"{resource_id} is not locked; nothing to release", resource=resource_id)
        if self._emit is not None:
            await self._send(
                "resource.unlocked",
                resource_id,
                {"owner": row["owner"], "token": row["token"], "reason": "force_released", "detail": reason},
            )
        if info is not None and info.token == row["token"]:
            return info
        return LockInfo(resource_id, row["owner"], row["token"], row["acquired_at"], row["expires_at"], "held", None)

    async def expire_overdue(self, *, grace_s: float = 0.0) -> int:
        """Expire every lease (any process's) whose TTL passed ``grace_s`` ago; returns how many."""
        async with self._pool.acquire() as conn:
            count: int = await conn.fetchval("SELECT resource_lock_expire_overdue($1)", grace_s)
        if count:
            metrics.RESOURCE_LOCK_EXPIRATIONS.inc(count)
        return count

    # -- the sweep -----------------------------------------------------------------------
    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                await self._sweep_once()
            except Exception as e:  # noqa: BLE001 - the sweep must outlive a database hiccup; log and carry on
                _log.warning("lock sweep failed: %s", e)

    async def _sweep_once(self) -> None:
        """Expire this process's overdue leases on their own sessions, then anyone's after a grace."""
        await self._listener.ensure()
        now = time.monotonic()
        for lease in [le for le in self._leases if le._deadline <= now]:
            if await self._end(lease, event="expired", reason=f"ttl of {lease.ttl_s}s passed without renewal"):
                metrics.RESOURCE_LOCK_EXPIRATIONS.inc()
                _log.warning("lease on %s by %s expired (token %d)", lease.resource_id, lease.owner, lease.token)
        await self.expire_overdue(grace_s=self._sweep_interval_s)


async def _grant(conn: asyncpg.Connection, resource_id: str, owner: str, ttl: float, waited: float) -> asyncpg.Record:
    """Try the one-statement grant; a held lock or a row it cannot handle takes one more round trip."""
    args = (resource_id, lock_key(resource_id), owner, ttl, waited)
    row = await conn.fetchrow(_FAST_GRANT_SQL, *args)
    if row["token"] is not None:
        return row
    return await conn.fetchrow(_GRANT_SQL if row["granted"] else _WANT_SQL, *args)


@functools.lru_cache(maxsize=256)  # resource types are few: labels() on every grant costs more than the lock
def _grant_metrics(rtype: str) -> tuple[Any, Any, Any]:
    """(granted counter, wait histogram, active gauge) of one resource type."""
    return (
        metrics.RESOURCE_LOCK_ACQUISITIONS.labels(rtype, "granted"),
        metrics.RESOURCE_LOCK_WAIT.labels(rtype),
        metrics.RESOURCE_LOCKS_ACTIVE.labels(rtype),
    )


def _require_held(lease: Lease) -> None:
    if lease._state != "held":
        raise _lost(lease, f"it was already {lease._state}")


def _lost(lease: Lease, why: str) -> LockLost:
    return LockLost(
        f"the lease on {lease.resource_id} (token {lease.token}) is no longer held: {why}; "
        "stop using the resource and acquire it again",
        resource=lease.resource_id,
        details={"token": lease.token, "owner": lease.owner},
    )


def _contended(resource_id: str, row: asyncpg.Record, *, waited_s: float) -> LockContended:
    holder, expires = row["holder"], row["expires_at"]
    until = expires.isoformat() if expires is not None else None
    waited = f" after waiting {waited_s:.1f}s" if waited_s > 0 else ""
    return LockContended(
        f"{resource_id} is locked by {holder or 'another session'} until {until or 'its release'}{waited}; "
        "retry later or pass wait_s",
        resource=resource_id,
        details={"holder": holder, "expires_at": until, "token": row["token"]},
    )


def _until_expiry(row: asyncpg.Record) -> float:
    """Seconds until the holder's lease ends by the database's clock (then an acquire can expire it)."""
    expires, now = row["expires_at"], row["db_now"]
    if expires is None or now is None:
        return math.inf
    left = (expires - now).total_seconds()
    return left + 0.005 if left > 0 else math.inf  # already overdue: the backoff paces the retries


def _info(row: asyncpg.Record) -> LockInfo:
    return LockInfo(
        resource_id=row["resource_id"],
        owner=row["owner"],
        token=row["token"],
        acquired_at=row["acquired_at"],
        expires_at=row["expires_at"],
        state=row["state"],
        backend_pid=row["holder_pid"],
    )
