"""Checkpoint benchmark: one superstep of a trivial graph with no checkpointer, with ours
(``PooledPostgresSaver``) at durability ``sync``, and with the stock ``AsyncPostgresSaver``.

The graph is ``START -> inc -> END`` over ``{"n": int}``, run with ``ainvoke`` on a
new thread each time: the same graph and call for every variant, so the ratio is
the cost of checkpointing. Variants are measured in interleaved rounds.

Figures:
- ``step_plain_ms``: no checkpointer (the baseline);
- ``step_checkpointed_ms``: ours at durability ``sync`` (goal: at most 2x plain);
- ``step_checkpointed_new_thread_ms``: ours, told the thread is new (the orchestrator
  says so when it launches a workflow): no opening read, and the input and step-0
  checkpoints ride with the node's statement (one commit per run);
- ``step_checkpointed_async_commit_ms``: ours with ``AO_CHECKPOINT_SYNCHRONOUS_COMMIT=false``
  (no WAL flush wait per commit);
- ``step_checkpointed_new_thread_async_commit_ms``: both (what the orchestrator's first run of a
  workflow pays with that setting);
- ``stock_step_checkpointed_ms``: the stock saver at its default durability (``async``);
- ``stock_step_sync_ms``: the stock saver at ``sync``, like for like with ours;
- ``step_inmemory_sync_ms``: LangGraph's ``InMemorySaver`` at ``sync``: LangGraph's own
  checkpointing work with no I/O at all, the floor any saver stands on;
- ``pg_insert_commit_ms`` / ``pg_read_ms``: a bare one-row autocommit INSERT and ``SELECT 1`` on
  the same pool; ``step_checkpointed_floor_ms`` adds them up as a superstep at ``sync`` must pay
  them in sequence (the in-memory step, one read, one commit per checkpoint): the best a
  PostgreSQL saver that writes each checkpoint as LangGraph hands it over could do here (the
  new-thread hint goes below it: the opening checkpoints wait for the node's commit);
- ``step_checkpointed_ratio`` / ``stock_step_ratio`` / ...``_ratio``: each over ``step_plain_ms``;
- ``checkpoint_commits_per_run`` / ``stock_commits_per_run``: write transactions per run at
  ``sync`` (each a commit waiting for the WAL flush), from the server's transaction ids;
- ``pooled_concurrent_runs_per_s`` / ``stock_concurrent_runs_per_s``: runs per second with
  ``CONCURRENT`` runs in flight on one saver over one pool, at ``sync``: upstream's
  process-wide lock (langgraph#7259) against none.

Run alone: ``uv run python -m support.bench.checkpoint``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypedDict

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from agent_orchestrator.checkpointer import NEW_THREAD_KEY, PooledPostgresSaver
from support.bench.harness import Op, Plan, Progress, SuiteResult, measure, quantiles, say, standalone, throughput

__all__ = ["run", "run_detailed"]

PLAN = Plan(warmup=200, rounds=10, per_round=150)
CONCURRENT = 16
CONCURRENT_S = 3.0
POOL_SIZE = 8


class _State(TypedDict, total=False):
    n: int


async def _inc(state: _State) -> dict[str, int]:
    return {"n": state.get("n", 0) + 1}


def _graph(checkpointer: Any = None) -> Any:
    g = StateGraph(_State)
    g.add_node("inc", _inc)
    g.add_edge(START, "inc")
    g.add_edge("inc", END)
    return g.compile(checkpointer=checkpointer)


def _run_op(graph: Any, *, durability: str | None, **configurable: Any) -> Op:
    async def op() -> None:
        config = {"configurable": {"thread_id": uuid.uuid4().hex, **configurable}}
        kwargs = {"durability": durability} if durability else {}
        await graph.ainvoke({"n": 1}, config, **kwargs)

    return op


async def _commits_per_run(url: str, op: Op, *, runs: int = 10) -> float:
    """Write transactions (each a commit that waits for the WAL flush) per run, from the server's
    transaction ids: exact when nothing else writes to the server meanwhile."""
    async with await AsyncConnection[DictRow].connect(url, autocommit=True, row_factory=dict_row) as conn:

        async def xid() -> int:
            row = await (await conn.execute("SELECT pg_current_xact_id()::text AS x")).fetchone()
            assert row is not None
            return int(row["x"])

        await op()
        before = await xid()
        for _ in range(runs):
            await op()
        return (await xid() - before - 1) / runs


async def _async_commit(conn: AsyncConnection[DictRow]) -> None:
    await conn.execute("SET synchronous_commit = off")


@contextlib.asynccontextmanager
async def _pool(url: str, *, synchronous_commit: bool = True) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """A pool set up as ``open_checkpointer`` sets up the orchestrator's."""
    kwargs = {"autocommit": True, "row_factory": dict_row, "prepare_threshold": 5}
    pool = AsyncConnectionPool(
        url,
        connection_class=AsyncConnection[DictRow],
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        open=False,
        kwargs=kwargs,
        configure=None if synchronous_commit else _async_commit,
    )
    await pool.open(wait=True, timeout=30)
    try:
        yield pool
    finally:
        await pool.close()


def _bare_ops(pool: Any) -> dict[str, Op]:
    """The floor under any saver: a one-row autocommit INSERT (one commit) and a trivial read."""

    async def insert_commit() -> None:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO bench_commit (v) VALUES (%s)", ("x",))

    async def read() -> None:
        async with pool.connection() as conn:
            await (await conn.execute("SELECT 1")).fetchone()

    return {"pg_insert_commit": insert_commit, "pg_read": read}


def _figures(timings: dict[str, Any], commits: float, stock_commits: float) -> dict[str, float]:
    plain = timings["plain"].p50
    # What a superstep can cost at best: LangGraph's own checkpointing (the in-memory saver) plus,
    # in sequence, the opening read and one commit per checkpoint (writes ride with them).
    floor = timings["inmemory_sync"].p50 + timings["pg_read"].p50 + commits * timings["pg_insert_commit"].p50
    return {
        "step_plain_ms": plain,
        "step_plain_p99_ms": timings["plain"].p99,
        "step_checkpointed_ms": timings["ours_sync"].p50,
        "step_checkpointed_p99_ms": timings["ours_sync"].p99,
        "step_checkpointed_new_thread_ms": timings["ours_sync_new_thread"].p50,
        "step_checkpointed_async_commit_ms": timings["ours_sync_async_commit"].p50,
        "step_checkpointed_new_thread_async_commit_ms": timings["ours_sync_new_thread_async_commit"].p50,
        "stock_step_checkpointed_ms": timings["stock_default"].p50,
        "stock_step_sync_ms": timings["stock_sync"].p50,
        "step_inmemory_sync_ms": timings["inmemory_sync"].p50,
        "pg_insert_commit_ms": timings["pg_insert_commit"].p50,
        "pg_read_ms": timings["pg_read"].p50,
        "step_checkpointed_floor_ms": floor,
        "step_checkpointed_ratio": timings["ours_sync"].p50 / plain,
        "step_checkpointed_new_thread_ratio": timings["ours_sync_new_thread"].p50 / plain,
        "step_checkpointed_async_commit_ratio": timings["ours_sync_async_commit"].p50 / plain,
        "step_checkpointed_new_thread_async_commit_ratio": timings["ours_sync_new_thread_async_commit"].p50 / plain,
        "stock_step_ratio": timings["stock_default"].p50 / plain,
        "step_inmemory_ratio": timings["inmemory_sync"].p50 / plain,
        "step_checkpointed_floor_ratio": floor / plain,
        "checkpoint_commits_per_run": commits,
        "stock_commits_per_run": stock_commits,
    }


async def _latencies(url: str, pool: Any, progress: Progress) -> SuiteResult:
    ours = PooledPostgresSaver(pool)
    async with AsyncPostgresSaver.from_conn_string(url) as stock_saver, _pool(url, synchronous_commit=False) as fast:
        ops = {
            "plain": _run_op(_graph(), durability=None),
            "inmemory_sync": _run_op(_graph(InMemorySaver()), durability="sync"),
            "ours_sync": _run_op(_graph(ours), durability="sync"),
            "ours_sync_new_thread": _run_op(_graph(ours), durability="sync", **{NEW_THREAD_KEY: True}),
            "ours_sync_async_commit": _run_op(_graph(PooledPostgresSaver(fast)), durability="sync"),
            "ours_sync_new_thread_async_commit": _run_op(
                _graph(PooledPostgresSaver(fast)), durability="sync", **{NEW_THREAD_KEY: True}
            ),
            "stock_default": _run_op(_graph(stock_saver), durability=None),
            "stock_sync": _run_op(_graph(stock_saver), durability="sync"),
            **_bare_ops(pool),
        }
        timings = await measure(ops, plan=PLAN, progress=progress, label="checkpoint")
        commits = await _commits_per_run(url, ops["ours_sync"])
        stock_commits = await _commits_per_run(url, ops["stock_sync"])
    distributions = {f"checkpoint {name}": quantiles(t.samples_ms) for name, t in timings.items()}
    return SuiteResult(figures=_figures(timings, commits, stock_commits), distributions=distributions)


async def _concurrency(url: str, pool: Any, progress: Progress) -> dict[str, float]:
    """Runs per second with CONCURRENT in flight: one pooled saver without the lock, one with it."""
    say(progress, f"checkpoint: {CONCURRENT} concurrent runs, our saver against the stock one on a pool")
    ours = _run_op(_graph(PooledPostgresSaver(pool)), durability="sync")
    stock = _run_op(_graph(AsyncPostgresSaver(pool)), durability="sync")
    return {
        "pooled_concurrent_runs_per_s": await throughput(ours, in_flight=CONCURRENT, duration_s=CONCURRENT_S),
        "stock_concurrent_runs_per_s": await throughput(stock, in_flight=CONCURRENT, duration_s=CONCURRENT_S),
    }


async def run_detailed(settings: Any, *, progress: Progress = None) -> SuiteResult:
    """Measure on ``settings.database_url`` (a fresh database; the saver's tables are set up here)."""
    url = settings.database_url
    async with await AsyncConnection[DictRow].connect(url, autocommit=True, row_factory=dict_row) as conn:
        await AsyncPostgresSaver(conn).setup()
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_commit (id bigserial PRIMARY KEY, v text)")
    async with _pool(url) as pool:
        result = await _latencies(url, pool, progress)
        result.figures.update(await _concurrency(url, pool, progress))
    result.figures["concurrent_speedup_vs_stock"] = (
        result.figures["pooled_concurrent_runs_per_s"] / result.figures["stock_concurrent_runs_per_s"]
    )
    result.notes["checkpoint"] = _note(result.figures)
    return result


def _note(f: dict[str, float]) -> str:
    """Where a checkpointed superstep's time goes, in words, from this run's figures."""
    return (
        f"A run of the one-node graph at durability sync writes 3 checkpoints (input, __start__, the "
        f"node), one after the other; ours commits {f['checkpoint_commits_per_run']:.0f} times per run, "
        f"each checkpoint one statement carrying the task writes (the stock saver: "
        f"{f['stock_commits_per_run']:.0f} commits). LangGraph's own "
        f"checkpointing, with no I/O at all, costs {f['step_inmemory_ratio']:.2f}x plain; one autocommit "
        f"INSERT here takes {f['pg_insert_commit_ms']:.3f} ms (a WAL flush) and a read {f['pg_read_ms']:.3f} ms, "
        f"so a saver committing each checkpoint as it comes cannot go below "
        f"{f['step_checkpointed_floor_ratio']:.2f}x plain on this machine; ours measures "
        f"{f['step_checkpointed_ratio']:.2f}x ({f['step_checkpointed_async_commit_ratio']:.2f}x without waiting for "
        f"the WAL flush). Told the thread is new (as the orchestrator's first run of a workflow is), it "
        f"skips the read and commits once: {f['step_checkpointed_new_thread_ratio']:.2f}x, and "
        f"{f['step_checkpointed_new_thread_async_commit_ratio']:.2f}x without the WAL flush wait: the one "
        f"statement's own cost keeps it above 2x."
    )


async def run(settings: Any, *, progress: Progress = None) -> dict[str, float]:
    return (await run_detailed(settings, progress=progress)).figures


if __name__ == "__main__":
    standalone(run)
