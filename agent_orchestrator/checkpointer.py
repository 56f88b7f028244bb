"""The LangGraph checkpointer: ``AsyncPostgresSaver`` on a psycopg pool, without
the upstream saver's process-wide lock.

Upstream ``AsyncPostgresSaver._cursor`` takes one ``asyncio.Lock`` around every
call, even when it holds a pool (langgraph#7259), so one busy process runs all
its checkpoint writes one at a time. On a pool each call checks out its own
connection, so the lock buys nothing; :class:`PooledPostgresSaver` drops it.
The effect is measured by ``agent-orchestrator bench checkpoint``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from langgraph.checkpoint.postgres import _ainternal
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from shared.lib.settings import Settings

__all__ = ["PooledPostgresSaver", "open_checkpointer"]


class PooledPostgresSaver(AsyncPostgresSaver):
    """``AsyncPostgresSaver`` whose calls run concurrently, one pooled connection each."""

    @contextlib.asynccontextmanager
    async def _cursor(self, *, pipeline: bool = False) -> AsyncIterator[Any]:
        if not isinstance(self.conn, AsyncConnectionPool):
            async with super()._cursor(pipeline=pipeline) as cur:
                yield cur
            return
        async with _ainternal.get_connection(self.conn) as conn:
            if pipeline and self.supports_pipeline:
                async with conn.pipeline(), conn.cursor(binary=True, row_factory=dict_row) as cur:
                    yield cur
            elif pipeline:
                async with conn.transaction(), conn.cursor(binary=True, row_factory=dict_row) as cur:
                    yield cur
            else:
                async with conn.cursor(binary=True, row_factory=dict_row) as cur:
                    yield cur


def _conn_kwargs(settings: Settings) -> dict[str, Any]:
    # autocommit + dict_row are what the saver expects; prepare_threshold=None is
    # the pgbouncer-safe choice (AO_PG_PREPARE_THRESHOLD= empty).
    return {"autocommit": True, "row_factory": dict_row, "prepare_threshold": settings.pg_prepare_threshold}


async def _setup_once(url: str, settings: Settings) -> None:
    # setup() runs CREATE INDEX CONCURRENTLY, which refuses a transaction: use a
    # plain autocommit connection, serialised across processes by an advisory lock.
    async with await AsyncConnection[DictRow].connect(url, **_conn_kwargs(settings)) as conn:
        await conn.execute("SELECT pg_advisory_lock(7364921)")
        try:
            await AsyncPostgresSaver(conn).setup()
        finally:
            await conn.execute("SELECT pg_advisory_unlock(7364921)")


@contextlib.asynccontextmanager
async def open_checkpointer(settings: Settings, *, max_size: int = 10) -> AsyncIterator[PooledPostgresSaver]:
    """A set-up saver on its own psycopg pool, closed on exit."""
    assert settings.database_url is not None
    await _setup_once(settings.database_url, settings)
    pool = AsyncConnectionPool(
        settings.database_url, min_size=1, max_size=max_size, open=False, kwargs=_conn_kwargs(settings)
    )
    await pool.open(wait=True, timeout=10)
    try:
        yield PooledPostgresSaver(pool)
    finally:
        await pool.close()
