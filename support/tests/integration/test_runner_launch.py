"""A replica runs the workflows it launches itself, at once, under their advisory locks (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from agent_orchestrator import runner as runner_module
from agent_orchestrator.execution import Outcome
from agent_orchestrator.records import Launched, WorkflowRecords
from agent_orchestrator.runner import LocalRun, WorkflowRunner, advisory_key
from agent_orchestrator.service import Orchestrator
from shared.lib.connections import connect_postgres, create_pg_pool
from shared.lib.settings import Settings
from shared.lib.workflow_state import WorkflowStateManager
from support.tests.integration.conftest import BusFactory


def _runner(
    pool: Any, settings: Settings, outcome: Callable[[LocalRun], Outcome]
) -> tuple[WorkflowRunner, WorkflowRecords, asyncio.Queue[str]]:
    """A runner whose runs end with ``outcome(run)``, its records, and the ids of the runs it finished."""
    finished: asyncio.Queue[str] = asyncio.Queue()

    async def execute(lr: LocalRun) -> Outcome:
        return outcome(lr)

    async def on_finished(lr: LocalRun, _outcome: Any) -> None:
        finished.put_nowait(lr.run.workflow_id)

    runner = WorkflowRunner(pool, settings, execute=execute, on_finished=on_finished)
    return runner, WorkflowRecords(pool, WorkflowStateManager(pool), runner.store), finished


def _replica_that_must_not_run(
    bus: Any, settings: Settings, why: str
) -> tuple[WorkflowRunner, WorkflowRecords, Orchestrator]:
    """A replica (runner, records, orchestrator) whose runner fails the test if it runs anything."""

    async def execute(lr: LocalRun) -> Outcome:
        raise AssertionError(why)

    runner = WorkflowRunner(bus.pool, settings, execute=execute, on_finished=lambda *_: asyncio.sleep(0))
    records = WorkflowRecords(bus.pool, WorkflowStateManager(bus.pool), runner.store)
    orch = Orchestrator(settings, records, bus, locks=None, saver=None, types={}, runner=runner)  # type: ignore[arg-type]
    return runner, records, orch


def _launch(orch: Orchestrator, records: WorkflowRecords, workflow_id: str) -> Awaitable[Launched]:
    """A launch of ``workflow_id`` through the orchestrator's own path (reserve, statement, lock)."""
    return orch._create(
        workflow_id,
        lambda claim: records.create(
            workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={}, claim=claim
        ),
    )


async def _assert_room_back(runner: WorkflowRunner) -> None:
    locking = runner.reserve(str(uuid.uuid4()))
    assert locking is not None  # the room came back
    assert await locking


async def test_a_launch_reserved_here_is_written_claimed_and_run_here(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(max_concurrent_workflows=2)
    assert settings.database_url is not None
    pool = await create_pg_pool(settings.database_url)
    other = await connect_postgres(settings.database_url)  # another replica's lock session
    ran: list[tuple[str, Any]] = []

    def succeed(lr: LocalRun) -> Outcome:
        ran.append((lr.run.workflow_id, lr.record))
        return Outcome(status="succeeded")

    runner, records, finished = _runner(pool, settings, succeed)
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    await runner.start()
    try:
        locking_a, locking_b = runner.reserve(a), runner.reserve(b)
        assert locking_a is not None
        assert locking_b is not None
        assert runner.reserve(c) is None  # no room left: c would be queued for any replica
        assert await locking_a
        assert await locking_b
        assert not await other.fetchval("SELECT pg_try_advisory_lock($1)", advisory_key(a))
        await runner.unreserve(b, locked=True)  # b's launch failed: room and lock given back
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", advisory_key(b))

        record, created, run, _ = await records.create(
            a, "agent_chain", {"calls": []}, idempotency_key="launch-a", trace={}, claim=True
        )
        assert created
        assert run is not None
        assert (run.state, run.runner_id, run.attempts) == ("running", runner.runner_id, 1)
        assert record.status == "running"  # claimed at launch: it starts running
        assert (await records.manager.get_workflow(a)).started_at is not None
        assert await records.run_store.get(a) == run  # the row the launch statement wrote
        again = await records.create(c, "agent_chain", {"calls": []}, idempotency_key="launch-a", trace={}, claim=True)
        assert (again.record.workflow_id, again.created, again.run) == (a, False, None)
        assert await records.run_store.get(c) is None  # the refused launch wrote no run either
        runner.adopt(run, record)
        assert await asyncio.wait_for(finished.get(), 5) == a
        assert ran == [(a, record)]  # run once, with the record the launch wrote (no read back)
        await asyncio.sleep(1.2)  # a claim pass: nothing to claim, a is done
        assert len(ran) == 1
        done = await records.run_store.get(a)
        assert done is not None
        assert done.state == "done"
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", advisory_key(a))  # released at the end
    finally:
        await runner.stop()
        await other.close()
        await pool.close()


async def test_a_launch_whose_lock_is_held_elsewhere_is_queued_not_run_here(
    settings_factory: Callable[..., Settings], make_bus: BusFactory
) -> None:
    """The advisory lock is taken while the launch statement runs. If it could not be taken (a
    64-bit key clash), the run the statement claimed is handed back to the queue: no replica
    runs it without the lock, and this one's room is given back."""
    settings = settings_factory(max_concurrent_workflows=1)
    bus = await make_bus()
    assert bus.pool is not None
    other = await connect_postgres(settings.database_url or "")
    runner, records, orch = _replica_that_must_not_run(bus, settings, "a run without its lock must not start")
    workflow_id = str(uuid.uuid4())
    assert await other.fetchval("SELECT pg_try_advisory_lock($1)", advisory_key(workflow_id))
    await runner.start()
    try:
        launched = await _launch(orch, records, workflow_id)
        assert launched.created
        assert launched.run is None
        stored = await records.run_store.get(workflow_id)
        assert stored is not None
        assert (stored.state, stored.runner_id) == ("queued", None)
        await _assert_room_back(runner)
    finally:
        await runner.stop()
        await other.close()


async def test_a_finished_runs_lock_goes_back_with_the_next_launchs_and_an_interrupted_ones_at_once(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run is never claimed again: its advisory lock is given back in the statement
    that takes the next launch's (no statement of its own). An interrupted run may be resumed on
    another replica: its lock goes back at once."""
    monkeypatch.setattr(runner_module, "_UNLOCK_DELAY_S", 60.0)  # only a take gives it back
    settings = settings_factory(max_concurrent_workflows=2)
    assert settings.database_url is not None
    pool = await create_pg_pool(settings.database_url)
    other = await connect_postgres(settings.database_url)  # another replica's lock session
    done, waits, nxt = (str(uuid.uuid4()) for _ in range(3))

    def outcome(lr: LocalRun) -> Outcome:
        if lr.run.workflow_id == waits:
            return Outcome(status="interrupted", interrupt={"question": "ship it?"})
        return Outcome(status="succeeded")

    runner, records, finished = _runner(pool, settings, outcome)

    async def launch_and_run(workflow_id: str) -> None:
        locking = runner.reserve(workflow_id)
        assert locking is not None
        assert await locking
        launched = await records.create(
            workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={}, claim=True
        )
        assert launched.run is not None
        runner.adopt(launched.run, launched.record)
        assert await asyncio.wait_for(finished.get(), 5) == workflow_id

    async def held(workflow_id: str) -> bool:
        key = advisory_key(workflow_id)
        if await other.fetchval("SELECT pg_try_advisory_lock($1)", key):
            await other.fetchval("SELECT pg_advisory_unlock($1)", key)
            return False
        return True

    await runner.start()
    try:
        await launch_and_run(done)
        await asyncio.sleep(0.2)
        assert await held(done)  # finished, its lock waits for the next take
        await launch_and_run(waits)
        assert not await held(done)  # given back with waits' take
        for _ in range(50):  # interrupted: given back at once, in a statement of its own
            if not await held(waits):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("an interrupted run's lock was not given back")
        locking = runner.reserve(nxt)
        assert locking is not None
        assert await locking
    finally:
        await runner.stop()
        await other.close()
        await pool.close()


async def test_a_launch_whose_lock_comes_after_its_lease_ran_out_is_not_run_here(
    settings_factory: Callable[..., Settings], make_bus: BusFactory
) -> None:
    """The launch statement writes the run claimed, with a lease, while the advisory lock is taken
    on the lock session. If this replica stalls past the lease before the lock is taken, another
    replica claims the run (the lock is free), runs and finishes it, and gives the lock back:
    the late take then succeeds. The launch must not run the workflow a second time."""
    settings = settings_factory(max_concurrent_workflows=2, run_lease_ttl_s=0.3)
    bus = await make_bus()
    assert bus.pool is not None
    stalled, records, orch = _replica_that_must_not_run(
        bus, settings, "the stalled replica ran a workflow another replica had claimed"
    )
    other, _, finished = _runner(bus.pool, settings, lambda lr: Outcome(status="succeeded"))
    workflow_id = str(uuid.uuid4())
    await stalled.start()
    await other.start()
    try:
        async with stalled._session.mutex:  # type: ignore[union-attr]  # the lock session is stuck: the take waits
            launching = asyncio.ensure_future(_launch(orch, records, workflow_id))
            while (await records.run_store.get(workflow_id)) is None:
                await asyncio.sleep(0.01)
            other.wake()
            assert await asyncio.wait_for(finished.get(), 10) == workflow_id  # claimed once the lease ran out
            for _ in range(100):  # its lock goes back once the run is finished
                if not other._unlocks:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
        launched = await asyncio.wait_for(launching, 10)
        assert launched.created
        assert launched.run is None  # not this replica's to run
        run = await records.run_store.get(workflow_id)
        assert run is not None
        assert (run.state, run.attempts) == ("done", 2)  # run once, by the other replica
        assert stalled.running == []
        await _assert_room_back(stalled)
    finally:
        await other.stop()
        await stalled.stop()
