"""The API's live event feeds on a real Redis: one subscription, each event handed to its workflow's streams only."""

from __future__ import annotations

import asyncio

from agent_orchestrator.event_watch import WorkflowWatch
from support.tests.integration.conftest import BusFactory


async def test_a_feed_gets_its_own_workflows_events_only(make_bus: BusFactory) -> None:
    """Events another process stores come through Redis; this process's own come at once, and
    once only, though Redis brings them again."""
    bus, other = await make_bus(), await make_bus()
    watch = WorkflowWatch(bus)
    try:
        async with watch.follow("wf-a") as a, watch.follow("wf-a") as a2, watch.follow("wf-b") as b:
            assert a.stale  # a new stream starts from the table
            assert b.stale
            emitted = await other.emit("workflow.node", {"node": "x"}, aggregate_type="workflow", aggregate_id="wf-b")
            await asyncio.wait_for(b.arrived.wait(), 5)
            assert [e.id for e in b.take()] == [emitted.id]
            await asyncio.sleep(0.2)  # time for a stray event to reach the other feeds
            assert not a.arrived.is_set()
            assert a.take() == []
            status = await bus.emit(
                "workflow.status", {"status": "running"}, aggregate_type="workflow", aggregate_id="wf-a"
            )
            assert a.arrived.is_set()  # handed over as soon as stored
            assert a2.arrived.is_set()
            assert [e.payload for e in a.take()] == [{"status": "running"}] == [e.payload for e in a2.take()]
            await asyncio.sleep(0.2)  # its copy from Redis arrives meanwhile
            assert a2.take() == []
            assert not a2.arrived.is_set()
            assert status.id > emitted.id
        assert watch.following == 0  # streams that ended leave nothing behind
        assert len(bus._subscriptions) == 1  # one subscription for every stream of the process
    finally:
        await watch.close()
    assert not bus._subscriptions


async def test_a_lost_subscription_marks_every_feed_stale_then_follows_again(make_bus: BusFactory) -> None:
    """Events published while the subscription reconnects are missed live: the feeds say so."""
    bus, other = await make_bus(), await make_bus()
    watch = WorkflowWatch(bus)
    try:
        async with watch.follow("wf-a") as a:
            a.take()
            a.stale = False  # as a stream leaves it after its first read of the table
            for c in await bus.redis.client_list(_type="pubsub"):
                await bus.redis.client_kill_filter(_id=c["id"])
            await asyncio.wait_for(a.arrived.wait(), 5)
            assert a.stale  # the stream reads the table again
            a.take()
            await other.emit("workflow.node", {"node": "y"}, aggregate_type="workflow", aggregate_id="wf-a")
            await asyncio.wait_for(a.arrived.wait(), 5)
            assert [e.payload for e in a.take()] == [{"node": "y"}]
    finally:
        await watch.close()


async def test_the_subscription_closes_when_nobody_follows_and_opens_again(make_bus: BusFactory) -> None:
    """A replica no stream watches stops receiving every event; the next stream subscribes again."""
    bus, other = await make_bus(), await make_bus()
    watch = WorkflowWatch(bus, linger_s=0.2)
    try:
        async with watch.follow("wf-a"):
            assert watch.subscribed
        async with watch.follow("wf-a"):  # followed again within the linger: kept open
            await asyncio.sleep(0.3)
            assert watch.subscribed
        async with asyncio.timeout(5):
            while watch.subscribed:
                await asyncio.sleep(0.05)
        assert not bus._subscriptions  # closed on Redis too, and no longer handed this bus's events
        async with watch.follow("wf-a") as feed:
            assert watch.subscribed
            assert feed.stale  # it reads the table first, so nothing published meanwhile is lost
            feed.take()
            emitted = await other.emit("workflow.node", {"node": "z"}, aggregate_type="workflow", aggregate_id="wf-a")
            await asyncio.wait_for(feed.arrived.wait(), 5)
            assert [e.id for e in feed.take()] == [emitted.id]
    finally:
        await watch.close()
    assert not bus._subscriptions


async def test_a_feed_opened_before_its_workflow_exists_has_no_table_to_read(make_bus: BusFactory) -> None:
    """``follow(new=True)`` starts fresh, since every event of a workflow launched after it comes
    live; a lost subscription still makes it stale."""
    bus = await make_bus()
    watch = WorkflowWatch(bus)
    try:
        async with watch.follow("wf-new", new=True) as fresh, watch.follow("wf-old") as old:
            assert not fresh.stale
            assert old.stale
            stored = await bus.emit(
                "workflow.status", {"status": "pending"}, aggregate_type="workflow", aggregate_id="wf-new"
            )
            assert [e.id for e in fresh.take()] == [stored.id]
            for c in await bus.redis.client_list(_type="pubsub"):
                await bus.redis.client_kill_filter(_id=c["id"])
            await asyncio.wait_for(fresh.arrived.wait(), 5)
            assert fresh.stale
    finally:
        await watch.close()
