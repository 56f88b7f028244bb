"""The runner's lock session on real PostgreSQL: when its connection is killed by the server
(``pg_terminate_backend``, as a restart does to every session), the runs it held are stopped,
the session comes back by itself, and the runs are claimed again and finish."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from agent_orchestrator.execution import Outcome
from agent_orchestrator.lock_session import LockSession
from agent_orchestrator.records import WorkflowRecords
from agent_orchestrator.runner import LocalRun, WorkflowRunner
from shared.lib.connections import connect_postgres, create_pg_pool
from shared.lib.errors import ServiceUnavailable
from shared.lib.settings import Settings
from shared.lib.workflow_state import WorkflowStateManager


async def _backend_pid(session: LockSession) -> int:
    async with session.mutex:
        return int(await session.conn().fetchval("SELECT pg_backend_pid()"))


async def _wait(predicate: Callable[[], bool], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_a_killed_session_reports_its_loss_and_comes_back(database_url: str) -> None:
    lost, back = asyncio.Event(), asyncio.Event()
    session = LockSession(database_url, listeners={}, on_lost=lost.set, on_back=back.set, retry_max_s=0.2)
    admin = await connect_postgres(database_url)
    try:
        await session.open()
        first = await _backend_pid(session)
        await admin.execute("SELECT pg_terminate_backend($1)", first)
        await asyncio.wait_for(lost.wait(), 5)
        await asyncio.wait_for(back.wait(), 10)
        assert session.up
        assert await _backend_pid(session) != first
    finally:
        await session.close()
        await admin.close()


async def test_a_lost_session_is_unavailable_until_it_is_back(database_url: str) -> None:
    session = LockSession(database_url, listeners={}, on_lost=lambda: None, on_back=lambda: None)
    await session.open()
    await session.close()
    assert not session.up
    with pytest.raises(ServiceUnavailable, match="reconnecting"):
        session.conn()


async def test_runs_of_a_lost_session_are_stopped_then_claimed_again_and_finish(
    database_url: str, settings_factory: Callable[..., Settings]
) -> None:
    """A run in progress when the session dies is cancelled (its lock is gone); once its lease runs
    out the runner, its session back, claims it again (attempt 2) and it finishes."""
    settings = settings_factory(run_lease_ttl_s=0.5)
    pool = await create_pg_pool(database_url)
    admin = await connect_postgres(database_url)
    attempts: list[int] = []
    finished: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

    async def execute(lr: LocalRun) -> Outcome:
        attempts.append(lr.run.attempts)
        if lr.run.attempts == 1:
            await asyncio.sleep(60)  # still running when the session dies
        return Outcome(status="succeeded")

    async def on_finished(lr: LocalRun, outcome: object) -> None:
        await runner.store.finish(lr.run.workflow_id)
        lr.run_finished = True
        await finished.put((lr.run.workflow_id, outcome))

    runner = WorkflowRunner(pool, settings, execute=execute, on_finished=on_finished)
    records = WorkflowRecords(pool, WorkflowStateManager(pool), runner.store)
    workflow_id = str(uuid.uuid4())
    try:
        await records.create(workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={})
        await runner.start()
        await _wait(lambda: attempts == [1])
        assert runner._session is not None
        await admin.execute("SELECT pg_terminate_backend($1)", await _backend_pid(runner._session))
        done_id, outcome = await asyncio.wait_for(finished.get(), 15)
        assert done_id == workflow_id
        assert isinstance(outcome, Outcome)
        assert outcome.status == "succeeded"
        assert attempts == [1, 2]
        # handed back, not taken over after its lease: the database's trouble is no loss of the run's
        assert await pool.fetchval("SELECT losses FROM workflow_runs WHERE workflow_id = $1", workflow_id) == 0
    finally:
        await runner.stop()
        await admin.close()
        await pool.close()


async def test_the_lock_session_does_not_outlive_a_stopped_runner(
    database_url: str, settings_factory: Callable[..., Settings]
) -> None:
    async def nothing(*_: object) -> None:
        return None

    pool = await create_pg_pool(database_url)
    runner = WorkflowRunner(pool, settings_factory(), execute=nothing, on_finished=nothing)
    try:
        await runner.start()
        assert runner._session is not None
        pid = await _backend_pid(runner._session)
        await runner.stop()
        async with asyncio.timeout(5):
            while await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                await asyncio.sleep(0.05)
    finally:
        await pool.close()
