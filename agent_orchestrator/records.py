"""The orchestrator's view of workflow metadata: ``WorkflowStateManager`` plus the run row.

A launch writes the workflow, its run row and its first event in one statement,
so a workflow the API accepted always has a run some replica will claim. Reads join in what
the API shows beyond the metadata: the pending interrupt and whether the run
is stuck.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import orjson

from agent_orchestrator.run_store import RunRow, RunStore
from shared.lib.connections import Along
from shared.lib.errors import Conflict, InvalidInput
from shared.lib.workflow_state import WorkflowStateManager

__all__ = ["Launched", "WorkflowRecord", "WorkflowRecords"]


@dataclass
class WorkflowRecord:
    workflow_id: str
    workflow_type: str
    status: str
    input: dict[str, Any]
    correlation_id: str
    current_step: str | None = None
    agents: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    version: int = 0
    idempotency_key: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    pending_interrupt: Any = None
    stuck: bool = False
    trace: dict[str, str] = field(default_factory=dict)

    def to_api(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "workflow_type": self.workflow_type,
            "status": self.status,
            "current_step": self.current_step,
            "agents": self.agents,
            "input": self.input,
            "result": self.result,
            "errors": self.errors,
            "reason": self.reason,
            "pending_interrupt": self.pending_interrupt,
            "stuck": self.stuck,
            "version": self.version,
            "idempotency_key": self.idempotency_key,
            "correlation_id": self.correlation_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def _lease(run_rows: list[dict[str, Any]]) -> datetime:
    """The lease expiry of the run row a launch wrote claimed (its RETURNING row, as JSON)."""
    return datetime.fromisoformat(run_rows[0]["lease_expires_at"])


def _record(wf: Any, run: Any = None) -> WorkflowRecord:
    metadata = dict(getattr(wf, "metadata", None) or {})
    return WorkflowRecord(
        workflow_id=str(wf.id),
        workflow_type=wf.workflow_type,
        status=wf.status,
        input=dict(wf.input or {}),
        correlation_id=str(metadata.get("correlation_id") or wf.id),
        trace=dict(metadata.get("trace") or {}),
        current_step=wf.current_step,
        agents=list(wf.agents or []),
        result=wf.result,
        errors=list(wf.errors or []),
        reason=str(metadata.get("reason", "")),
        version=wf.version,
        idempotency_key=wf.idempotency_key,
        created_at=wf.created_at,
        updated_at=wf.updated_at,
        pending_interrupt=run.pending_interrupt if run is not None else None,
        stuck=bool(run is not None and run.stuck_since is not None and wf.status == "running"),
    )


class Launched(NamedTuple):
    record: WorkflowRecord
    created: bool
    run: RunRow | None
    """The run, when the launch claimed it for this replica's runner."""
    events: list[dict[str, Any]]
    """The rows of the events written with the launch, oldest first (none when it was not created)."""


class WorkflowRecords:
    def __init__(self, pool: asyncpg.Pool, manager: WorkflowStateManager, run_store: RunStore) -> None:
        self.pool = pool
        self.manager = manager
        self.run_store = run_store

    async def existing(
        self, workflow_type: str, data: dict[str, Any], *, idempotency_key: str | None
    ) -> WorkflowRecord | None:
        """The workflow already launched with this key (same type and input), if any."""
        if idempotency_key is None:
            return None
        found = await self.manager.find_by_idempotency_key(idempotency_key)
        return self._same_launch(found, workflow_type, data) if found is not None else None

    async def create(
        self,
        workflow_id: str,
        workflow_type: str,
        data: dict[str, Any],
        *,
        idempotency_key: str | None,
        trace: dict[str, str],
        claim: bool = False,
        first_step: str | None = None,
        events: Sequence[Along] = (),
    ) -> Launched:
        """The new workflow, or (after a race on the key) the one launched with it. Its run row
        and ``events`` (``EventBus.insert_along``) go in the same statement. With ``claim`` the
        run is written already claimed by this replica's runner (``RunStore.claimed_insert``)
        and the workflow starts ``running``, at ``first_step``."""
        run_insert = self.run_store.claimed_insert if claim else self.run_store.queued_insert
        try:
            wf, rows = await self.manager.create_workflow_along(
                workflow_type,
                data,
                along=[functools.partial(run_insert, workflow_id, workflow_type), *events],
                workflow_id=workflow_id,
                idempotency_key=idempotency_key,
                metadata={"correlation_id": workflow_id, "trace": trace},
                status="running" if claim else "pending",
                step=first_step if claim else None,
            )
        except Conflict as e:
            again = await self.existing(workflow_type, data, idempotency_key=idempotency_key)
            if e.field != "idempotency_key" or again is None:
                raise
            return Launched(again, False, None, [])
        run = self.run_store.claimed_row(workflow_id, workflow_type, _lease(rows[0])) if claim else None
        stored = sorted((row for event_rows in rows[1:] for row in event_rows), key=lambda row: int(row["id"]))
        return Launched(_record(wf), True, run, stored)

    def _same_launch(self, wf: Any, workflow_type: str, data: dict[str, Any]) -> WorkflowRecord:
        if wf.workflow_type != workflow_type or dict(wf.input or {}) != data:
            raise Conflict(
                f"idempotency_key {wf.idempotency_key!r} already launched workflow {wf.id} with a "
                "different type or input; use a new key for a different launch",
                field="idempotency_key",
                resource=str(wf.id),
            )
        return _record(wf)

    async def get(self, workflow_id: str, *, run: RunRow | None = None) -> WorkflowRecord:
        """The workflow and its run (read concurrently; pass ``run`` when the caller has it)."""
        if run is not None:
            return _record(await self.manager.get_workflow(workflow_id), run)
        wf, row = await asyncio.gather(self.manager.get_workflow(workflow_id), self.run_store.get(workflow_id))
        return _record(wf, row)

    async def get_many(self, runs: list[RunRow]) -> dict[str, WorkflowRecord]:
        """The records of ``runs`` (their workflows read in one query), by workflow id."""
        found = await self.manager.get_workflows([run.workflow_id for run in runs])
        return {run.workflow_id: _record(found[run.workflow_id], run) for run in runs if run.workflow_id in found}

    async def require(self, workflow_id: str) -> str:
        """The workflow's status; NotFound unless the workflow exists (one read of one column)."""
        return await self.manager.require_workflow(workflow_id)

    async def last_event_id(self, workflow_id: str) -> int | None:
        """The id of the workflow's latest stored event (one step of the events' aggregate index)."""
        latest: int | None = await self.pool.fetchval(
            "SELECT max(id) FROM events WHERE aggregate_type = 'workflow' AND aggregate_id = $1", workflow_id
        )
        return latest

    async def page(
        self, *, status: str | None, workflow_type: str | None, limit: int, cursor: str | None
    ) -> tuple[list[WorkflowRecord], str | None]:
        """A page of the listing; its cursor goes on with the same filters only (see :func:`_unbind`)."""
        filters = _Filters(status, workflow_type)
        after = _unbind(cursor, filters) if cursor else None
        page = await self.manager.list_workflows(status=status, workflow_type=workflow_type, limit=limit, cursor=after)
        return [_record(wf) for wf in page.items], _bind(page.next_cursor, filters) if page.next_cursor else None


class _Filters(NamedTuple):
    """What a listing's cursor is bound to: its filters (the page size may change between pages)."""

    status: str | None
    workflow_type: str | None

    def describe(self) -> str:
        return f"status={self.status or '(any)'}, type={self.workflow_type or '(any)'}"


def _bind(cursor: str, filters: _Filters) -> str:
    """The API's cursor: the store's, with the filters of the listing it continues."""
    return base64.urlsafe_b64encode(orjson.dumps([*filters, cursor])).decode().rstrip("=")


def _unbind(cursor: str, filters: _Filters) -> str:
    """The store's cursor inside an API cursor, refused (422 naming ``cursor``) unless the listing
    has the filters it was issued for: a cursor only says where a listing stopped, so with other
    filters it would silently skip part of the new listing."""
    try:
        status, workflow_type, after = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(after, str):
            raise TypeError(f"the store's cursor is a {type(after).__name__}")
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError) as e:
        raise InvalidInput("cursor is not one this API returned; start again without a cursor", field="cursor") from e
    bound = _Filters(status, workflow_type)
    if bound != filters:
        raise InvalidInput(
            f"cursor continues the listing with {bound.describe()}, not {filters.describe()}; "
            "give the filters it came with, or start again without a cursor",
            field="cursor",
        )
    return after
