"""How runs end (real PostgreSQL, a real runner).

A cancel that comes while a replica claims the run is not lost: the run stops as it starts,
before any of its graph runs, and ends cancelled. The race it covers: a workflow is resumed
and cancelled at once. The cancel finds the run already claimed (so it cannot finish it as
idle), and its NOTIFY reaches the claiming replica before the run is there to cancel; or the
claim read the run's ``cancel_requested`` already.

A run that fails logs one line when the failure is one of ours (an agent's error answer: the
workflow's reason says it all), and its traceback when it is anything else (a defect)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import psycopg
import pytest
from prometheus_client import REGISTRY

from agent_orchestrator.execution import Outcome
from agent_orchestrator.records import WorkflowRecords
from agent_orchestrator.run_store import RunRow
from agent_orchestrator.runner import LocalRun, WorkflowRunner
from shared.lib import metrics
from shared.lib.connections import create_pg_pool
from shared.lib.errors import RequestRejected, RunLost
from shared.lib.settings import Settings
from shared.lib.workflow_state import WorkflowStateManager


class _Runs:
    """A runner over ``pool`` whose runs succeed at once (their ids in ``executed``) and whose
    endings, recorded as the service would, come to ``finished`` as (workflow id, outcome)."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, **runner_options: Any) -> None:
        self.pool = pool
        self.executed: list[str] = []
        self.finished: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self.runner = WorkflowRunner(
            pool, settings, execute=self._execute, on_finished=self._on_finished, **runner_options
        )
        self.records = WorkflowRecords(pool, WorkflowStateManager(pool), self.runner.store)

    async def _execute(self, lr: LocalRun) -> Outcome:
        self.executed.append(lr.run.workflow_id)
        return Outcome(status="succeeded")

    async def _on_finished(self, lr: LocalRun, outcome: object) -> None:
        await self.runner.store.finish(lr.run.workflow_id)
        lr.run_finished = True
        await self.finished.put((lr.run.workflow_id, outcome))

    async def create(self, workflow_id: str, workflow_type: str = "agent_chain") -> None:
        await self.records.create(workflow_id, workflow_type, {"calls": []}, idempotency_key=None, trace={})

    async def ended(self, count: int) -> dict[str, object]:
        return dict([await asyncio.wait_for(self.finished.get(), 15) for _ in range(count)])


@contextlib.asynccontextmanager
async def _runs(database_url: str, settings: Settings, **runner_options: Any) -> AsyncIterator[_Runs]:
    pool = await create_pg_pool(database_url)
    runs = _Runs(pool, settings, **runner_options)
    try:
        yield runs
    finally:
        await runs.runner.stop()
        await pool.close()


@pytest.mark.parametrize("how", ["notice before the claim", "flag read by the claim"])
async def test_a_cancel_that_comes_while_the_run_is_claimed_stops_it_as_it_starts(
    how: str, database_url: str, settings_factory: Callable[..., Settings]
) -> None:
    cancelled, other = str(uuid.uuid4()), str(uuid.uuid4())
    async with _runs(database_url, settings_factory()) as runs:
        for workflow_id in (cancelled, other):
            await runs.create(workflow_id)
        if how == "notice before the claim":
            assert runs.runner.cancel_local(cancelled, reason="cancelled") is False  # not here (yet)
        else:
            await runs.pool.execute(
                "UPDATE workflow_runs SET cancel_requested = true WHERE workflow_id = $1", cancelled
            )
        await runs.runner.start()
        ended = await runs.ended(2)
        assert isinstance(ended[cancelled], asyncio.CancelledError), ended
        assert isinstance(ended[other], Outcome), ended  # only the cancelled one is stopped
        assert runs.executed == [other]
        state = await runs.pool.fetchval("SELECT state FROM workflow_runs WHERE workflow_id = $1", cancelled)
        assert state == "done"


async def test_a_failure_of_ours_is_one_line_and_a_defect_has_its_traceback(
    database_url: str, settings_factory: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    pool = await create_pg_pool(database_url)
    finished: asyncio.Queue[str] = asyncio.Queue()
    ours, defect = str(uuid.uuid4()), str(uuid.uuid4())

    async def execute(lr: LocalRun) -> Outcome:
        if lr.run.workflow_id == ours:
            raise RequestRejected("code-review rejected NOPE: unsupported request type")
        raise KeyError("steps")

    async def on_finished(lr: LocalRun, outcome: object) -> None:
        await runner.store.finish(lr.run.workflow_id)
        lr.run_finished = True
        await finished.put(lr.run.workflow_id)

    runner = WorkflowRunner(pool, settings_factory(), execute=execute, on_finished=on_finished)
    records = WorkflowRecords(pool, WorkflowStateManager(pool), runner.store)
    try:
        for workflow_id in (ours, defect):
            await records.create(workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={})
        with caplog.at_level(logging.WARNING, logger="agent_orchestrator.runner"):
            await runner.start()
            assert {await asyncio.wait_for(finished.get(), 15) for _ in range(2)} == {ours, defect}
        by_id = {w: [r for r in caplog.records if w in r.getMessage()] for w in (ours, defect)}
        assert [(r.levelname, r.exc_info) for r in by_id[ours]] == [("WARNING", None)], by_id
        assert "unsupported request type" in by_id[ours][0].getMessage()
        assert [r.levelname for r in by_id[defect]] == ["ERROR"]
        assert by_id[defect][0].exc_info is not None  # the traceback, to find the defect
    finally:
        await runner.stop()
        await pool.close()


async def test_a_run_cancelled_by_nobody_here_is_handed_back_not_cancelled(
    database_url: str, settings_factory: Callable[..., Settings]
) -> None:
    """A run's task cancelled from outside the runner (the event loop torn down as the process
    stops, or a node that raised SystemExit in its own task) is handed back to resume from its
    checkpoint: it was never cancelled by request, and must not be recorded as if it had been."""
    pool = await create_pg_pool(database_url)
    started: asyncio.Queue[LocalRun] = asyncio.Queue()
    finished: list[object] = []

    async def execute(lr: LocalRun) -> Outcome:
        await started.put(lr)
        await asyncio.sleep(60)
        return Outcome(status="succeeded")

    async def on_finished(lr: LocalRun, outcome: object) -> None:
        finished.append(outcome)

    runner = WorkflowRunner(pool, settings_factory(), execute=execute, on_finished=on_finished)
    records = WorkflowRecords(pool, WorkflowStateManager(pool), runner.store)
    workflow_id = str(uuid.uuid4())
    try:
        await records.create(workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={})
        await runner.start()
        lr = await asyncio.wait_for(started.get(), 15)
        assert lr.task is not None
        lr.task.cancel()  # not through cancel_local: nobody asked for it
        again = await asyncio.wait_for(started.get(), 15)  # handed back, and so claimed again
        assert (again.run.workflow_id, again.run.attempts, again.run.losses) == (workflow_id, 2, 1)  # a loss
        assert finished == []  # no outcome recorded
    finally:
        await runner.stop()
        await pool.close()


async def test_a_lost_connection_hands_a_run_back_five_times_whatever_its_attempts(
    database_url: str, settings_factory: Callable[..., Settings]
) -> None:
    """A run that fails on a lost server connection is handed back to resume from its checkpoint,
    up to five such handbacks since it last waited for a person, however many times it was
    claimed before: a pr_deployment resumed after its approval was already at attempt 3 of the 5
    it had, and a PostgreSQL restart then failed it for good. Each handback is counted, by why."""
    pool = await create_pg_pool(database_url)
    claims: list[tuple[int, int]] = []
    finished: asyncio.Queue[object] = asyncio.Queue()

    async def execute(lr: LocalRun) -> Outcome:
        claims.append((lr.run.attempts, lr.run.handbacks))
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    async def on_finished(lr: LocalRun, outcome: object) -> None:
        await runner.store.finish(lr.run.workflow_id)
        lr.run_finished = True
        await finished.put(outcome)

    runner = WorkflowRunner(pool, settings_factory(), execute=execute, on_finished=on_finished)
    records = WorkflowRecords(pool, WorkflowStateManager(pool), runner.store)
    workflow_id = str(uuid.uuid4())
    handed_back = {"type": "agent_chain", "reason": "connection_lost"}
    before = REGISTRY.get_sample_value("workflows_handed_back_total", handed_back) or 0.0
    try:
        await records.create(workflow_id, "agent_chain", {"calls": []}, idempotency_key=None, trace={})
        await pool.execute("UPDATE workflow_runs SET attempts = 4 WHERE workflow_id = $1", workflow_id)  # resumed often
        await runner.start()
        outcome = await asyncio.wait_for(finished.get(), 30)
    finally:
        await runner.stop()
        await pool.close()
    assert isinstance(outcome, psycopg.OperationalError), outcome
    assert claims == [(5 + i, i) for i in range(6)]  # handed back five times, failed at the sixth
    assert REGISTRY.get_sample_value("workflows_handed_back_total", handed_back) == before + 5


async def test_a_replica_claims_only_runs_of_the_types_it_has(
    database_url: str, settings_factory: Callable[..., Settings]
) -> None:
    """A replica without a plug-in leaves that plug-in's runs queued for a replica that has it,
    instead of claiming them and failing them with a KeyError (approvals lost)."""
    elsewhere, ours = str(uuid.uuid4()), str(uuid.uuid4())
    async with _runs(database_url, settings_factory(), workflow_types=["agent_chain"]) as runs:
        await runs.create(elsewhere, "my_plugin_type")
        await runs.create(ours)
        await runs.runner.start()
        assert list(await runs.ended(1)) == [ours]
        await asyncio.sleep(1.5)  # a claiming pass after the first (they poll every second)
        assert runs.executed == [ours]
        state = await runs.pool.fetchval("SELECT state FROM workflow_runs WHERE workflow_id = $1", elsewhere)
        assert state == "queued"


async def test_a_run_that_took_its_replica_down_too_often_fails_instead_of_running_again(
    database_url: str, settings_factory: Callable[..., Settings]
) -> None:
    """Each claim of a run whose runner died (lease run out) counts a loss; at AO_MAX_RUN_LOSSES the
    run fails with RunLost instead of taking down the next replica too (a node that exits the
    process would otherwise crash every replica in turn). A first loss is simply taken over."""
    poison, survivor = str(uuid.uuid4()), str(uuid.uuid4())
    async with _runs(database_url, settings_factory(max_run_losses=3)) as runs:
        for workflow_id, losses in ((poison, 2), (survivor, 0)):
            await runs.create(workflow_id)
            await runs.pool.execute(  # its runner died: running, under a lease that ran out
                "UPDATE workflow_runs SET state = 'running', runner_id = 'dead', attempts = $2 + 1, losses = $2, "
                "lease_expires_at = now() - interval '1 second' WHERE workflow_id = $1",
                workflow_id,
                losses,
            )
        await runs.runner.start()
        ended = await runs.ended(2)
        assert runs.executed == [survivor]
        assert isinstance(ended[survivor], Outcome)
        lost = ended[poison]
        assert isinstance(lost, RunLost), lost
        assert "its replica stopped while running it 3 times" in lost.message
        losses = await runs.pool.fetchval("SELECT losses FROM workflow_runs WHERE workflow_id = $1", survivor)
        assert losses == 1


async def test_a_stuck_run_is_reported_retried_then_failed_and_the_gauge_comes_back_to_zero(
    database_url: str, settings_factory: Callable[..., Settings]
) -> None:
    """A run with no progress for AO_STUCK_AFTER_S is reported (the hook: the workflow.stuck event;
    the workflows_stuck gauge), retried, and after its retries failed with the reason. Once it is
    gone from this replica the gauge is 0 again (it stayed 1 for ever, and WorkflowsStuck fired)."""
    pool = await create_pg_pool(database_url)
    wtype = f"stuck_{uuid.uuid4().hex[:8]}"  # a gauge series of this test's own
    reported: list[int] = []
    finished: asyncio.Queue[object] = asyncio.Queue()
    gauge_while_stuck: list[float] = []

    async def execute(lr: LocalRun) -> Outcome:
        await asyncio.sleep(60)  # no progress
        return Outcome(status="succeeded")

    async def on_stuck(run: RunRow) -> None:
        reported.append(run.attempts)

    async def on_finished(lr: LocalRun, outcome: object) -> None:
        gauge_while_stuck.append(_gauge(wtype))
        await runner.store.finish(lr.run.workflow_id)
        lr.run_finished = True
        await finished.put(outcome)

    settings = settings_factory(stuck_after_s=0.4)
    runner = WorkflowRunner(pool, settings, execute=execute, on_finished=on_finished, on_stuck=on_stuck)
    records = WorkflowRecords(pool, WorkflowStateManager(pool), runner.store)
    try:
        await records.create(str(uuid.uuid4()), wtype, {}, idempotency_key=None, trace={})
        await runner.start()
        outcome = await asyncio.wait_for(finished.get(), 30)
        assert isinstance(outcome, RuntimeError), outcome
        assert str(outcome) == "no progress for 0.4s after 3 attempts"
        assert reported == [1, 2, 3]  # each attempt reported as it got stuck
        assert gauge_while_stuck == [1.0]
        async with asyncio.timeout(10):  # the next watchdog pass finds no stuck run of the type
            while _gauge(wtype) != 0.0:
                await asyncio.sleep(0.1)
    finally:
        await runner.stop()
        await pool.close()


def _gauge(wtype: str) -> float:
    return metrics.WORKFLOWS_STUCK.labels(wtype)._value.get()  # type: ignore[attr-defined, no-any-return]
