"""The API's live event wake-ups on a real Redis: one subscription, only the workflow's own streams woken."""

from __future__ import annotations

import asyncio

from agent_orchestrator.event_watch import WorkflowWatch
from support.tests.integration.conftest import BusFactory


async def test_a_stream_wakes_on_its_own_workflows_events_only(make_bus: BusFactory) -> None:
    bus = await make_bus()
    watch = WorkflowWatch(bus)
    try:
        async with watch.follow("wf-a") as a, watch.follow("wf-a") as a2, watch.follow("wf-b") as b:
            await bus.emit("workflow.node", {"node": "x"}, aggregate_type="workflow", aggregate_id="wf-b")
            await asyncio.wait_for(b.wait(), 5)
            await asyncio.sleep(0.2)  # time for a stray wake-up of the other streams to arrive
            assert not a.is_set()
            assert not a2.is_set()
            await bus.emit("workflow.status", {"status": "running"}, aggregate_type="workflow", aggregate_id="wf-a")
            await asyncio.wait_for(asyncio.gather(a.wait(), a2.wait()), 5)
        assert watch.following == 0  # streams that ended leave nothing behind
        assert len(bus._subscriptions) == 1  # one subscription for every stream of the process
    finally:
        await watch.close()
    assert not bus._subscriptions
