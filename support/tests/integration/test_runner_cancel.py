"""A cancel that comes while a replica claims the run is not lost: the run stops as it starts,
before any of its graph runs, and ends cancelled (real PostgreSQL, a real runner).

The race it covers: a workflow is resumed and cancelled at once. The cancel finds the run
already claimed (so it cannot finish it as idle), and its NOTIFY reaches the claiming replica
before the run is there to cancel; or the claim read the run's ``cancel_requested`` already."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from agent_orchestrator.execution import Outcome
from agent_orchestrator.records import WorkflowRecords
from agent_orchestrator.runner import LocalRun, WorkflowRunner
from shared.lib.connections import create_pg_pool
from shared.lib.settings import Settings
from shared.lib.workflow_state import WorkflowStateManager


@pytest.mark.parametrize("how", ["notice before the claim", "flag read by the claim"])
async def test_a_cancel_that_comes_while_the_run_is_claimed_stops_it_as_it_starts(
    how: str, database_url: str, settings_factory: Callable[..., Settings]
) -> None:
    pool = await create_pg_pool(database_url)
    executed: list[str] = []
    finished: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

    async def execute(lr: LocalRun) -> Outcome:
        executed.append(lr.run.workflow_id)
        return Outcome(status="succeeded")

    async def on_finished(lr: LocalRun, outcome: object) -> None:
        await runner.store.finish(lr.run.workflow_id)
        lr.run_finished = True
        await finished.put((lr.run.workflow_id, outcome))

    runner = WorkflowRunner(pool, settings_factory(), execute=execute, on_finished=on_finished)
    records = WorkflowRecords(pool, WorkflowStateManager(pool), runner.store)
    cancelled, other = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        for workflow_id in (cancelled, other):
            await records.create(workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={})
        if how == "notice before the claim":
            assert runner.cancel_local(cancelled, reason="cancelled") is False  # not here (yet)
        else:
            await pool.execute("UPDATE workflow_runs SET cancel_requested = true WHERE workflow_id = $1", cancelled)
        await runner.start()
        ended = dict([await asyncio.wait_for(finished.get(), 15) for _ in range(2)])
        assert isinstance(ended[cancelled], asyncio.CancelledError), ended
        assert isinstance(ended[other], Outcome), ended  # only the cancelled one is stopped
        assert executed == [other]
        assert await pool.fetchval("SELECT state FROM workflow_runs WHERE workflow_id = $1", cancelled) == "done"
    finally:
        await runner.stop()
        await pool.close()
