"""Connections to PostgreSQL (asyncpg) and Redis (redis-py asyncio).

Pools and clients are created once per process, in a lifespan or a CLI runner,
and closed there. Connection failures become one-line :class:`StartupError`
messages that name the server and the reason, with the password redacted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import psycopg
import redis.asyncio as aioredis
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.lib.errors import StartupError

__all__ = [
    "CONNECTION_FAILURES",
    "Along",
    "connect_postgres",
    "connect_redis",
    "connection_lost",
    "create_database",
    "create_pg_pool",
    "drop_database",
    "redact_url",
    "run_command",
    "run_commands",
    "with_ctes",
    "with_database",
]

_CONNECT_TIMEOUT_S = 5.0

Along = Callable[[int], tuple[str, list[Any]]]
"""A data-modifying statement and its parameters, numbered from the ``int`` it is given, to
go as a CTE in another statement: both are written, or neither."""


def with_ctes(name: str, along: Sequence[Along], args: Sequence[Any]) -> tuple[list[str], list[Any]]:
    """``along`` as CTEs ``<name>0``, ``<name>1``..., numbering their parameters after ``args``:
    the CTE clauses, and ``args`` followed by theirs."""
    ctes, all_args = [], list(args)
    for i, statement in enumerate(along):
        sql, more = statement(len(all_args) + 1)
        ctes.append(f"{name}{i} AS ({sql})")
        all_args += more
    return ctes, all_args


#: What PostgreSQL or Redis raise when they cannot serve right now (down, restarting, out of
#: connections, the connection lost), by client library. Not every ``OSError``: a missing file
#: is a node's own failure.
CONNECTION_FAILURES: tuple[type[Exception], ...] = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    psycopg.OperationalError,
    RedisConnectionError,
    RedisTimeoutError,
)


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, is a lost or
    refused connection to PostgreSQL or Redis: the servers' trouble, not the request's."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, CONNECTION_FAILURES):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database ``name`` (query string kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )


def _pg_error(url: str, exc: BaseException) -> StartupError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StartupError(f"cannot connect to PostgreSQL at {redact_url(url)}: {reason}")


async def connect_postgres(url: str, **kwargs: Any) -> asyncpg.Connection:
    """One dedicated connection (for locks held across a lease, migrations, admin work)."""
    try:
        conn = await asyncpg.connect(url, timeout=_CONNECT_TIMEOUT_S, **kwargs)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as e:
        raise _pg_error(url, e) from e
    await _init_connection(conn)
    return conn


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """No reset query on release: pooled connections never change session state."""


async def create_pg_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """An asyncpg pool with JSON codecs; fails fast with a StartupError if unreachable.

    Pooled connections never keep session state: leases, LISTEN and session settings use
    dedicated connections (:func:`connect_postgres`). So a release skips asyncpg's default
    reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``), which cost one
    round trip per query; an open transaction is still rolled back.
    """
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=_CONNECT_TIMEOUT_S,
            init=_init_connection,
            reset=_keep_session,
        )
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as e:
        raise _pg_error(url, e) from e
    assert pool is not None
    return pool


class _FastConnection:
    """redis-py's asyncio connection without two costs on every command.

    Commands are packed by hiredis (C), as redis-py's sync client does; its asyncio client
    packs in Python, which was the largest cost of a bus request (support/bench/messaging.py).
    The pool's check of an idle connection before each command looks at what the loop has
    already buffered. redis-py's own check reads with a zero timeout: the caller suspends
    and the read is cancelled, a loop turn and a cancellation on every command.
    """

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed

    async def can_read_destructive(self) -> bool:
        """True when the idle connection holds unread bytes or its peer closed it (the pool
        then reconnects it). A reply cut short is not one of these: redis-py drops a
        connection whose read failed or was cancelled."""
        reader = self._reader  # type: ignore[attr-defined]
        if reader is None:
            raise ConnectionError("the connection is closed")
        return bool(reader.at_eof() or not self._socket_is_empty())  # type: ignore[attr-defined]


_FAST_CLASSES: dict[type[Any], type[Any]] = {}


def _fast_connection(cls: type[Any]) -> type[Any]:
    """``cls`` (TCP, unix socket or TLS connection) as a :class:`_FastConnection`; one class per kind."""
    fast = _FAST_CLASSES.get(cls)
    if fast is None:
        fast = _FAST_CLASSES[cls] = type(cls.__name__, (_FastConnection, cls), {"__module__": __name__})
    return fast


async def connect_redis(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    """A redis-py asyncio client; pings once so a bad URL fails at start-up."""
    try:
        client = aioredis.Redis.from_url(
            url, max_connections=max_connections, socket_connect_timeout=_CONNECT_TIMEOUT_S, health_check_interval=30
        )
        pool = client.connection_pool
        pool.connection_class = _fast_connection(pool.connection_class)
        await asyncio.wait_for(client.ping(), _CONNECT_TIMEOUT_S)  # type: ignore[arg-type]
    except (TimeoutError, RedisError, OSError, ValueError) as e:
        reason = str(e) or type(e).__name__
        raise StartupError(f"cannot connect to Redis at {redact_url(url)}: {reason}") from e
    return client


async def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``admin_url`` and return its URL."""
    conn = await connect_postgres(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    conn = await connect_postgres(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def run_command(client: aioredis.Redis, *args: Any) -> Any:
    """One command on one of ``client``'s pooled connections, without redis-py's wrapper
    around every command (retry, observability hooks and response callbacks: the
    reply comes back as the server sent it, bytes and lists).

    For the bus's hot path: sequential PINGs to an embedded Redis on another CPU took
    94 us each through ``execute_command`` and 82 us this way, with 43 us of client CPU
    instead of 57. A connection whose command failed other than by an error reply (or
    was cancelled mid-way) is disconnected before it goes back to the pool.
    """
    reply = (await run_commands(client, args))[0]
    if isinstance(reply, ResponseError):
        raise reply
    return reply


async def run_commands(client: aioredis.Redis, *commands: Sequence[Any]) -> list[Any]:
    """:func:`run_command` for several commands sent in one write (a pipeline without MULTI):
    their replies in order, an error reply as its ``ResponseError``."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]  # unannotated in redis-py
    try:
        await conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as e:  # an error reply: the connection is in step and stays usable
                replies.append(e)
        return replies
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)
