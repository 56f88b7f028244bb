"""A launch is one statement: the workflow, its queued run and its first event; the replicas are
woken once it commits (real PostgreSQL and Redis)."""

from __future__ import annotations

import asyncio
import uuid

from agent_orchestrator.records import Launched, WorkflowRecords
from agent_orchestrator.run_store import RUNS_CHANNEL, RunStore
from shared.lib.agent_events import Event
from shared.lib.connections import Along, connect_postgres
from shared.lib.event_bus import EventBus
from shared.lib.workflow_state import WorkflowStateManager
from support.tests.integration.conftest import BusFactory


def _pending(bus: EventBus, workflow_id: str) -> Along:
    return bus.insert_along(
        ("workflow.status", {"status": "pending"}), aggregate_type="workflow", aggregate_id=workflow_id
    )


async def _launch(records: WorkflowRecords, bus: EventBus, workflow_id: str) -> Launched:
    """A launch with the idempotency key ``k1`` and its pending event."""
    return await records.create(
        workflow_id, "agent_chain", {"calls": []}, idempotency_key="k1", trace={}, events=[_pending(bus, workflow_id)]
    )


async def test_a_launch_writes_its_queued_run_and_event_in_one_statement_and_notifies(
    make_bus: BusFactory, database_url: str
) -> None:
    bus = await make_bus()
    assert bus.pool is not None
    listener = await connect_postgres(database_url)
    woken: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(RUNS_CHANNEL, lambda _c, _pid, _ch, payload: woken.put_nowait(payload))
    records = WorkflowRecords(
        bus.pool, WorkflowStateManager(bus.pool), RunStore(bus.pool, runner_id="r1", lease_ttl_s=30)
    )
    workflow_id, refused_id = str(uuid.uuid4()), str(uuid.uuid4())
    seen: list[Event] = []
    sub = await bus.subscribe("workflow.*", seen.append)
    try:
        launched = await _launch(records, bus, workflow_id)
        assert launched.created
        assert launched.run is None  # queued for any replica, not claimed
        assert launched.record.workflow_id == workflow_id
        assert await asyncio.wait_for(woken.get(), 5) == workflow_id
        run = await records.run_store.get(workflow_id)
        assert run is not None
        assert run.state == "queued"
        [row] = launched.events
        stored = await bus.events_since(0, aggregate_id=workflow_id)
        assert [(e.id, e.event_type, e.payload) for e in stored] == [
            (row["id"], "workflow.status", {"status": "pending"})
        ]
        [event] = await bus.announce(row)
        assert event == stored[0]
        async with asyncio.timeout(5):
            while not seen:
                await asyncio.sleep(0.01)
        assert seen == [event]

        again = await _launch(records, bus, refused_id)
        assert (again.record.workflow_id, again.created, again.events) == (workflow_id, False, [])
        assert await records.run_store.get(refused_id) is None  # the refused launch wrote no run
        assert await bus.events_since(0, aggregate_id=refused_id) == []  # and no event
    finally:
        await sub.close()
        await listener.close()


async def test_a_launch_claimed_here_starts_running_with_both_events_in_order(make_bus: BusFactory) -> None:
    bus = await make_bus()
    assert bus.pool is not None
    store = RunStore(bus.pool, runner_id="r1", lease_ttl_s=30)
    records = WorkflowRecords(bus.pool, WorkflowStateManager(bus.pool), store)
    workflow_id = str(uuid.uuid4())
    events = bus.insert_along(
        ("workflow.status", {"status": "pending"}),
        ("workflow.status", {"status": "running", "attempt": 1}),
        aggregate_type="workflow",
        aggregate_id=workflow_id,
    )
    launched = await records.create(
        workflow_id,
        "agent_chain",
        {"calls": []},
        idempotency_key=None,
        trace={},
        claim=True,
        first_step="call_next",
        events=[events],
    )
    assert (launched.record.status, launched.record.current_step) == ("running", "call_next")
    assert [row["payload"]["status"] for row in launched.events] == ["pending", "running"]
    assert launched.events[0]["id"] < launched.events[1]["id"]
    stored = await bus.events_since(0, aggregate_id=workflow_id)
    assert [e.id for e in stored] == [row["id"] for row in launched.events]
    run = await store.get(workflow_id)
    assert run is not None
    assert (run.state, run.runner_id) == ("running", "r1")
