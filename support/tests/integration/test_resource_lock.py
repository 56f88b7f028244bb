"""Resource locks against a real PostgreSQL: exclusion, waiting, TTL, fencing, operators."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from shared.lib.connections import create_pg_pool
from shared.lib.errors import InvalidInput, LockContended, LockLost, NotFound
from shared.lib.resource_lock import ResourceLockManager
from shared.lib.settings import Settings
from support.tests.integration.conftest import run_cli

MakeLocks = Callable[..., Any]


@pytest.fixture
async def make_locks(database_url: str, settings_factory: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """Build started lock managers (each with its own pool); all closed at teardown."""
    async with AsyncExitStack() as stack:

        async def make(*, pool_size: int = 4, emit: Any = None, **overrides: Any) -> ResourceLockManager:
            pool = await create_pg_pool(database_url, min_size=1, max_size=pool_size)
            stack.push_async_callback(pool.close)
            manager = ResourceLockManager(pool, settings_factory(**overrides), emit=emit)
            await manager.start()
            stack.push_async_callback(manager.close)
            return manager

        yield make


async def _history(database_url: str, resource_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT event, token, owner, wait_s, held_s, reason FROM resource_lock_history "
            "WHERE resource_id = $1 ORDER BY id",
            resource_id,
        )
    finally:
        await conn.close()


async def test_acquire_and_release_record_the_lease(make_locks: MakeLocks, database_url: str) -> None:
    """A lease shows as locked with its holder, frees on exit, and both ends are in the history."""
    locks = await make_locks()
    async with locks.acquire("repo:acme/api", owner="agent-a", ttl_s=30) as lease:
        assert lease.held
        assert await locks.is_locked("repo:acme/api")
        info = await locks.holder("repo:acme/api")
        assert info is not None
        assert (info.owner, info.token, info.state) == ("agent-a", lease.token, "held")
        assert info.expires_at.tzinfo is not None
        assert [i.resource_id for i in await locks.list_locks()] == ["repo:acme/api"]
    assert not lease.held
    assert not await locks.is_locked("repo:acme/api")
    assert await locks.holder("repo:acme/api") is None
    history = await _history(database_url, "repo:acme/api")
    assert [h["event"] for h in history] == ["granted", "released"]
    assert history[0]["wait_s"] >= 0
    assert history[1]["held_s"] >= 0
    assert {h["owner"] for h in history} == {"agent-a"}


async def test_tokens_rise_strictly(make_locks: MakeLocks) -> None:
    """Each grant on a resource carries a larger fencing token than the one before."""
    locks = await make_locks()
    tokens = []
    for _ in range(5):
        async with locks.acquire("env:staging", owner="deployer") as lease:
            tokens.append(lease.token)
    assert tokens == sorted(set(tokens))
    assert len(tokens) == 5


async def test_first_grant_after_a_server_start_jumps_past_the_clock(make_locks: MakeLocks, database_url: str) -> None:
    """A row whose fence was written before the server's last start (its counter may have lost
    unflushed grants) is granted past the clock in microseconds, never the next small number."""
    locks = await make_locks()
    async with locks.acquire("env:epoch", owner="deployer") as first:
        pass
    conn = await asyncpg.connect(database_url)
    try:  # as if the server had restarted since the last grant
        await conn.execute(
            "UPDATE resource_locks SET fence_epoch = fence_epoch - interval '1 day' WHERE resource_id = 'env:epoch'"
        )
    finally:
        await conn.close()
    before_us = int(time.time() * 1_000_000)
    async with locks.acquire("env:epoch", owner="deployer") as after_start:
        assert after_start.token >= before_us > first.token
    async with locks.acquire("env:epoch", owner="deployer") as next_one:
        assert next_one.token == after_start.token + 1  # the fast path again, from the new epoch


async def test_contended_acquire_names_the_holder(make_locks: MakeLocks) -> None:
    """wait_s=0 on a held lock raises LockContended with the holder, its token and lease end."""
    a, b = await make_locks(), await make_locks()
    async with a.acquire("repo:x", owner="agent-a", ttl_s=30) as lease:
        with pytest.raises(LockContended) as err:
            await b.acquire_lease("repo:x", owner="agent-b", wait_s=0)
    details = err.value.details
    assert details["holder"] == "agent-a"
    assert details["token"] == lease.token
    assert details["expires_at"] == lease.expires_at.isoformat()
    assert "agent-a" in err.value.message
    assert err.value.resource == "repo:x"


async def test_waiter_is_woken_by_the_release(make_locks: MakeLocks) -> None:
    """A waiter gets the lock within milliseconds of the release, not at its next poll."""
    a, b = await make_locks(), await make_locks()
    lease = await a.acquire_lease("repo:x", owner="agent-a")
    waiter = asyncio.create_task(b.acquire_lease("repo:x", owner="agent-b", wait_s=10))
    await asyncio.sleep(0.7)  # the waiter's backoff has grown past 0.3 s by now
    assert not waiter.done()
    await lease.release()
    released = time.monotonic()
    got = await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - released < 0.2
    assert got.token > lease.token
    await got.release()


async def test_only_a_release_someone_waits_for_is_notified(make_locks: MakeLocks, database_url: str) -> None:
    """Uncontended leases send no NOTIFY; a release that a waiter asked for during the lease does."""
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener("resource_lock_released", lambda *args: heard.append(args[-1]))
    try:
        a, b = await make_locks(), await make_locks()
        for _ in range(3):
            async with a.acquire("repo:quiet", owner="agent-a"):
                pass
        lease = await a.acquire_lease("repo:busy", owner="agent-a")
        with pytest.raises(LockContended):
            await b.acquire_lease("repo:busy", owner="agent-b")
        await lease.release()
        await asyncio.sleep(0.3)  # notifications arrive asynchronously
        assert heard == ["repo:busy"]
    finally:
        await listener.close()


async def test_wait_gives_up_after_wait_s(make_locks: MakeLocks) -> None:
    """wait_s>0 on a lock that stays held fails after about wait_s, naming the holder."""
    a, b = await make_locks(), await make_locks()
    async with a.acquire("repo:x", owner="agent-a"):
        started = time.monotonic()
        with pytest.raises(LockContended) as err:
            await b.acquire_lease("repo:x", owner="agent-b", wait_s=0.4)
        waited = time.monotonic() - started
    assert 0.4 <= waited < 1.5
    assert err.value.details["holder"] == "agent-a"


async def test_expired_lease_goes_to_next_acquirer_and_stale_holder_is_fenced(
    make_locks: MakeLocks, database_url: str
) -> None:
    """Past its TTL a lease goes to the next acquirer with a higher token; the old holder's
    renew and release raise LockLost and leave the new holder's lock in place."""
    a = await make_locks(lock_sweep_interval_s=3600)  # no self-expiry: the acquirer must expire it
    b = await make_locks()
    old = await a.acquire_lease("repo:x", owner="agent-a", ttl_s=0.3)
    started = time.monotonic()
    new = await b.acquire_lease("repo:x", owner="agent-b", ttl_s=30, wait_s=5)
    assert time.monotonic() - started < 2.0
    assert new.token > old.token
    with pytest.raises(LockLost):
        await old.renew()
    with pytest.raises(LockLost):
        await old.release()
    info = await b.holder("repo:x")
    assert info is not None
    assert (info.owner, info.token) == ("agent-b", new.token)
    await new.release()
    events = [h["event"] for h in await _history(database_url, "repo:x")]
    assert events == ["granted", "expired", "granted", "released"]


async def test_overdue_lease_is_expired_by_its_own_sweep(make_locks: MakeLocks, database_url: str) -> None:
    """A holder that stops renewing loses the lease to its own process's sweep, on its own session."""
    locks = await make_locks(lock_sweep_interval_s=0.1)
    before = REGISTRY.get_sample_value("resource_lock_expirations_total") or 0.0
    lease = await locks.acquire_lease("env:prod", owner="deployer", ttl_s=0.3)
    await asyncio.sleep(0.8)
    assert not lease.held
    assert not await locks.is_locked("env:prod")
    with pytest.raises(LockLost):
        await lease.release()
    history = await _history(database_url, "env:prod")
    assert [h["event"] for h in history] == ["granted", "expired"]
    assert "ttl" in history[1]["reason"]
    assert (REGISTRY.get_sample_value("resource_lock_expirations_total") or 0.0) >= before + 1


async def test_renew_keeps_the_lease_past_its_first_ttl(make_locks: MakeLocks) -> None:
    """A renewed lease outlives its original TTL and moves its expiry forward."""
    locks = await make_locks(lock_sweep_interval_s=0.1)
    other = await make_locks()
    async with locks.acquire("repo:y", owner="agent-a", ttl_s=0.5) as lease:
        first = lease.expires_at
        for _ in range(4):
            await asyncio.sleep(0.25)
            await lease.renew()
        assert lease.held
        assert lease.expires_at > first
        with pytest.raises(LockContended):
            await other.acquire_lease("repo:y", owner="agent-b")


async def test_force_release_ends_the_holders_lease(make_locks: MakeLocks, database_url: str) -> None:
    """An operator's forced release frees the lock, records the reason and fences the old holder."""
    holder, operator = await make_locks(), await make_locks()
    lease = await holder.acquire_lease("env:prod", owner="deployer", ttl_s=60)
    ended = await operator.force_release("env:prod", "deploy hung for an hour")
    assert (ended.owner, ended.token) == ("deployer", lease.token)
    assert not await operator.is_locked("env:prod")
    with pytest.raises(LockLost):
        await lease.renew()
    history = await _history(database_url, "env:prod")
    assert history[-1]["event"] == "force_released"
    assert history[-1]["reason"] == "deploy hung for an hour"
    with pytest.raises(NotFound):
        await operator.force_release("env:prod", "again")
    async with operator.acquire("env:prod", owner="next") as nxt:
        assert nxt.token > lease.token


async def test_waiters_hold_no_pooled_connection(make_locks: MakeLocks, database_url: str) -> None:
    """Forty waiters on a held lock leave a 2-connection pool free and open few lock sessions."""
    holder = await make_locks()
    waiting = await make_locks(pool_size=2)
    lease = await holder.acquire_lease("repo:busy", owner="holder")

    async def wait_and_hold(i: int) -> int:
        async with waiting.acquire("repo:busy", owner=f"waiter-{i}", wait_s=20) as got:
            return got.token

    tasks = [asyncio.create_task(wait_and_hold(i)) for i in range(40)]
    pool: asyncpg.Pool = waiting._pool
    sessions, deadline = -1, time.monotonic() + 15  # the first attempts' sessions close as they fail
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        async with pool.acquire(timeout=1) as c1, pool.acquire(timeout=1) as c2:
            assert await c1.fetchval("SELECT 1") == await c2.fetchval("SELECT 1") == 1
            sessions = await c1.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ao-resource-lock'"
                " AND datname = current_database()"
            )
        if sessions <= 1 + 4 + 4:  # the holder's lease, idle sessions of both managers, a few attempts
            break
    assert sessions <= 1 + 4 + 4, f"{sessions} lock sessions open while 40 tasks wait"
    assert not any(t.done() for t in tasks)  # all still waiting, none holding a session for it
    await lease.release()
    tokens = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert len(set(tokens)) == 40
    assert min(tokens) > lease.token


async def test_cli_lists_and_force_releases_a_lease(
    make_locks: MakeLocks, database_url: str, service_env: dict[str, str]
) -> None:
    """`locks list` shows the holder; `locks release --reason` ends its lease and records why. Both
    print the holder's name as it is, square brackets and all (not taken for rich markup)."""
    lease = await (await make_locks()).acquire_lease("env:cli", owner="deployer[bot]", ttl_s=60)
    code, out = await run_cli(service_env, "locks", "list")
    assert code == 0, out
    assert "env:cli" in out
    assert "deployer[bot]" in out
    code, out = await run_cli(service_env, "locks", "release", "env:cli", "--reason", "stuck deploy")
    assert code == 0, out
    assert "released env:cli held by deployer[bot] (token" in out
    with pytest.raises(LockLost):
        await lease.renew()
    history = await _history(database_url, "env:cli")
    assert [(h["event"], h["reason"]) for h in history][-1] == ("force_released", "stuck deploy")
    code, out = await run_cli(service_env, "locks", "list")
    assert "no resource is locked" in out


async def test_bad_arguments_name_the_field(make_locks: MakeLocks) -> None:
    """Invalid ids, owners, TTLs and waits raise InvalidInput naming the field, before any SQL."""
    locks = await make_locks()
    cases = [
        ({"resource_id": "", "owner": "a"}, "resource_id"),
        ({"resource_id": "x" * 600, "owner": "a"}, "resource_id"),
        ({"resource_id": "repo:x", "owner": ""}, "owner"),
        ({"resource_id": "repo:x", "owner": "a", "ttl_s": 0}, "ttl_s"),
        ({"resource_id": "repo:x", "owner": "a", "wait_s": -1}, "wait_s"),
    ]
    for kwargs, field in cases:
        rid = kwargs.pop("resource_id")
        with pytest.raises(InvalidInput) as err:
            await locks.acquire_lease(rid, **kwargs)
        assert err.value.field == field
    with pytest.raises(InvalidInput) as err:
        await locks.force_release("repo:x", " ")
    assert err.value.field == "reason"


async def test_events_and_metrics_follow_the_lease(make_locks: MakeLocks) -> None:
    """resource.locked/unlocked go to emit, and the acquisition counters count by resource type."""
    seen: list[tuple[str, dict[str, Any], str | None]] = []

    async def emit(event_type: str, data: dict[str, Any], *, aggregate_type: Any = None, aggregate_id: Any = None):
        seen.append((event_type, data, aggregate_id))

    locks = await make_locks(emit=emit)
    labels = {"resource_type": "cache", "status": "granted"}
    before = REGISTRY.get_sample_value("resource_lock_acquisitions_total", labels) or 0.0
    async with locks.acquire("cache:warm", owner="agent-a") as lease:
        assert REGISTRY.get_sample_value("resource_locks_active", {"resource_type": "cache"}) == 1
    assert REGISTRY.get_sample_value("resource_lock_acquisitions_total", labels) == before + 1
    assert REGISTRY.get_sample_value("resource_locks_active", {"resource_type": "cache"}) == 0
    assert [(t, d["token"], a) for t, d, a in seen] == [
        ("resource.locked", lease.token, "cache:warm"),
        ("resource.unlocked", lease.token, "cache:warm"),
    ]
    assert seen[1][1]["reason"] == "released"
