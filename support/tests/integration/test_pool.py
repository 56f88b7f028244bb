"""The pools against real servers. asyncpg's: a release skips the reset query but never
hands on an open transaction. redis-py's: the check of an idle connection reads no socket,
yet a connection its server closed, or one holding an unread reply, is never handed out;
``run_command`` keeps a connection after an error reply and drops one left mid-command."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ResponseError

from shared.lib.connections import connect_postgres, connect_redis, create_pg_pool, run_command, run_commands


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


async def test_a_redis_connection_the_server_closed_is_reconnected_before_use(redis_url: str) -> None:
    client, killer = await connect_redis(redis_url, max_connections=1), await connect_redis(redis_url)
    try:
        first = await client.client_id()
        await killer.client_kill_filter(_id=first)
        await asyncio.sleep(0.1)  # the loop sees the EOF
        assert await client.ping()
        assert await client.client_id() != first
    finally:
        await killer.aclose()
        await client.aclose()


async def test_a_redis_connection_with_an_unread_reply_is_not_handed_out(redis_url: str, redis_prefix: str) -> None:
    client = await connect_redis(redis_url, max_connections=1)
    key = f"{redis_prefix}:probe"
    try:
        await client.set(key, "right")
        pool = client.connection_pool
        conn = await pool.get_connection()
        await conn.send_command("ECHO", "stale")  # its reply is never read
        await pool.release(conn)
        await asyncio.sleep(0.1)  # the stale reply arrives in the connection's buffer
        assert await client.get(key) == b"right"
    finally:
        await client.aclose()


async def test_run_command_returns_the_raw_reply_and_survives_an_error_reply(redis_url: str, redis_prefix: str) -> None:
    """run_command answers as the server does (bytes, lists); an error reply raises and the connection stays."""
    client = await connect_redis(redis_url, max_connections=1)
    key = f"{redis_prefix}:raw"
    try:
        assert await run_command(client, "RPUSH", key, "a", "b") == 2
        assert await run_command(client, "LRANGE", key, 0, -1) == [b"a", b"b"]
        before = await client.client_id()
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await run_command(client, "INCR", key)
        assert await client.client_id() == before
    finally:
        await client.delete(key)
        await client.aclose()


async def test_run_commands_send_together_and_keep_step_past_an_error_reply(redis_url: str, redis_prefix: str) -> None:
    """Several commands in one write: every reply in order, an error reply in its place, and the
    connection stays in step for the next caller."""
    client = await connect_redis(redis_url, max_connections=1)
    key = f"{redis_prefix}:many"
    try:
        before = await client.client_id()
        replies = await run_commands(client, ("RPUSH", key, "a"), ("INCR", key), ("LLEN", key))
        assert replies[0] == 1
        assert isinstance(replies[1], ResponseError)
        assert "WRONGTYPE" in str(replies[1])
        assert replies[2] == 1
        assert await run_command(client, "LRANGE", key, 0, -1) == [b"a"]  # its own reply, not a stale one
        assert await client.client_id() == before
    finally:
        await client.delete(key)
        await client.aclose()


async def test_run_command_cancelled_mid_reply_never_hands_its_reply_to_the_next_caller(
    redis_url: str, redis_prefix: str
) -> None:
    """A command cancelled while its reply is due drops the connection: the next command reads its own reply."""
    client = await connect_redis(redis_url, max_connections=1)
    stream = f"{redis_prefix}:cancelled"
    try:
        read = asyncio.create_task(run_command(client, "XREAD", "BLOCK", 2000, "STREAMS", stream, "$"))
        await asyncio.sleep(0.1)
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        await client.xadd(stream, {"e": "late"})  # would have been the cancelled XREAD's reply
        assert await run_command(client, "ECHO", "mine") == b"mine"
    finally:
        await client.delete(stream)
        await client.aclose()
