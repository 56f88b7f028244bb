"""The orchestrator: launches, runs, resumes and cancels workflows.

One :class:`Orchestrator` per process, built in the API's lifespan. It owns the
workflow runner (background runs with leases), turns a claimed run into a graph
execution with a :class:`WorkflowContext`, and reports every transition as a
``workflow.*`` event on the bus (stored in the ``events`` table, so the API's
event stream can replay them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from langgraph.graph.state import CompiledStateGraph

from agent_orchestrator.agent_calls import BusAgentCalls
from agent_orchestrator.checkpointer import PooledPostgresSaver
from agent_orchestrator.event_watch import WorkflowWatch
from agent_orchestrator.execution import Outcome, run_graph, write_behind_s
from agent_orchestrator.node_events import NodeEvent, NodeEvents, merged_agents
from agent_orchestrator.records import Launched, WorkflowRecord, WorkflowRecords
from agent_orchestrator.run_locks import RunLocks
from agent_orchestrator.run_store import RunRow, RunStore
from agent_orchestrator.runner import LocalRun, WorkflowRunner
from agent_orchestrator.workflows import WorkflowContext, WorkflowType, unknown_workflow_type
from shared.lib import metrics
from shared.lib.connections import Along
from shared.lib.errors import Conflict, InvalidInput, OrchestratorError
from shared.lib.event_bus import CHANGE_APPLIED, EventBus
from shared.lib.resource_lock import ResourceLockManager
from shared.lib.settings import Settings
from shared.lib.tracing import finish_workflow_trace, start_workflow_trace, trace_headers, workflow_context
from shared.lib.workflow_state import TERMINAL_STATUSES, WorkflowStateManager

__all__ = ["Orchestrator"]

_log = logging.getLogger(__name__)

#: Workflow locks are held for the run; their TTL covers a long pipeline, renewed never.
_RUN_LOCK_TTL_S = 3600.0
#: The largest result (or errors list) a terminal event carries, as JSON.
_RESULT_IN_EVENT_MAX_BYTES = 64 * 1024


@dataclass
class Orchestrator:
    settings: Settings
    records: WorkflowRecords
    bus: EventBus
    locks: ResourceLockManager
    saver: Any
    types: dict[str, WorkflowType]
    runner: WorkflowRunner | None = None
    failed_types: dict[str, str] = field(default_factory=dict)  # LoadedTypes.failed: why a plug-in is not in types

    def __post_init__(self) -> None:
        self._graphs: dict[str, CompiledStateGraph[Any, Any, Any, Any]] = {}
        self.watch = WorkflowWatch(self.bus)  # live wake-ups of the API's event streams

    def preinitialize_metrics(self) -> None:
        """Zero series for every type, node and terminal status, so dashboards see the first ones."""
        for name, wtype in self.types.items():
            nodes = [n for n in wtype.build().nodes if not n.startswith("__")]
            metrics.preinitialize(metrics.WORKFLOW_NODE_DURATION, *((name, n) for n in nodes))
            metrics.preinitialize(metrics.WORKFLOW_DURATION, (name,))
            metrics.preinitialize(metrics.WORKFLOWS_STARTED, (name,))
            metrics.preinitialize(metrics.WORKFLOWS_FINISHED, *((name, s) for s in sorted(TERMINAL_STATUSES)))
            metrics.preinitialize(metrics.WORKFLOWS_ACTIVE, (name,))
            metrics.preinitialize(metrics.WORKFLOWS_STUCK, (name,))
            metrics.preinitialize(
                metrics.WORKFLOWS_HANDED_BACK, *((name, r) for r in metrics.WORKFLOW_HANDBACK_REASONS)
            )
        # the resource types the built-in workflows lock (repo:<path>, env:<environment>)
        metrics.preinitialize(metrics.RESOURCE_LOCK_WAIT, ("repo",), ("env",))

    def graph(self, workflow_type: str) -> CompiledStateGraph[Any, Any, Any, Any]:
        if workflow_type not in self._graphs:
            self._graphs[workflow_type] = self.types[workflow_type].build().compile(checkpointer=self.saver)
        return self._graphs[workflow_type]

    # -- API operations --------------------------------------------------------------------------
    async def launch(
        self, workflow_type: str, data: Any, *, idempotency_key: str | None, workflow_id: str | None = None
    ) -> tuple[WorkflowRecord, bool]:
        """Validate and queue a workflow; the same idempotency key returns the same workflow.

        ``workflow_id`` (a fresh UUID) is the id a new workflow gets, for a caller that follows
        its events from before it exists; by default one is made here."""
        wtype = self.types.get(workflow_type)
        if wtype is None:
            raise unknown_workflow_type(workflow_type, self.types, self.failed_types)
        try:
            validated = wtype.validate_input(data)
        except ValueError as e:  # pydantic.ValidationError is a ValueError
            raise _input_error(e) from e
        existing = await self.records.existing(workflow_type, validated, idempotency_key=idempotency_key)
        if existing is not None:
            return existing, False
        workflow_id = workflow_id or str(uuid.uuid4())
        trace = start_workflow_trace(
            f"workflow:{workflow_type}",
            inputs=validated,
            metadata={"workflow_id": workflow_id, "workflow_type": workflow_type, "correlation_id": workflow_id},
        )
        launched = await self._create(
            workflow_id,
            lambda claim: self.records.create(
                workflow_id,
                workflow_type,
                validated,
                idempotency_key=idempotency_key,
                trace=trace,
                claim=claim,
                first_step=wtype.first_node,
                events=[self._launch_events(workflow_id, wtype, running=claim)],
            ),
        )
        if not launched.created:
            return launched.record, False
        metrics.labels(metrics.WORKFLOWS_STARTED, workflow_type).inc()
        # Published before the run's events (publishes go out in order), while the run starts.
        announced = asyncio.ensure_future(self.bus.announce(*launched.events))
        if self.runner is not None and launched.run is not None:
            self.runner.adopt(launched.run, launched.record)
        elif self.runner is not None:
            self.runner.wake()
        await announced
        return launched.record, True

    def _launch_events(self, workflow_id: str, wtype: WorkflowType, *, running: bool) -> Along:
        """``pending`` and, for a run this replica claimed at launch, ``running`` (attempt 1, at
        its first node)."""
        events: list[tuple[str, dict[str, Any]]] = [("workflow.status", {"status": "pending", "type": wtype.name})]
        if running:
            events.append(("workflow.status", _running(1, wtype.first_node)))
        return self.bus.insert_along(*events, aggregate_type="workflow", aggregate_id=workflow_id)

    async def _create(self, workflow_id: str, create: Callable[[bool], Awaitable[Launched]]) -> Launched:
        """Write the workflow and its run (``create(claim)``): claimed by this replica when its
        runner has room for it, its advisory lock taken meanwhile. The room (and the lock) go back
        if no claimed run came of it. A claimed run runs here only if its lock was taken before
        its lease ran out; otherwise it is handed back (a 64-bit key clash, the lock session went
        away, or this replica stalled past the lease, so another one may have claimed it)."""
        runner = self.runner
        locking = runner.reserve(workflow_id) if runner is not None else None
        launched = None
        try:
            launched = await create(locking is not None)
        finally:
            if runner is not None and locking is not None:
                locked_at = await _taken(locking)
                run = launched.run if launched is not None else None
                ours = _in_time(run, locked_at)
                if not ours:
                    await runner.unreserve(workflow_id, locked=locked_at is not None)
                if run is not None and not ours:  # requeued only if no other replica claimed it
                    await self.records.run_store.requeue(workflow_id)
                    launched = launched._replace(run=None) if launched is not None else None
        assert launched is not None
        return launched

    async def resume(self, workflow_id: str, decision: Any) -> WorkflowRecord:
        if decision is None:  # LangGraph would take a null answer for none: the interrupt would ask again
            raise InvalidInput("decision must not be null; send the answer the interrupt asks for", field="decision")
        record = await self.records.get(workflow_id)
        wtype = self.types.get(record.workflow_type)
        if wtype is not None:
            try:
                decision = wtype.validate_resume(decision)
            except ValueError as e:  # pydantic.ValidationError is a ValueError
                raise _input_error(e, "decision") from e
        resumed = record.status == "interrupted" and await self._answer(workflow_id, decision)
        if not resumed:
            status = record.status if record.status != "interrupted" else (await self.records.get(workflow_id)).status
            raise Conflict(
                f"workflow {workflow_id} is {status}, not waiting on an interrupt; "
                "only an interrupted workflow can be resumed",
                resource=workflow_id,
                details={"status": status},
            )
        waited = (time.time() - record.updated_at.timestamp()) if record.updated_at else 0.0
        metrics.WORKFLOW_INTERRUPT_WAIT.observe(max(waited, 0.0))
        return await self.records.get(workflow_id)

    async def expire_approval(self, workflow_id: str) -> bool:
        """Answer an approval past its deadline with an expired rejection, as a resume does; False
        when it was answered meanwhile."""
        return await self._answer(workflow_id, EXPIRED_APPROVAL, expired=True)

    async def _answer(self, workflow_id: str, decision: Any, *, expired: bool = False) -> bool:
        """The run answered, the workflow ``pending`` again and its ``workflow.resumed`` event, in
        one statement (all or nothing), then the replicas woken; False if the run was not waiting."""
        answered = await self.bus.emit_after(
            RunStore.resume_change(workflow_id, decision, expired=expired),
            "workflow.resumed",
            {"decision": decision, "status": "pending"},
            aggregate_type="workflow",
            aggregate_id=workflow_id,
            also=[WorkflowStateManager.pending_along(workflow_id, when=CHANGE_APPLIED)],
        )
        if answered is None:
            return False
        await self.records.run_store.wake(workflow_id)
        return True

    async def cancel(self, workflow_id: str) -> WorkflowRecord:
        """Cancel a workflow: a queued or waiting one at once, a running one on the replica running
        it (this one, else by NOTIFY; a replica claiming it meanwhile reads the run's flag). A
        workflow that finished, before or while the cancel was asked, is a Conflict."""
        record = _unfinished(await self.records.get(workflow_id))
        state = await self.records.run_store.request_cancel(workflow_id)
        if state is None:  # its run finished between the two reads
            _unfinished(await self.records.get(workflow_id))
        if state in {"queued", "waiting"} and await self.records.run_store.cancel_idle(workflow_id):
            await self._finalize(
                workflow_id, record.workflow_type, "cancelled", reason="cancelled by request", record=record
            )
        elif self.runner is not None:
            self.runner.cancel_local(workflow_id, reason="cancelled")
        return await self.records.get(workflow_id)

    async def state(self, record: WorkflowRecord) -> dict[str, Any]:
        """The workflow's ``MultiAgentState`` as its latest stored checkpoint holds it (``{}``
        before the first, or for a type this replica does not know)."""
        if record.workflow_type not in self.types:
            return {}
        config = {"configurable": {"thread_id": record.workflow_id}}
        snapshot = await self.graph(record.workflow_type).aget_state(config)  # type: ignore[arg-type]
        return dict(snapshot.values)

    async def history(self, workflow_id: str, *, limit: int = 100) -> list[dict[str, Any]]:
        record = await self.records.get(workflow_id)
        config = {"configurable": {"thread_id": workflow_id}}
        out = []
        async for cp in self.graph(record.workflow_type).aget_state_history(config, limit=limit):  # type: ignore[arg-type]
            out.append(
                {
                    "checkpoint_id": cp.config["configurable"]["checkpoint_id"],
                    "created_at": cp.created_at,
                    "step": cp.metadata.get("step") if cp.metadata else None,
                    "next": list(cp.next),
                    "current_step": cp.values.get("current_step"),
                    "writes": (cp.metadata or {}).get("writes"),
                }
            )
        return out

    # -- runner callbacks ------------------------------------------------------------------------
    async def execute(self, lr: LocalRun) -> Outcome:
        """Run the graph of a claimed run (its record is there already when this replica launched it)."""
        run = lr.run
        record: WorkflowRecord = lr.record or await self.records.get(run.workflow_id, run=run)
        lr.record = record  # for on_finished
        if not lr.launched_running:
            # a new run is at its first node; a resumed or recovered one where it stopped
            first = self.types[run.workflow_type].first_node if record.current_step is None else None
            await self._emit_change(
                self.records.manager.status_change(run.workflow_id, "running", step=first),
                run.workflow_id,
                "workflow.status",
                _running(run.attempts, first),
            )
        locks = RunLocks(self.locks, owner=f"workflow:{run.workflow_id}")
        context = WorkflowContext(
            workflow_id=run.workflow_id,
            settings=self.settings,
            locks=locks,
            calls=BusAgentCalls(
                self.bus,
                self.settings,
                workflow_id=run.workflow_id,
                correlation_id=record.correlation_id,
                trace_headers=trace_headers,
                cancelled_by_request=lambda: lr.cancel_reason == "cancelled",
            ),
        )
        graph = self.graph(run.workflow_type)
        config = self._config(record)
        # A first attempt has no checkpoint (attempts count every claim): nothing to read back.
        new_thread = run.attempts == 1 and run.resume_value is None
        try:
            if not new_thread:
                snapshot = await graph.aget_state(config)  # type: ignore[arg-type]
                await locks.reacquire(list(snapshot.values.get("locks", [])), ttl_s=_RUN_LOCK_TTL_S)
            # Half the checkpoints' window: a node's event written on its own still takes its step's
            # checkpoint along (held for the whole window), not after it in a statement of its own.
            window_s = write_behind_s(self.settings, self.types[run.workflow_type].durability) / 2
            lr.node_events = NodeEvents(functools.partial(self._write_nodes, run.workflow_id), window_s=window_s)
            return await self._stream(run, record, graph, config, context, lr.node_events, new_thread=new_thread)
        finally:
            await locks.release_all()

    async def _stream(
        self,
        run: RunRow,
        record: WorkflowRecord,
        graph: CompiledStateGraph[Any, Any, Any, Any],
        config: dict[str, Any],
        context: WorkflowContext,
        node_events: NodeEvents,
        *,
        new_thread: bool,
    ) -> Outcome:
        """Run the graph. Each finished node's step and event are written in order while the graph
        goes on, as the next node starts or once a write-behind window ran out (:mod:`node_events`);
        those still waiting are left to the run's outcome, which writes them first."""
        try:
            with workflow_context(record.trace, metadata=config["metadata"]):
                outcome = await run_graph(
                    graph,
                    context=context,
                    config=config,
                    workflow_type=run.workflow_type,
                    data=record.input,
                    correlation_id=record.correlation_id,
                    resume_value=run.resume_value,
                    on_node=self._node_reporter(run, node_events),
                    on_task_start=node_events.start,
                    on_task_end=node_events.done,
                    new_thread=new_thread,
                    durability=self.types[run.workflow_type].durability,
                )
        except BaseException:
            with contextlib.suppress(Exception):  # the graph's own failure is the one to report
                await node_events.flush()
            raise
        await node_events.drain()
        return outcome

    def _config(self, record: WorkflowRecord) -> dict[str, Any]:
        meta = {
            "workflow_id": record.workflow_id,
            "workflow_type": record.workflow_type,
            "correlation_id": record.correlation_id,
        }
        return {
            "configurable": {"thread_id": record.workflow_id},
            "run_name": f"graph:{record.workflow_type}",
            "metadata": meta,
            "tags": [record.workflow_type],
            "recursion_limit": 200,
        }

    def _node_reporter(self, run: RunRow, node_events: NodeEvents) -> Any:
        async def on_node(node: str, update: dict[str, Any], elapsed_s: float) -> None:
            assert self.runner is not None
            self.runner.progress(run.workflow_id)
            data = {"node": node, "duration_s": round(elapsed_s, 4), "keys": sorted(update)}
            # raises an earlier write's failure (Conflict: cancelled meanwhile)
            node_events.add(NodeEvent(node, list(update.get("agents", [])), data))

        return on_node

    async def _write_nodes(self, workflow_id: str, events: list[NodeEvent], step: str) -> None:
        """Node events in one statement, in order, with the step the workflow is at (the last
        one carries it as ``current_step`` when it is another node, one that runs now) and all
        their agents, and the checkpoints the saver holds by then (the steps' that ended)."""
        change = self.records.manager.step_change(workflow_id, step, agents=merged_agents(events))
        before = _node_events(events[:-1])
        last = events[-1]
        data = last.data if step == last.node else {**last.data, "current_step": step}
        held = await self._held_checkpoints(workflow_id)
        await self._emit_change(change, workflow_id, "workflow.node", data, before=before, also=held)

    async def on_finished(self, lr: LocalRun, outcome: Outcome | BaseException) -> None:
        run, record = lr.run, lr.record
        nodes: list[NodeEvent] = lr.node_events.take() if lr.node_events is not None else []
        step = lr.node_events.step(nodes) if lr.node_events is not None else None
        if isinstance(outcome, Outcome) and outcome.status == "interrupted":
            if nodes:  # the step goes with the nodes' events; the status after them
                await self._write_nodes(run.workflow_id, nodes, nodes[-1].node)
            # the step it waits at, as the record has it: a follower's view then matches GET /workflows/{id}
            waits_at = {"current_step": outcome.interrupted_node} if outcome.interrupted_node else {}
            await self._emit_change(
                self.records.manager.status_change(run.workflow_id, "interrupted", step=outcome.interrupted_node),
                run.workflow_id,
                "workflow.status",
                {"status": "interrupted", "interrupt": outcome.interrupt, **waits_at},
            )
            return
        # the run row and the checkpoints the saver still holds, in the same statement
        finish_run = [RunStore.finish_along(run.workflow_id), *await self._held_checkpoints(run.workflow_id)]
        finish = functools.partial(
            self._finalize, run.workflow_id, run.workflow_type, record=record, also=finish_run, nodes=nodes, step=step
        )
        if isinstance(outcome, Outcome):
            status, result, reason, errors = outcome.status, outcome.result, outcome.reason, outcome.errors
        else:
            status = "cancelled" if type(outcome).__name__ == "CancelledError" else "failed"
            reason = "cancelled by request" if status == "cancelled" else _reason(outcome)
            result = {}
            # a cancel is no error: recorded as a waiting or queued run's cancel is, reason alone
            errors = (
                []
                if status == "cancelled"
                else [{"code": getattr(outcome, "code", type(outcome).__name__), "message": str(outcome)}]
            )
        try:
            await finish(status, result=result, reason=reason, errors=errors)
        except InvalidInput as e:  # what the graph left cannot be stored (a result that is not JSON, say)
            reason = f"the workflow's outcome cannot be recorded: {e.message}"
            await finish("failed", reason=reason, errors=[{"code": e.code, "message": reason}])
        lr.run_finished = True

    async def _held_checkpoints(self, workflow_id: str) -> list[Along]:
        if isinstance(self.saver, PooledPostgresSaver):
            return await self.saver.take_held(workflow_id)
        return []

    async def on_stuck(self, run: RunRow) -> None:
        await self._emit(
            run.workflow_id, "workflow.stuck", {"after_s": self.settings.stuck_after_s, "attempt": run.attempts}
        )

    async def _finalize(
        self,
        workflow_id: str,
        workflow_type: str,
        status: str,
        *,
        result: dict[str, Any] | None = None,
        reason: str = "",
        errors: list[dict[str, Any]] | None = None,
        record: WorkflowRecord | None = None,
        also: Sequence[Along] = (),
        nodes: Sequence[NodeEvent] = (),
        step: str | None = None,
    ) -> None:
        """Finish the workflow row and record its terminal event, in one statement (with ``also``,
        written either way: the run's finish). ``nodes`` not written yet go first, in it too;
        ``step`` is the step the workflow ends at (``NodeEvents.step``, which falls back on the
        last of ``nodes``; None leaves the recorded one)."""
        record = record or await self.records.get(workflow_id)
        change = self.records.manager.completion_change(
            workflow_id,
            status=status,
            result=result or {},
            errors=errors or [],
            metadata={"reason": reason},
            step=step,
            agents=merged_agents(nodes),
        )
        data = _terminal_event(status, reason, result or {}, errors or [])
        if not await self.bus.emit_after(
            change,
            "workflow.status",
            data,
            aggregate_type="workflow",
            aggregate_id=workflow_id,
            also=also,
            before=_node_events(nodes),
        ):
            _log.info("workflow %s had already finished; %s not recorded", workflow_id, status)
            return
        finish_workflow_trace(
            record.trace,
            name=f"workflow:{workflow_type}",
            outputs={"status": status, **(result or {})},
            metadata={
                "workflow_id": workflow_id,
                "workflow_type": workflow_type,
                "correlation_id": record.correlation_id,
            },
            error=reason if status != "succeeded" else None,
        )
        metrics.labels(metrics.WORKFLOWS_FINISHED, workflow_type, status).inc()
        if record.created_at is not None:
            duration_s = time.time() - record.created_at.timestamp()
            metrics.labels(metrics.WORKFLOW_DURATION, workflow_type).observe(duration_s)

    async def _emit(self, workflow_id: str, event_type: str, data: dict[str, Any]) -> None:
        await self.bus.emit(event_type, data, aggregate_type="workflow", aggregate_id=workflow_id)

    async def _emit_change(
        self,
        change: tuple[str, list[Any]],
        workflow_id: str,
        event_type: str,
        data: dict[str, Any],
        *,
        before: Sequence[tuple[str, dict[str, Any]]] = (),
        also: Sequence[Along] = (),
    ) -> None:
        """Change the workflow row and record the event (after ``before``) in one statement (one
        commit), with ``also`` written either way. A workflow already finished (cancelled
        meanwhile) takes no event: Conflict stops its run."""
        if await self.bus.emit_after(
            change, event_type, data, aggregate_type="workflow", aggregate_id=workflow_id, before=before, also=also
        ):
            return
        record = await self.records.get(workflow_id)
        raise Conflict(
            f"workflow {workflow_id} is already {record.status}; {event_type} not recorded",
            resource=workflow_id,
            details={"status": record.status},
        )


#: The answer an approval gets when nobody gave one before its deadline.
EXPIRED_APPROVAL = {
    "decision": "reject",
    "by": "system",
    "comment": "no answer before the approval deadline",
    "expired": True,
}


def _in_time(run: RunRow | None, locked_at: datetime | None) -> bool:
    """Whether a launch's claimed run is this replica's to run: its lock was taken before its
    lease ran out, so no other replica can have claimed it (a claim needs the lease gone and the lock)."""
    if run is None or locked_at is None or run.lease_expires_at is None:
        return False
    return locked_at < run.lease_expires_at


async def _taken(locking: asyncio.Future[datetime | None]) -> datetime | None:
    """When a launch's advisory lock was taken; None if it was not (or taking it failed)."""
    try:
        return await locking
    except Exception:  # noqa: BLE001 - the lock session failed: the run goes to the queue instead
        _log.warning("could not take the advisory lock of a launch; its run is queued", exc_info=True)
        return None


def _reason(exc: BaseException) -> str:
    """Why a run failed: one of our errors' message (its code is in ``errors``); anything else
    with its class, which is most of what it says (``KeyError: 'steps'``)."""
    return str(exc) if isinstance(exc, OrchestratorError) else f"{type(exc).__name__}: {exc}"


def _unfinished(record: WorkflowRecord) -> WorkflowRecord:
    """``record``, or a Conflict naming the status it finished as."""
    if record.status in TERMINAL_STATUSES:
        raise Conflict(
            f"workflow {record.workflow_id} already finished as {record.status}; nothing to cancel",
            resource=record.workflow_id,
            details={"status": record.status},
        )
    return record


def _node_events(events: Sequence[NodeEvent]) -> list[tuple[str, dict[str, Any]]]:
    return [("workflow.node", e.data) for e in events]


def _terminal_event(status: str, reason: str, result: dict[str, Any], errors: list[dict[str, Any]]) -> dict[str, Any]:
    """A terminal ``workflow.status`` event's data: the outcome itself, so a follower needs no
    read; a result or errors above ``_RESULT_IN_EVENT_MAX_BYTES`` as JSON are left to the record."""
    data: dict[str, Any] = {"status": status, "reason": reason}
    for name, value in (("result", result), ("errors", errors)):
        if value and len(orjson.dumps(value)) > _RESULT_IN_EVENT_MAX_BYTES:
            data[f"{name}_omitted"] = True
        elif value:
            data[name] = value
    return data


def _input_error(exc: ValueError, name: str = "input") -> InvalidInput:
    """A validation error of the body's ``name``, naming the first field at fault."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and errors():
        first = errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        field = f"{name}.{loc}" if loc else name
        return InvalidInput(f"{field}: {first.get('msg')}", field=field)
    return InvalidInput(f"{name}: {exc}", field=name)


def _running(attempt: int, step: str | None) -> dict[str, Any]:
    """A ``running`` status event's data: the attempt, and the step it starts at when known."""
    return {"status": "running", "attempt": attempt, **({"current_step": step} if step else {})}
