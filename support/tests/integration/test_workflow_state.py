"""Workflow metadata against a real PostgreSQL: optimistic locking, checkpoints, listing, cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from typing import Any

import asyncpg
import pytest

from shared.lib.agent_events import Event
from shared.lib.connections import create_pg_pool
from shared.lib.errors import Conflict, InvalidInput, NotFound
from shared.lib.event_bus import EventBus, Subscription
from shared.lib.workflow_state import Workflow, WorkflowStateManager
from support.tests.integration.conftest import BusFactory


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pg_pool(database_url, min_size=2, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
def states(pool: asyncpg.Pool) -> WorkflowStateManager:
    return WorkflowStateManager(pool)


async def test_create_and_get_round_trip(states: WorkflowStateManager) -> None:
    """A created workflow is pending at version 1 with its input, and reads back the same, in UTC."""
    wf = await states.create_workflow("pr_deployment", {"repo": "acme/api"}, idempotency_key="launch-1")
    assert (wf.status, wf.version, wf.input, wf.agents) == ("pending", 1, {"repo": "acme/api"}, [])
    assert wf.created_at.utcoffset() == timedelta(0)
    assert await states.get_workflow(wf.id) == wf
    assert await states.find_by_idempotency_key("launch-1") == wf
    with pytest.raises(Conflict) as err:
        await states.create_workflow("pr_deployment", {}, idempotency_key="launch-1")
    assert (err.value.field, err.value.resource) == ("idempotency_key", wf.id)
    with pytest.raises(NotFound):
        await states.get_workflow("no-such-workflow")


async def test_racing_writers_one_wins_one_conflicts(states: WorkflowStateManager) -> None:
    """Two writers update from the same version at once: one wins, the other gets Conflict
    carrying the current version, and the winner's change is the one stored."""
    wf = await states.create_workflow("self_healing", {})
    results = await asyncio.gather(
        states.update_state(wf.id, {"writer": "a"}, "code-review", wf.version),
        states.update_state(wf.id, {"writer": "b"}, "cicd", wf.version),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    losses = [r for r in results if isinstance(r, Conflict)]
    assert len(wins) == 1
    assert len(losses) == 1
    assert losses[0].details["current_version"] == wf.version + 1
    stored = await states.get_workflow(wf.id)
    assert stored.version == wf.version + 1
    assert stored.state == wins[0].state
    assert stored.agents == wins[0].agents


async def test_update_state_merges_and_tracks_agents(states: WorkflowStateManager) -> None:
    """Updates merge top-level keys, each agent is listed once, and every write bumps the version."""
    wf = await states.create_workflow("parallel_docs", {}, state={"modules": 3})
    wf = await states.update_state(wf.id, {"done": 1}, "documentation", wf.version)
    wf = await states.update_state(wf.id, {"done": 2}, "documentation", wf.version)
    wf = await states.update_state(wf.id, {"reviewed": True}, "code-review", wf.version)
    assert wf.state == {"modules": 3, "done": 2, "reviewed": True}
    assert wf.agents == ["documentation", "code-review"]
    assert wf.version == 4
    with pytest.raises(InvalidInput) as err:
        await states.update_state(wf.id, {"x": 1}, "Not An Agent!", wf.version)
    assert err.value.field == "agent_id"


async def test_update_step_checks_the_version_it_is_given(states: WorkflowStateManager) -> None:
    """update_step bumps the version atomically, and a stale expected_version is refused."""
    wf = await states.create_workflow("pr_deployment", {})
    steps = await asyncio.gather(*(states.update_step(wf.id, f"step-{i}", agents=["cicd"]) for i in range(10)))
    assert sorted(s.version for s in steps) == list(range(2, 12))  # no lost update
    with pytest.raises(Conflict) as err:
        await states.update_step(wf.id, "late", expected_version=wf.version)
    assert err.value.details["current_version"] == 11
    current = await states.update_step(wf.id, "review", agents=["code-review"], expected_version=11)
    assert (current.current_step, current.version, current.agents) == ("review", 12, ["cicd", "code-review"])


async def test_checkpoint_restore_gives_back_the_checkpointed_state(states: WorkflowStateManager) -> None:
    """Restoring a checkpoint puts back its state and step as a new version; a stale version is refused."""
    wf = await states.create_workflow("self_healing", {})
    wf = await states.update_step(wf.id, "diagnose")
    wf = await states.update_state(wf.id, {"iteration": 1, "hypothesis": "disk"}, "infrastructure", wf.version)
    cp = await states.checkpoint(wf.id, label="before fix")
    wf = await states.update_step(wf.id, "fix")
    wf = await states.update_state(wf.id, {"iteration": 2, "hypothesis": "dns"}, "infrastructure", wf.version)
    with pytest.raises(Conflict) as err:
        await states.restore_checkpoint(wf.id, cp.id, expected_version=wf.version - 1)
    assert err.value.details["current_version"] == wf.version
    restored = await states.restore_checkpoint(wf.id, cp.id, expected_version=wf.version)
    assert restored.state == {"iteration": 1, "hypothesis": "disk"}
    assert restored.current_step == "diagnose"
    assert restored.version == wf.version + 1
    assert [c.label for c in await states.get_checkpoints(wf.id)] == ["before fix"]
    with pytest.raises(NotFound):
        await states.restore_checkpoint(wf.id, cp.id + 1000, expected_version=restored.version)


async def test_finished_workflow_refuses_changes(states: WorkflowStateManager) -> None:
    """complete_workflow sets the terminal status and result once; later changes get Conflict."""
    wf = await states.create_workflow("pr_deployment", {})
    running = await states.set_status(wf.id, "running")
    assert running.started_at is not None
    done = await states.complete_workflow(
        wf.id, status="failed", result={"deployed": False}, errors=[{"step": "deploy", "message": "boom"}]
    )
    assert (done.status, done.result, done.is_terminal) == ("failed", {"deployed": False}, True)
    assert done.completed_at is not None
    assert done.completed_at.tzinfo == UTC or done.completed_at.utcoffset() == timedelta(0)
    with pytest.raises(Conflict) as err:
        await states.complete_workflow(wf.id, status="succeeded")
    assert err.value.details["status"] == "failed"
    with pytest.raises(Conflict):
        await states.update_state(wf.id, {"x": 1}, "cicd", done.version)
    with pytest.raises(InvalidInput) as bad:
        await states.complete_workflow(wf.id, status="running")
    assert bad.value.field == "status"


async def test_list_filters_and_pages_with_a_cursor(states: WorkflowStateManager) -> None:
    """Listing is newest first, filters by status and type, and the cursor walks every row once."""
    created = [await states.create_workflow("parallel_docs" if i % 2 else "self_healing", {}) for i in range(7)]
    await states.set_status(created[0].id, "running")
    seen: list[str] = []
    cursor = None
    while True:
        page = await states.list_workflows(limit=3, cursor=cursor)
        seen += [w.id for w in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [w.id for w in reversed(created)]
    docs = await states.list_workflows(workflow_type="parallel_docs")
    assert {w.id for w in docs.items} == {w.id for w in created[1::2]}
    running = await states.list_workflows(status="running")
    assert [w.id for w in running.items] == [created[0].id]
    for kwargs, field in [({"cursor": "garbage!"}, "cursor"), ({"status": "done"}, "status"), ({"limit": 0}, "limit")]:
        with pytest.raises(InvalidInput) as err:
            await states.list_workflows(**kwargs)  # type: ignore[arg-type]
        assert err.value.field == field


async def test_statistics_and_cleanup_obey_their_arguments(states: WorkflowStateManager, pool: asyncpg.Pool) -> None:
    """statistics counts by status and type; cleanup deletes only workflows finished before its cut-off."""
    old = await states.create_workflow("pr_deployment", {})
    recent = await states.create_workflow("pr_deployment", {})
    active = await states.create_workflow("self_healing", {})
    await states.checkpoint(old.id)
    for wf in (old, recent):
        await states.complete_workflow(wf.id, result={})
    async with pool.acquire() as c:
        await c.execute("UPDATE workflows SET completed_at = now() - interval '2 days' WHERE id = $1", old.id)
    stats = await states.statistics()
    assert stats["total"] == 3
    assert stats["by_status"]["succeeded"] == 2
    assert stats["by_status"]["pending"] == 1
    assert stats["by_type"]["pr_deployment"] == {"succeeded": 2}
    assert "pr_deployment" in stats["mean_duration_s"]
    assert await states.cleanup(timedelta(days=3)) == 0
    assert await states.cleanup(timedelta(days=1)) == 1
    with pytest.raises(NotFound):
        await states.get_workflow(old.id)
    assert (await states.get_workflow(recent.id)).status == "succeeded"
    assert await states.cleanup(0) == 1  # the recent one; the active one is never deleted
    assert (await states.get_workflow(active.id)).status == "pending"
    async with pool.acquire() as c:
        assert await c.fetchval("SELECT count(*) FROM workflow_checkpoints") == 0
    with pytest.raises(InvalidInput):
        await states.cleanup(-5)


async def test_create_joins_the_callers_transaction(states: WorkflowStateManager, pool: asyncpg.Pool) -> None:
    """With conn=, the insert belongs to the caller's transaction and rolls back with it."""

    async with pool.acquire() as c:
        tx = c.transaction()
        await tx.start()
        wf = await states.create_workflow("pr_deployment", {}, workflow_id="wf-rolled-back", conn=c)
        assert (await states.get_workflow(wf.id, conn=c)).id == "wf-rolled-back"
        await tx.rollback()
    with pytest.raises(NotFound):
        await states.get_workflow("wf-rolled-back")


async def _watched_workflow(
    make_bus: BusFactory,
) -> tuple[EventBus, WorkflowStateManager, Workflow, asyncio.Queue[Event], Subscription]:
    """A bus, its state manager, a new workflow, and a queue of the ``workflow.*`` events published."""
    bus = await make_bus()
    assert bus.pool is not None
    states = WorkflowStateManager(bus.pool)
    wf = await states.create_workflow("agent_chain", {})
    seen: asyncio.Queue[Event] = asyncio.Queue()
    return bus, states, wf, seen, await bus.subscribe("workflow.*", seen.put_nowait)


async def test_a_change_and_its_event_commit_together_or_not_at_all(make_bus: BusFactory) -> None:
    """emit_after: the step and its event are one statement; a finished workflow takes neither."""
    bus, states, wf, seen, sub = await _watched_workflow(make_bus)

    async def emit(change: tuple[str, list[Any]], event_type: str, data: dict[str, Any]) -> Event | None:
        return await bus.emit_after(change, event_type, data, aggregate_type="workflow", aggregate_id=wf.id)

    try:
        event = await emit(
            states.step_change(wf.id, "call:0", agents=["noop-1"]), "workflow.node", {"node": "call_next"}
        )
        assert event is not None
        assert (await asyncio.wait_for(seen.get(), 5)).id == event.id  # published once committed
        after = await states.get_workflow(wf.id)
        assert (after.current_step, after.agents, after.version) == ("call:0", ["noop-1"], wf.version + 1)
        running = await emit(states.status_change(wf.id, "running"), "workflow.status", {"status": "running"})
        assert running is not None
        assert (await states.get_workflow(wf.id)).status == "running"

        await states.complete_workflow(wf.id, status="cancelled")
        refused = await emit(states.step_change(wf.id, "call:1"), "workflow.node", {"node": "call_next"})
        assert refused is None
        assert [e.id for e in await bus.events_since(0, aggregate_id=wf.id)] == [event.id, running.id]
        assert (await states.get_workflow(wf.id)).current_step == "call:0"
        with pytest.raises(InvalidInput):
            states.step_change(wf.id, "")  # the same checks as update_step, before anything is sent
    finally:
        await sub.close()


async def test_events_before_a_change_and_a_completion_with_its_last_step(make_bus: BusFactory) -> None:
    """emit_after with ``before``: several events in one statement, in order, all published; a
    completion that records the last step and its agents too; a refused change stores none."""
    bus, states, wf, seen, sub = await _watched_workflow(make_bus)
    nodes = [("workflow.node", {"node": "call_next", "i": i}) for i in range(3)]
    try:
        done = await bus.emit_after(
            states.completion_change(wf.id, status="succeeded", result={"n": 3}, step="call:2", agents=["a", "b"]),
            "workflow.status",
            {"status": "succeeded"},
            aggregate_type="workflow",
            aggregate_id=wf.id,
            before=nodes,
        )
        assert done is not None
        stored = await bus.events_since(0, aggregate_id=wf.id)
        assert [(e.event_type, e.payload) for e in stored] == [*nodes, ("workflow.status", {"status": "succeeded"})]
        assert [e.id for e in stored] == sorted(e.id for e in stored)
        assert stored[-1].id == done.id
        assert [(await asyncio.wait_for(seen.get(), 5)).id for _ in stored] == [e.id for e in stored]
        after = await states.get_workflow(wf.id)
        assert (after.status, after.result, after.current_step, after.agents) == (
            "succeeded",
            {"n": 3},
            "call:2",
            ["a", "b"],
        )
        refused = await bus.emit_after(
            states.step_change(wf.id, "call:3"), "workflow.node", {"node": "x"}, aggregate_id=wf.id, before=nodes
        )
        assert refused is None
        assert len(await bus.events_since(0, aggregate_id=wf.id)) == len(stored)
    finally:
        await sub.close()
