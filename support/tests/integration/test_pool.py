"""The asyncpg pool against a real PostgreSQL: a release skips the reset query but never
hands on an open transaction."""

from __future__ import annotations

from shared.lib.connections import connect_postgres, create_pg_pool


async def test_release_rolls_back_an_open_transaction(database_url: str) -> None:
    pool = await create_pg_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE pool_probe (n int)")
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO pool_probe VALUES (1)")
        async with pool.acquire() as conn:  # the same (only) connection
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM pool_probe") == 0
    finally:
        await pool.close()


async def test_release_sends_no_reset_query(database_url: str) -> None:
    """After a release the pooled backend's last statement is still the caller's own."""
    pool = await create_pg_pool(database_url, min_size=1, max_size=1)
    observer = await connect_postgres(database_url)
    try:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.execute("SELECT 'probe-before-release'")
        last = await observer.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
        assert last == "SELECT 'probe-before-release'"
    finally:
        await observer.close()
        await pool.close()
