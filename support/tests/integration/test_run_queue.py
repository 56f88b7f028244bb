"""A launch queues its run and wakes the replicas in the same transaction (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid

from agent_orchestrator.records import WorkflowRecords
from agent_orchestrator.run_store import RUNS_CHANNEL, RunStore
from shared.lib.connections import connect_postgres, create_pg_pool
from shared.lib.workflow_state import WorkflowStateManager


async def test_a_launch_queues_its_run_and_notifies_the_replicas_once_committed(database_url: str) -> None:
    pool = await create_pg_pool(database_url)
    listener = await connect_postgres(database_url)
    woken: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(RUNS_CHANNEL, lambda _c, _pid, _ch, payload: woken.put_nowait(payload))
    records = WorkflowRecords(pool, WorkflowStateManager(pool), RunStore(pool, runner_id="r1", lease_ttl_s=30))
    workflow_id = str(uuid.uuid4())
    try:
        record, created, run = await records.create(
            workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={}
        )
        assert created
        assert run is None  # queued for any replica, not claimed
        assert record.workflow_id == workflow_id
        assert await asyncio.wait_for(woken.get(), 5) == workflow_id
        run = await records.run_store.get(workflow_id)
        assert run is not None
        assert run.state == "queued"
    finally:
        await listener.close()
        await pool.close()
