"""Claiming runs: one statement takes the advisory locks no live replica holds, claims those runs
and gives back the locks of runs no longer claimable (real PostgreSQL, two lock sessions)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from agent_orchestrator.records import WorkflowRecords
from agent_orchestrator.run_store import RunStore
from agent_orchestrator.runner import advisory_key
from shared.lib.connections import connect_postgres, create_pg_pool
from shared.lib.workflow_state import WorkflowStateManager
from support.tests.integration.conftest import BusFactory


async def _held_by_someone(probe: asyncpg.Connection, workflow_id: str) -> bool:
    """True when another session holds the workflow's advisory lock (the probe cannot take it)."""
    got = await probe.fetchval("SELECT pg_try_advisory_lock($1)", advisory_key(workflow_id))
    if got:
        await probe.fetchval("SELECT pg_advisory_unlock($1)", advisory_key(workflow_id))
    return not got


async def test_two_replicas_claiming_the_same_runs_at_once_split_them(database_url: str) -> None:
    pool = await create_pg_pool(database_url)
    sessions = [await connect_postgres(database_url) for _ in range(3)]
    a_lock, b_lock, probe = sessions
    a = RunStore(pool, runner_id="a", lease_ttl_s=30)
    b = RunStore(pool, runner_id="b", lease_ttl_s=30)
    records = WorkflowRecords(pool, WorkflowStateManager(pool), a)
    try:
        ids = [str(uuid.uuid4()) for _ in range(40)]
        for workflow_id in ids:
            await records.create(workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={})
        keys = [advisory_key(w) for w in ids]
        got_a, got_b = await asyncio.gather(a.claim(a_lock, ids, keys), b.claim(b_lock, ids[::-1], keys[::-1]))
        claimed_a = {r.workflow_id for r in got_a}
        claimed_b = {r.workflow_id for r in got_b}
        assert claimed_a | claimed_b == set(ids)
        assert not claimed_a & claimed_b  # never both
        assert all(r.state == "running" and r.attempts == 1 for r in [*got_a, *got_b])
        for workflow_id in ids:
            assert await _held_by_someone(probe, workflow_id)
        # claiming again: every run is taken (locks held, leases live), so nothing more
        assert await a.claim(a_lock, ids, keys) == []
        assert await b.claim(b_lock, ids, keys) == []
    finally:
        for s in sessions:
            await s.close()
        await pool.close()


async def test_a_lock_taken_for_a_run_no_longer_claimable_is_given_back(database_url: str) -> None:
    pool = await create_pg_pool(database_url)
    lock_conn, probe = await connect_postgres(database_url), await connect_postgres(database_url)
    store = RunStore(pool, runner_id="a", lease_ttl_s=30)
    records = WorkflowRecords(pool, WorkflowStateManager(pool), store)
    try:
        done, queued = str(uuid.uuid4()), str(uuid.uuid4())
        for workflow_id in (done, queued):
            await records.create(workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={})
        await store.finish(done)  # finished between the candidates read and the claim
        runs = await store.claim(lock_conn, [done, queued], [advisory_key(done), advisory_key(queued)])
        assert [r.workflow_id for r in runs] == [queued]
        assert await _held_by_someone(probe, queued)
        assert not await _held_by_someone(probe, done)  # its lock was given back in the same statement
        by_id = await records.get_many(runs)
        assert by_id[queued].workflow_id == queued
        assert by_id[queued].status == "pending"
    finally:
        await lock_conn.close()
        await probe.close()
        await pool.close()


async def test_the_terminal_status_and_the_run_finish_are_one_statement(make_bus: BusFactory) -> None:
    """The finish of a workflow writes its row, its event and its run's ``done`` together; the run
    is finished even when the workflow had already finished (cancelled meanwhile)."""
    bus = await make_bus()
    assert bus.pool is not None
    states = WorkflowStateManager(bus.pool)
    store = RunStore(bus.pool, runner_id="a", lease_ttl_s=30)
    records = WorkflowRecords(bus.pool, states, store)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    for workflow_id in (first, second):
        await records.create(workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={})

    async def finish(workflow_id: str) -> object:
        change = states.completion_change(workflow_id, status="succeeded", result={"ok": True})
        return await bus.emit_after(
            change,
            "workflow.status",
            {"status": "succeeded"},
            aggregate_type="workflow",
            aggregate_id=workflow_id,
            also=[RunStore.finish_along(workflow_id)],
        )

    assert await finish(first) is not None
    assert (await states.get_workflow(first)).status == "succeeded"
    run = await store.get(first)
    assert run is not None
    assert run.state == "done"

    await states.complete_workflow(second, status="cancelled")
    assert await finish(second) is None  # no event: the workflow had finished
    assert (await states.get_workflow(second)).status == "cancelled"
    run = await store.get(second)
    assert run is not None
    assert run.state == "done"  # but the run is closed all the same
    assert [e.payload["status"] for e in await bus.events_since(0, aggregate_id=second)] == []
