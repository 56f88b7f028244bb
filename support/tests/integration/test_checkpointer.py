"""PooledPostgresSaver on real PostgreSQL: checkpoints, interrupts and resumes, history,
pending writes of a failed superstep, and rows the stock saver reads back the same."""

from __future__ import annotations

import asyncio
import operator
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt
from psycopg_pool import AsyncConnectionPool

from agent_orchestrator.checkpointer import NEW_THREAD_KEY, WRITE_BEHIND_KEY, PooledPostgresSaver, open_checkpointer
from shared.lib.connections import create_pg_pool, with_ctes
from shared.lib.settings import Settings


class State(TypedDict, total=False):
    n: int
    log: Annotated[list[str], operator.add]
    doc: dict[str, Any]
    answer: str


@pytest.fixture
async def saver(settings_factory: Callable[..., Settings]) -> AsyncIterator[PooledPostgresSaver]:
    async with open_checkpointer(settings_factory(), max_size=8) as s:
        yield s


@pytest.fixture
async def stock(saver: PooledPostgresSaver, database_url: str) -> AsyncIterator[AsyncPostgresSaver]:
    async with AsyncPostgresSaver.from_conn_string(database_url) as s:
        yield s


def _config(thread_id: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id or uuid.uuid4().hex, **extra}}


def _chain(*, second_takes_s: float = 0.0) -> StateGraph[Any, Any, Any, Any]:
    async def first(s: State) -> dict[str, Any]:
        return {"n": s.get("n", 0) + 1, "log": ["first"], "doc": {"seen": [s.get("n", 0)]}}

    async def second(s: State) -> dict[str, Any]:
        if second_takes_s:
            await asyncio.sleep(second_takes_s)
        return {"n": s["n"] * 10, "log": ["second"]}

    g = StateGraph(State)
    g.add_node("first", first)
    g.add_node("second", second)
    g.add_edge(START, "first")
    g.add_edge("first", "second")
    g.add_edge("second", END)
    return g


#: (source, step) of a ``_chain`` run's checkpoints, newest first.
_CHAIN_HISTORY = [("loop", 2), ("loop", 1), ("loop", 0), ("input", -1)]


def _approval() -> StateGraph[Any, Any, Any, Any]:
    async def ask(s: State) -> dict[str, Any]:
        return {"answer": str(interrupt({"question": "ship it?", "n": s["n"]})), "log": ["ask"]}

    async def done(s: State) -> dict[str, Any]:
        return {"log": [f"done:{s['answer']}"]}

    g = StateGraph(State)
    g.add_node("ask", ask)
    g.add_node("done", done)
    g.add_edge(START, "ask")
    g.add_edge("ask", "done")
    g.add_edge("done", END)
    return g


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
async def test_run_checkpoints_final_state(saver: PooledPostgresSaver, durability: str) -> None:
    """A finished run's latest checkpoint holds the final state, at every durability."""
    graph = _chain().compile(checkpointer=saver)
    config = _config()
    out = await graph.ainvoke({"n": 4}, config, durability=durability)  # type: ignore[arg-type]
    assert out == {"n": 50, "log": ["first", "second"], "doc": {"seen": [4]}}
    snapshot = await graph.aget_state(config)  # type: ignore[arg-type]
    assert snapshot.values == out
    assert snapshot.next == ()


async def test_interrupt_then_resume_from_checkpoint(saver: PooledPostgresSaver) -> None:
    """An interrupted run is stored with its question; a fresh graph resumes it to the end."""
    config = _config()
    first = _approval().compile(checkpointer=saver)
    await first.ainvoke({"n": 7}, config, durability="sync")  # type: ignore[arg-type]
    snapshot = await first.aget_state(config)  # type: ignore[arg-type]
    assert snapshot.next == ("ask",)
    assert snapshot.interrupts[0].value == {"question": "ship it?", "n": 7}

    resumed = _approval().compile(checkpointer=saver)
    out = await resumed.ainvoke(Command(resume="yes"), config, durability="sync")  # type: ignore[arg-type]
    assert out["log"] == ["ask", "done:yes"]
    assert (await resumed.aget_state(config)).next == ()  # type: ignore[arg-type]


async def test_history_lists_every_step_newest_first(saver: PooledPostgresSaver) -> None:
    """The history lists one checkpoint per superstep, newest first, each pointing at its parent."""
    graph = _chain().compile(checkpointer=saver)
    config = _config()
    await graph.ainvoke({"n": 1}, config, durability="sync")  # type: ignore[arg-type]
    history = [cp async for cp in graph.aget_state_history(config)]  # type: ignore[arg-type]
    assert [cp.metadata["step"] for cp in history if cp.metadata] == [2, 1, 0, -1]
    ids = [cp.config["configurable"]["checkpoint_id"] for cp in history]
    parents = [cp.parent_config["configurable"]["checkpoint_id"] for cp in history[:-1] if cp.parent_config]
    assert parents == ids[1:]
    listed = [t async for t in saver.alist(config, limit=2)]  # type: ignore[arg-type]
    assert [t.config["configurable"]["checkpoint_id"] for t in listed] == ids[:2]


async def test_failed_superstep_keeps_sibling_writes(saver: PooledPostgresSaver) -> None:
    """When one of two parallel tasks fails, the other's writes are kept and it is not run again."""
    runs = {"ok": 0, "flaky": 0}

    async def ok(_: State) -> dict[str, Any]:
        runs["ok"] += 1
        return {"log": ["ok"]}

    async def flaky(_: State) -> dict[str, Any]:
        runs["flaky"] += 1
        if runs["flaky"] == 1:
            raise RuntimeError("first attempt fails")
        return {"log": ["flaky"]}

    g = StateGraph(State)
    g.add_node("ok", ok)
    g.add_node("flaky", flaky)
    g.add_edge(START, "ok")
    g.add_edge(START, "flaky")
    graph = g.compile(checkpointer=saver)
    config = _config()
    with pytest.raises(RuntimeError, match="first attempt"):
        await graph.ainvoke({"n": 0}, config, durability="sync")  # type: ignore[arg-type]
    pending = (await saver.aget_tuple(config)).pending_writes  # type: ignore[arg-type,union-attr]
    assert ("log", ["ok"]) in [(w[1], w[2]) for w in pending]
    out = await graph.ainvoke(None, config, durability="sync")  # type: ignore[arg-type]
    assert sorted(out["log"]) == ["flaky", "ok"]
    assert runs == {"ok": 1, "flaky": 2}


async def test_stock_saver_reads_what_ours_wrote(saver: PooledPostgresSaver, stock: AsyncPostgresSaver) -> None:
    """Rows written by our saver read back identically through the stock AsyncPostgresSaver."""
    config = _config()
    await _approval().compile(checkpointer=saver).ainvoke({"n": 3}, config, durability="sync")  # type: ignore[arg-type]
    ours, theirs = await saver.aget_tuple(config), await stock.aget_tuple(config)  # type: ignore[arg-type]
    assert ours is not None
    assert theirs is not None
    assert ours.checkpoint == theirs.checkpoint
    assert ours.metadata == theirs.metadata
    assert ours.pending_writes == theirs.pending_writes
    resumed = _approval().compile(checkpointer=stock)
    out = await resumed.ainvoke(Command(resume="no"), config)  # type: ignore[arg-type]
    assert out["log"] == ["ask", "done:no"]


async def test_new_thread_hint_skips_nothing_it_should_not(saver: PooledPostgresSaver) -> None:
    """The new-thread hint runs a fresh thread normally; reading it back still finds the checkpoints."""
    graph = _chain().compile(checkpointer=saver)
    thread = uuid.uuid4().hex
    out = await graph.ainvoke({"n": 2}, _config(thread, **{NEW_THREAD_KEY: True}), durability="sync")  # type: ignore[arg-type]
    assert out["n"] == 30
    assert await saver.aget_tuple(_config(thread, **{NEW_THREAD_KEY: True})) is None  # type: ignore[arg-type]
    assert (await saver.aget_tuple(_config(thread))) is not None  # type: ignore[arg-type]


async def test_a_new_threads_opening_checkpoints_ride_with_its_first_nodes_statement(
    saver: PooledPostgresSaver, stock: AsyncPostgresSaver
) -> None:
    """Told the thread is new, the saver writes its input checkpoint and step 0's (after
    ``__start__``) with the first node's: two statements fewer, and the same history as the
    stock saver reads it."""
    graph = _chain().compile(checkpointer=saver)
    thread = uuid.uuid4().hex
    before = saver.stats.statements
    out = await graph.ainvoke({"n": 2}, _config(thread, **{NEW_THREAD_KEY: True}), durability="sync")  # type: ignore[arg-type]
    assert out["n"] == 30
    assert saver.stats.statements - before == 2  # first (carrying the input and step 0), second
    assert not saver._deferred, "a deferred checkpoint left behind"
    ours = [c async for c in saver.alist(_config(thread))]  # type: ignore[arg-type]
    theirs = [c async for c in stock.alist(_config(thread))]  # type: ignore[arg-type]
    assert [(c.metadata["source"], c.metadata["step"]) for c in theirs] == _CHAIN_HISTORY
    assert [c.checkpoint["id"] for c in ours] == [c.checkpoint["id"] for c in theirs]
    parent = theirs[-2].parent_config
    assert parent is not None
    assert parent["configurable"]["checkpoint_id"] == theirs[-1].checkpoint["id"]  # step 0's parent: the input


async def test_a_new_thread_stopped_before_its_first_node_keeps_its_checkpoint_once_flushed(
    saver: PooledPostgresSaver,
) -> None:
    """A run that stops before any node ran (``interrupt_before`` its first node) sends nothing
    itself: ``flush`` (which the orchestrator calls after every first run) writes what was held
    back, and the thread resumes from it."""
    graph = _chain().compile(checkpointer=saver, interrupt_before=["first"])
    thread = uuid.uuid4().hex
    before = saver.stats.statements
    await graph.ainvoke({"n": 2}, _config(thread, **{NEW_THREAD_KEY: True}), durability="sync")  # type: ignore[arg-type]
    assert saver.stats.statements == before
    assert await saver.aget_tuple(_config(thread)) is None  # type: ignore[arg-type]
    await saver.flush(thread)
    assert not saver._deferred
    state = await graph.aget_state(_config(thread))  # type: ignore[arg-type]
    assert state.next == ("first",)
    assert state.values["n"] == 2
    out = await graph.ainvoke(None, _config(thread), durability="sync")  # type: ignore[arg-type]
    assert out["n"] == 30
    await saver.flush(thread)  # nothing held back any more: no statement
    assert saver.stats.statements == before + 3


async def test_a_write_behind_window_writes_the_steps_together_and_flush_sends_the_rest(
    saver: PooledPostgresSaver, stock: AsyncPostgresSaver
) -> None:
    """At durability async with a write-behind window, the steps' checkpoints wait to go together:
    none is written before the window runs out, ``flush`` sends what is held in one statement,
    and the history is the one the stock saver reads for a run written step by step."""
    graph = _chain().compile(checkpointer=saver)
    thread = uuid.uuid4().hex
    before = saver.stats.statements
    out = await graph.ainvoke({"n": 2}, _config(thread, **{WRITE_BEHIND_KEY: 30.0}), durability="async")  # type: ignore[arg-type]
    assert out["n"] == 30
    assert saver.stats.statements == before  # all held: the window has not run out
    await saver.flush(thread)
    assert saver.stats.statements == before + 1
    assert not saver._deferred
    history = [c async for c in stock.alist(_config(thread))]  # type: ignore[arg-type]
    assert [(c.metadata["source"], c.metadata["step"]) for c in history] == _CHAIN_HISTORY
    assert history[0].checkpoint["channel_values"]["n"] == 30


async def test_held_checkpoints_taken_go_in_the_callers_statement(
    saver: PooledPostgresSaver, stock: AsyncPostgresSaver, database_url: str
) -> None:
    """``take_held`` hands what is held over as statements for another (asyncpg) statement, as
    the orchestrator writes a finished run's checkpoints with its outcome: one commit for both,
    and the history the stock saver reads is whole."""
    graph = _chain().compile(checkpointer=saver)
    thread = uuid.uuid4().hex
    before = saver.stats.statements
    await graph.ainvoke({"n": 2}, _config(thread, **{WRITE_BEHIND_KEY: 30.0}), durability="async")  # type: ignore[arg-type]
    held = await saver.take_held(thread)
    assert held
    assert not saver._deferred
    pool = await create_pg_pool(database_url, max_size=1)  # the JSON codecs the event bus uses
    try:
        ctes, args = with_ctes("held", held, [thread])
        await pool.execute(f"WITH {', '.join(ctes)} SELECT $1::text", *args)
    finally:
        await pool.close()
    assert saver.stats.statements == before  # the saver sent none of it
    history = [c async for c in stock.alist(_config(thread))]  # type: ignore[arg-type]
    assert [c.metadata["step"] for c in history] == [2, 1, 0, -1]
    assert history[0].checkpoint["channel_values"]["n"] == 30
    assert await saver.take_held(thread) == []


async def test_held_checkpoints_are_written_when_their_window_runs_out(saver: PooledPostgresSaver) -> None:
    """Without a flush, what a window holds is written once the window has run out."""
    graph = _chain().compile(checkpointer=saver)
    thread = uuid.uuid4().hex
    await graph.ainvoke({"n": 2}, _config(thread, **{WRITE_BEHIND_KEY: 0.05}), durability="async")  # type: ignore[arg-type]
    for _ in range(100):
        if not saver._deferred and not saver._writing:
            break
        await asyncio.sleep(0.02)
    state = await graph.aget_state(_config(thread))  # type: ignore[arg-type]
    assert state.values["n"] == 30
    assert state.next == ()


async def test_a_held_write_that_fails_is_raised_by_the_flush(saver: PooledPostgresSaver, database_url: str) -> None:
    """A window's write the server refuses fails the run's flush (the orchestrator records no
    outcome over checkpoints that were not stored)."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE checkpoints ADD CONSTRAINT refuse_doomed CHECK (thread_id NOT LIKE 'doomed-%')")
        graph = _chain().compile(checkpointer=saver)
        thread = f"doomed-{uuid.uuid4().hex}"
        await graph.ainvoke({"n": 2}, _config(thread, **{WRITE_BEHIND_KEY: 0.01}), durability="async")  # type: ignore[arg-type]
        await asyncio.sleep(0.1)  # the window ran out and its write failed
        with pytest.raises(Exception, match="refuse_doomed"):
            await saver.flush(thread)
        await saver.flush(thread)  # raised once
    finally:
        await conn.close()


async def test_a_checkpoint_held_while_a_write_before_it_fails_is_never_stored_alone(
    saver: PooledPostgresSaver, database_url: str
) -> None:
    """A window's write that fails (step 1, refused here; a dead connection after a PostgreSQL
    restart in the field) while the next step is already held: the next step is not written on
    its own, every put after it raises until the run's flush, and the flush ends that. Step 2
    was written without its parents and their blobs, and the run resumed from it without its
    ``input`` (KeyError)."""
    import asyncpg

    # step 1's window runs out while the second node runs, and its write blocks on the lock
    graph = _chain(second_takes_s=0.3).compile(checkpointer=saver)
    thread = f"doomed-{uuid.uuid4().hex}"
    refused = "thread_id NOT LIKE 'doomed-%' OR (metadata->>'step')::int <> 1"
    conn, blocker = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        await conn.execute(f"ALTER TABLE checkpoints ADD CONSTRAINT refuse_step_1 CHECK ({refused})")
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute("LOCK TABLE checkpoints IN SHARE MODE")  # step 1's write waits here
        await graph.ainvoke({"n": 2}, _config(thread, **{WRITE_BEHIND_KEY: 0.05}), durability="async")  # type: ignore[arg-type]
        await asyncio.sleep(0.2)  # step 2 is held, its window ran out: its write waits for step 1's
        await blocking.rollback()
        for _ in range(100):
            if not saver._writing:
                break
            await asyncio.sleep(0.02)
        steps = await conn.fetch("SELECT metadata->>'step' AS step FROM checkpoints WHERE thread_id = $1", thread)
        with pytest.raises(Exception, match="refuse_step_1"):
            await saver.flush(thread)
    finally:
        await blocker.close()
        await conn.close()
    assert steps == []
    assert not [k for k in saver._deferred if k[0] == thread]
    await saver.flush(thread)  # the flush ended it


async def test_idle_connections_a_restart_killed_are_dropped_not_used(
    saver: PooledPostgresSaver, database_url: str
) -> None:
    """Every idle connection of the pool killed by the server (as a PostgreSQL restart leaves
    them): the next runs and reads take live ones, and none fails (each dead one failed a run's
    attempt with AdminShutdown, and reads answered 503, long after PostgreSQL was back)."""
    import asyncpg

    graph = _chain().compile(checkpointer=saver)
    await asyncio.gather(*(graph.ainvoke({"n": i}, _config(), durability="sync") for i in range(8)))  # type: ignore[arg-type]
    pool = saver.conn
    assert isinstance(pool, AsyncConnectionPool)
    opened = pool.get_stats()["pool_size"]
    assert opened >= 2
    conn = await asyncpg.connect(database_url)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'idle'"
        )
    finally:
        await conn.close()
    assert killed >= opened
    await asyncio.sleep(0.2)  # the backends are gone and their sockets say so
    for i in range(opened + 2):
        thread = uuid.uuid4().hex
        out = await graph.ainvoke({"n": i}, _config(thread), durability="sync")  # type: ignore[arg-type]
        assert out["n"] == (i + 1) * 10
        assert (await graph.aget_state(_config(thread))).values["n"] == (i + 1) * 10  # type: ignore[arg-type]


async def test_a_new_thread_failing_at_once_keeps_its_input_checkpoint(saver: PooledPostgresSaver) -> None:
    """A first node that raises: its error write carries the deferred input checkpoint along."""

    async def broken(_s: State) -> dict[str, Any]:
        raise RuntimeError("boom")

    g = StateGraph(State)
    g.add_node("broken", broken)
    g.add_edge(START, "broken")
    g.add_edge("broken", END)
    thread = uuid.uuid4().hex
    with pytest.raises(RuntimeError, match="boom"):
        await g.compile(checkpointer=saver).ainvoke(
            {"n": 1}, _config(thread, **{NEW_THREAD_KEY: True}), durability="sync"
        )  # type: ignore[arg-type]
    history = [c async for c in saver.alist(_config(thread))]  # type: ignore[arg-type]
    assert [c.metadata["source"] for c in history][-1] == "input"
    assert not saver._deferred


async def test_a_held_back_input_checkpoint_is_written_on_its_own_after_a_while_never_dropped(
    saver: PooledPostgresSaver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new thread's opening checkpoints wait for its first node's statement, but not for ever:
    a first node that runs long (pr_deployment's lock_repo, queued behind another run's lock) or a
    run that stopped before it sends nothing for a while, and the held rows are then written on
    their own. They were once dropped after a minute, and a run whose first node waited that long
    lost its input checkpoint: the next node failed with KeyError: 'input' after its approval."""
    from langgraph.checkpoint.base import empty_checkpoint

    monkeypatch.setattr("agent_orchestrator.checkpointer._DEFERRED_MAX_S", 0.2)
    config = {"configurable": {"thread_id": "slow-first-node", "checkpoint_ns": "", NEW_THREAD_KEY: True}}
    before = saver.stats.statements
    await saver.aput(config, empty_checkpoint(), {"source": "input", "step": -1, "parents": {}}, {})  # type: ignore[arg-type, typeddict-item]
    assert saver.stats.statements == before  # held back, nothing sent
    await asyncio.sleep(1.0)  # the first node runs long
    assert ("slow-first-node", "") not in saver._deferred
    history = [c async for c in saver.alist({"configurable": {"thread_id": "slow-first-node"}})]  # type: ignore[arg-type]
    assert [c.metadata["source"] for c in history] == ["input"]


@pytest.mark.parametrize("durability", ["sync", "async"])
async def test_a_first_node_that_outlasts_the_hold_keeps_the_whole_history(
    saver: PooledPostgresSaver, stock: AsyncPostgresSaver, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """The opening checkpoints written on their own while the first node still runs: the run
    goes on, and the history is the one the stock saver reads for any run, input first."""
    from langgraph.checkpoint.base import empty_checkpoint

    monkeypatch.setattr("agent_orchestrator.checkpointer._DEFERRED_MAX_S", 0.1)

    async def slow_first(s: State) -> dict[str, Any]:
        await asyncio.sleep(0.5)
        other = {"configurable": {"thread_id": uuid.uuid4().hex, "checkpoint_ns": "", NEW_THREAD_KEY: True}}
        await saver.aput(other, empty_checkpoint(), {"source": "input", "step": -1, "parents": {}}, {})  # type: ignore[arg-type, typeddict-item]  # another launch meanwhile
        return {"n": s.get("n", 0) + 1, "log": ["first"]}

    graph = StateGraph(State)
    graph.add_node("first", slow_first)
    graph.add_node("second", lambda s: {"n": s["n"] * 10, "log": ["second"]})
    graph.add_edge(START, "first")
    graph.add_edge("first", "second")
    graph.add_edge("second", END)
    thread = uuid.uuid4().hex
    config = _config(thread, **{NEW_THREAD_KEY: True})
    out = await graph.compile(checkpointer=saver).ainvoke({"n": 2}, config, durability=durability)  # type: ignore[arg-type]
    await saver.flush(thread)
    assert out["n"] == 30
    theirs = [c async for c in stock.alist(_config(thread))]  # type: ignore[arg-type]
    assert [(c.metadata["source"], c.metadata["step"]) for c in theirs] == _CHAIN_HISTORY
    assert theirs[0].checkpoint["channel_values"]["n"] == 30


async def test_writes_share_statements_with_checkpoints(saver: PooledPostgresSaver) -> None:
    """At durability sync, task writes ride with the next checkpoint: one statement per superstep."""
    graph = _chain().compile(checkpointer=saver)
    before = saver.stats.statements
    await graph.ainvoke({"n": 1}, _config(), durability="sync")  # type: ignore[arg-type]
    # input checkpoint, then one per superstep (__start__, first, second); every write merged.
    assert saver.stats.statements - before == 4
    assert saver.stats.merged_write_batches >= 3


async def test_concurrent_threads_on_one_saver(saver: PooledPostgresSaver) -> None:
    """Many threads run at once on one saver, each ending with its own state and nothing retained."""
    graph = _chain().compile(checkpointer=saver)
    threads = [uuid.uuid4().hex for _ in range(24)]
    outs = await asyncio.gather(
        *(graph.ainvoke({"n": i}, _config(t), durability="sync") for i, t in enumerate(threads))  # type: ignore[arg-type]
    )
    assert [o["n"] for o in outs] == [(i + 1) * 10 for i in range(24)]
    for i, t in enumerate(threads):
        assert (await graph.aget_state(_config(t))).values["doc"] == {"seen": [i]}  # type: ignore[arg-type]
    assert not saver._waiting, "write batches left behind"
    assert not saver._puts, "in-flight checkpoints left behind"


async def test_async_commit_setting_reaches_the_pool(settings_factory: Callable[..., Settings]) -> None:
    """With checkpoint_synchronous_commit off, the saver's sessions skip the WAL flush and still checkpoint."""
    async with open_checkpointer(settings_factory(checkpoint_synchronous_commit=False), max_size=2) as s:
        async with s.conn.connection() as conn:  # type: ignore[union-attr]
            row = await (await conn.execute("SHOW synchronous_commit")).fetchone()
        assert row == {"synchronous_commit": "off"}
        out = await _chain().compile(checkpointer=s).ainvoke({"n": 1}, _config(), durability="sync")  # type: ignore[arg-type]
        assert out["n"] == 20


async def test_failed_checkpoint_fails_the_writes_riding_with_it(saver: PooledPostgresSaver, database_url: str) -> None:
    """When a checkpoint's statement fails, the task writes it carried fail with it: nothing half-written."""
    import asyncpg

    doomed = "thread_id NOT LIKE 'doomed-%' OR (metadata->>'step')::int < 0"  # the input checkpoint passes
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"ALTER TABLE checkpoints ADD CONSTRAINT refuse_doomed CHECK ({doomed})")
        graph = _chain().compile(checkpointer=saver)
        thread = f"doomed-{uuid.uuid4().hex}"
        with pytest.raises(Exception, match="refuse_doomed"):
            await graph.ainvoke({"n": 1}, _config(thread), durability="sync")  # type: ignore[arg-type]
        rows = {t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE thread_id = $1", thread) for t in _TABLES}
    finally:
        await conn.close()
    # The input checkpoint and its blob stand; __start__'s writes rode with the refused checkpoint.
    assert rows == {"checkpoints": 1, "checkpoint_blobs": 1, "checkpoint_writes": 0}


_TABLES = ("checkpoints", "checkpoint_writes", "checkpoint_blobs")
