"""Checkpoint hygiene on real PostgreSQL with the real saver."""

from __future__ import annotations

import operator
import uuid
from typing import Annotated, Any, TypedDict

import asyncpg
from langgraph.graph import END, START, StateGraph

from agent_orchestrator.checkpointer import open_checkpointer
from agent_orchestrator.housekeeping import prune_finished
from shared.lib.connections import create_pg_pool
from shared.lib.settings import Settings


class _State(TypedDict, total=False):
    seen: Annotated[list[str], operator.add]


def _graph(saver: Any) -> Any:
    g = StateGraph(_State)
    for name in ("a", "b", "c"):
        g.add_node(name, lambda _s, n=name: {"seen": [n]})
    g.add_edge(START, "a")
    g.add_edge("a", "b")
    g.add_edge("b", "c")
    g.add_edge("c", END)
    return g.compile(checkpointer=saver)


async def _finished_workflow(pool: asyncpg.Pool, graph: Any, *, age_s: float) -> str:
    wf_id = str(uuid.uuid4())
    await graph.ainvoke({"seen": []}, {"configurable": {"thread_id": wf_id}}, durability="sync")
    await pool.execute(
        "INSERT INTO workflows (id, workflow_type, status, completed_at) "
        "VALUES ($1, 't', 'succeeded', now() - make_interval(secs => $2))",
        wf_id,
        age_s,
    )
    await pool.execute("INSERT INTO workflow_runs (workflow_id, workflow_type, state) VALUES ($1, 't', 'done')", wf_id)
    return wf_id


async def _history(graph: Any, wf_id: str) -> list[Any]:
    return [s async for s in graph.aget_state_history({"configurable": {"thread_id": wf_id}})]


async def test_finished_workflows_past_retention_keep_only_their_final_state(
    settings_factory: Any, database_url: str
) -> None:
    """Pruning leaves one checkpoint with the final state, and spares workflows inside retention."""
    settings: Settings = settings_factory()
    pool = await create_pg_pool(database_url)
    try:
        async with open_checkpointer(settings) as saver:
            graph = _graph(saver)
            old = await _finished_workflow(pool, graph, age_s=3600)
            fresh = await _finished_workflow(pool, graph, age_s=0)
            assert len(await _history(graph, old)) >= 4
            pruned = await prune_finished(pool, saver, retention_s=600)
            assert pruned == [old]
            kept = await _history(graph, old)
            assert len(kept) == 1
            assert kept[0].values["seen"] == ["a", "b", "c"]
            assert len(await _history(graph, fresh)) >= 4
            assert await prune_finished(pool, saver, retention_s=600) == []
    finally:
        await pool.close()
