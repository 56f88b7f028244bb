"""The ``agent_chain`` workflow type on a real bus and a real checkpointer: calls in order,
outputs returned, the first failed call fails the run naming it, bad input refused; a
step run again after its checkpoint was lost gets its stored answers, and a subgraph
cannot call agents at durability ``async``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.graph import START, StateGraph
from pydantic import BaseModel

from agent_orchestrator.agent_calls import KEYS_OUTLIVE_CHECKPOINTS, BusAgentCalls
from agent_orchestrator.checkpointer import PooledPostgresSaver, open_checkpointer
from agent_orchestrator.run_locks import RunLocks
from agent_orchestrator.workflows import WorkflowContext, builtin_workflow_types
from agent_orchestrator.workflows.agent_chain import AGENT_CHAIN
from shared.lib.connections import connect_redis, create_pg_pool
from shared.lib.errors import InvalidInput, OrchestratorError, RequestRejected, ServiceUnavailable
from shared.lib.event_bus import EventBus
from shared.lib.multi_agent_state import MultiAgentState
from shared.lib.resource_lock import ResourceLockManager
from shared.lib.settings import Settings

# agent_calls passes tenacity's ``initial=``, which tenacity 9.1 deprecates in favour of ``multiplier=``.
pytestmark = pytest.mark.filterwarnings("ignore:The 'initial' parameter is deprecated:DeprecationWarning")


HANDLED: list[tuple[str, str]] = []
"""(agent, idempotency key) of every request an agent's handler ran."""


async def _echo(name: str, request: Any) -> dict[str, Any]:
    HANDLED.append((name, request.idempotency_key))
    if request.request_type == "FAIL":
        raise InvalidInput("this request always fails", field="payload")
    if request.request_type == "NOPE":  # as an agent built on the SDK answers a type it does not declare
        raise RequestRejected(f"{name} does not handle 'NOPE'; supported request types: ECHO", field="request_type")
    if request.request_type == "FLAKY" and sum(k.startswith(request.payload["key"]) for _, k in HANDLED) <= 2:
        raise ServiceUnavailable("down for a moment")  # retryable: the caller tries again
    return {"by": name, **request.payload}


@pytest.fixture
async def context_factory(settings_factory: Callable[..., Settings]) -> AsyncIterator[Callable[[str], Any]]:
    """A WorkflowContext per workflow id, over a bus that serves the agents ``alpha`` and ``beta``."""
    settings = settings_factory(request_timeout_s=5.0)
    assert settings.redis_url is not None
    assert settings.database_url is not None
    redis = await connect_redis(settings.redis_url)
    pool = await create_pg_pool(settings.database_url, max_size=4)
    bus = EventBus(redis, settings)
    servers = [
        asyncio.create_task(bus.serve(n, lambda r, n=n: _echo(n, r), concurrency=4, consumer=f"{n}-1"))
        for n in ("alpha", "beta")
    ]
    async with ResourceLockManager(pool, settings) as manager:

        def make(workflow_id: str) -> WorkflowContext:
            calls = BusAgentCalls(bus, settings, workflow_id=workflow_id, correlation_id=workflow_id)
            return WorkflowContext(workflow_id, settings, calls, RunLocks(manager, owner=workflow_id))

        await asyncio.sleep(0.3)  # consumer groups exist before the first request
        yield make
    await bus.stop_serving(grace_s=1)
    for task in servers:
        task.cancel()
    await asyncio.gather(*servers, return_exceptions=True)
    await bus.close()
    await pool.close()
    await redis.aclose()


@pytest.fixture
async def saver(settings_factory: Callable[..., Settings]) -> AsyncIterator[PooledPostgresSaver]:
    async with open_checkpointer(settings_factory(), max_size=4) as s:
        yield s


async def _run(
    saver: PooledPostgresSaver,
    make: Callable[[str], Any],
    calls: list[dict[str, Any]],
    *,
    workflow_id: str | None = None,
    durability: Any = "sync",
) -> dict[str, Any]:
    workflow_id = workflow_id or str(uuid.uuid4())
    graph = AGENT_CHAIN.build().compile(checkpointer=saver)
    state = {"workflow_id": workflow_id, "input": AGENT_CHAIN.validate_input({"calls": calls}), "iteration": 0}
    config = {"configurable": {"thread_id": workflow_id, KEYS_OUTLIVE_CHECKPOINTS: durability != "sync"}}
    out: dict[str, Any] = await graph.ainvoke(state, config, context=make(workflow_id), durability=durability)  # type: ignore[arg-type]
    return out


def test_agent_chain_is_a_builtin_type() -> None:
    """agent_chain is registered among the built-in workflow types."""
    assert builtin_workflow_types()["agent_chain"] is AGENT_CHAIN


async def test_calls_run_in_order_and_outputs_come_back(
    saver: PooledPostgresSaver, context_factory: Callable[[str], Any]
) -> None:
    """Each call goes to its agent in order; the result lists every output and who answered."""
    calls = [
        {"agent": "alpha", "request_type": "ECHO", "payload": {"i": 0}},
        {"agent": "beta", "request_type": "ECHO", "payload": {"i": 1}},
        {"agent": "alpha", "request_type": "ECHO", "payload": {"i": 2}},
    ]
    out = await _run(saver, context_factory, calls)
    assert out["outcome"] == "succeeded"
    assert out["result"]["outputs"] == [{"by": "alpha", "i": 0}, {"by": "beta", "i": 1}, {"by": "alpha", "i": 2}]
    assert [c["agent"] for c in out["result"]["calls"]] == ["alpha", "beta", "alpha"]
    assert out["iteration"] == 3


@pytest.mark.parametrize(
    ("request_type", "says", "code"),
    [("FAIL", "always fails", "invalid_input"), ("NOPE", "does not handle 'NOPE'", "rejected")],
)
async def test_failed_call_fails_the_run_naming_it(
    saver: PooledPostgresSaver, context_factory: Callable[[str], Any], request_type: str, says: str, code: str
) -> None:
    """The first call answered with an error stops the chain; the error names the call (counted
    from 0) and the agent, and keeps the agent's code (a bad payload, an unknown request type)."""
    calls = [
        {"agent": "alpha", "request_type": "ECHO", "payload": {}},
        {"agent": "beta", "request_type": request_type, "payload": {}},
        {"agent": "alpha", "request_type": "ECHO", "payload": {}},
    ]
    HANDLED.clear()
    with pytest.raises(OrchestratorError, match=rf"call 1 \(beta {request_type}\) failed: .*{says}") as e:
        await _run(saver, context_factory, calls)
    assert (e.value.code, e.value.retryable) == (code, False)
    assert [agent for agent, _ in HANDLED] == ["alpha", "beta"], "a permanent error is not retried"


async def test_a_transient_error_is_retried_with_a_fresh_key(
    saver: PooledPostgresSaver, context_factory: Callable[[str], Any]
) -> None:
    """An agent answering with a retryable error is called again after a backoff, under the key
    with the attempt number (the error is stored under the first); the third attempt's answer
    is the call's."""
    workflow_id = str(uuid.uuid4())
    calls = [{"agent": "alpha", "request_type": "FLAKY", "payload": {"key": f"wf:{workflow_id}:"}}]
    HANDLED.clear()
    out = await _run(saver, context_factory, calls, workflow_id=workflow_id)
    assert out["result"]["outputs"] == [{"by": "alpha", "key": f"wf:{workflow_id}:"}]
    keys = [key for _, key in HANDLED]
    assert [k.removeprefix(keys[0]) for k in keys] == ["", "~1", "~2"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"calls": []}, "calls"),
        ({"calls": [{"agent": "Not An Id", "request_type": "X"}]}, "agent"),
        ({"calls": [{"agent": "alpha", "request_type": ""}]}, "request_type"),
        ({"calls": [{"agent": "alpha", "request_type": "X", "payload": [1]}]}, "payload"),
    ],
)
def test_bad_input_is_refused_naming_the_field(data: dict[str, Any], field: str) -> None:
    """Input that cannot be a chain is refused, naming the offending field."""
    with pytest.raises(ValueError, match=field):
        AGENT_CHAIN.validate_input(data)


def test_input_model_is_documented() -> None:
    """The input schema describes every field, for GET /workflow-types."""
    schema = AGENT_CHAIN.input_schema()
    assert isinstance(AGENT_CHAIN.input_model, type)
    assert issubclass(AGENT_CHAIN.input_model, BaseModel)
    assert schema["properties"]["calls"]["description"]
    assert "call_next" in AGENT_CHAIN.mermaid()


async def test_a_step_run_again_without_its_checkpoint_gets_stored_answers(
    saver: PooledPostgresSaver, context_factory: Callable[[str], Any]
) -> None:
    """At durability ``async`` a crash may lose checkpoints whose calls were made. The run then
    starts again from what is stored (here: nothing, every checkpoint deleted) and the same
    calls get the same keys: each agent ran each call once, and the outputs are the same."""
    calls = [
        {"agent": a, "request_type": "ECHO", "payload": {"i": i}} for i, a in enumerate(["alpha", "beta", "alpha"])
    ]
    workflow_id = str(uuid.uuid4())
    HANDLED.clear()
    first = await _run(saver, context_factory, calls, workflow_id=workflow_id, durability="async")
    keys = [key for _, key in HANDLED]
    assert len(keys) == len(set(keys)) == 3
    async with saver.conn.connection() as conn:  # type: ignore[union-attr]
        for table in ("checkpoint_writes", "checkpoint_blobs", "checkpoints"):
            await conn.execute(f"DELETE FROM {table} WHERE thread_id = %s", (workflow_id,))
    again = await _run(saver, context_factory, calls, workflow_id=workflow_id, durability="async")
    assert again["result"] == first["result"]
    assert [key for _, key in HANDLED] == keys, "a call ran twice"
    assert all(key.startswith(f"wf:{workflow_id}:") and "call_next" in key for key in keys)


async def test_a_subgraph_cannot_call_agents_at_durability_async(
    saver: PooledPostgresSaver, context_factory: Callable[[str], Any]
) -> None:
    """A subgraph's node has no key that survives its parent's lost checkpoint: at durability
    ``async`` its call is refused, naming the fix; at ``sync`` it is made."""
    inner = AGENT_CHAIN.build().compile()

    async def run_inner(state: MultiAgentState, config: RunnableConfig) -> dict[str, Any]:
        out = await inner.ainvoke(state, config)
        return {"result": out["result"], "outcome": out["outcome"]}

    outer = StateGraph(MultiAgentState, context_schema=WorkflowContext)
    outer.add_node("inner", run_inner)
    outer.add_edge(START, "inner")
    graph = outer.compile(checkpointer=saver)
    calls = AGENT_CHAIN.validate_input({"calls": [{"agent": "alpha", "request_type": "ECHO", "payload": {}}]})
    for durability in ("async", "sync"):
        workflow_id = str(uuid.uuid4())
        config = {"configurable": {"thread_id": workflow_id, KEYS_OUTLIVE_CHECKPOINTS: durability != "sync"}}
        run = graph.ainvoke(
            {"workflow_id": workflow_id, "input": calls, "iteration": 0},
            config,  # type: ignore[arg-type]
            context=context_factory(workflow_id),
            durability=durability,  # type: ignore[arg-type]
        )
        if durability == "async":
            with pytest.raises(OrchestratorError, match="durability='sync'"):
                await run
        else:
            assert (await run)["outcome"] == "succeeded"
