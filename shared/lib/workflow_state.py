"""Workflow metadata with optimistic locking: what the orchestrator API lists and shows.

The LangGraph checkpointer keeps each workflow's graph state; this module keeps
its type, status, current step, participating agents, input, result, errors
and a small metadata snapshot (``state``), in ``config/state/workflow_state.sql``.

Every change bumps ``version``. Read-modify-write callers pass the version they
read as ``expected_version``; a stale one raises :class:`Conflict` carrying
``details={"current_version": n}``, so the caller re-reads and retries instead of
overwriting someone else's change. Changes without an expected version (a step
moving on) are single atomic statements, so they never lose an update either.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from shared.lib.connections import Along, with_ctes
from shared.lib.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from shared.lib.safe_input import find_unsafe_text
from shared.lib.settings import AGENT_ID_PATTERN

__all__ = [
    "TERMINAL_STATUSES",
    "WORKFLOW_STATUSES",
    "WORKFLOW_TYPE_PATTERN",
    "Checkpoint",
    "Workflow",
    "WorkflowPage",
    "WorkflowStateManager",
    "canonical_workflow_id",
]

WORKFLOW_STATUSES = ("pending", "running", "interrupted", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
#: A workflow type's name, as workflows are stored under it.
WORKFLOW_TYPE_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,127}$"


def canonical_workflow_id(value: str) -> str:
    """``value`` as the canonical UUID spelling (lower case, hyphenated) workflows are stored under.

    People paste ids from elsewhere: upper case, without hyphens, in braces or as ``urn:uuid:``
    all name the same workflow. Anything else is :class:`InvalidInput` naming ``workflow_id``."""
    try:
        if not value.isascii():  # int(..., 16), under uuid.UUID, takes non-ASCII digits too
            raise ValueError(value)
        return str(uuid.UUID(value.strip()))
    except ValueError as e:
        raise InvalidInput(
            f"workflow_id must be a UUID, like {uuid.UUID(int=0)}; got {value[:80]!r}", field="workflow_id"
        ) from e


#: The snapshot and input are metadata; a graph's bulk belongs in the LangGraph checkpointer.
_MAX_JSON_BYTES = 1024 * 1024
_MAX_PAGE = 500
_TYPE_RE = re.compile(WORKFLOW_TYPE_PATTERN)
_AGENT_RE = re.compile(AGENT_ID_PATTERN)
_COLUMNS = (
    "id, workflow_type, status, current_step, agents, input, state, result, errors, metadata, version, "
    "idempotency_key, created_at, updated_at, started_at, completed_at"
)
# Interpolated SQL in this module joins module constants and internal literals only; values are bound.
_SELECT = "SELECT " + _COLUMNS + " FROM workflows "  # noqa: S608 - constants only
_INSERT = (
    "INSERT INTO workflows (id, workflow_type, input, state, metadata, idempotency_key, "  # noqa: S608 - constants
    "status, current_step, started_at) VALUES (coalesce($1, gen_random_uuid()::text), $2, $3, $4, $5, $6, $7, $8, "
    "CASE WHEN $7 = 'running' THEN now() END) RETURNING " + _COLUMNS
)
#: What a new workflow may start as: queued, or already claimed by the replica launching it.
_NEW_STATUSES = ("pending", "running")


def _with_along(along: Sequence[Along], args: list[Any]) -> tuple[str, list[Any]]:
    """The launch INSERT with ``along`` as CTEs ``along0``..; each one's rows come back as a JSON
    array in the column of the same name."""
    ctes, extra = with_ctes("along", along, args)
    returned = [
        f"(SELECT coalesce(jsonb_agg(to_jsonb(a)), '[]') FROM along{i} a) AS along{i}"  # noqa: S608 - names only
        for i in range(len(along))
    ]
    if not ctes:
        return _INSERT, extra
    return f"WITH {', '.join(ctes)} {_INSERT}, {', '.join(returned)}", extra


@dataclass(frozen=True)
class Workflow:
    """One workflow's metadata. Timestamps are timezone-aware UTC."""

    id: str
    workflow_type: str
    status: str
    current_step: str | None
    agents: list[str]
    input: dict[str, Any]
    state: dict[str, Any]
    result: dict[str, Any] | None
    errors: list[dict[str, Any]]
    metadata: dict[str, Any]
    version: int
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class Checkpoint:
    """A snapshot of a workflow's ``state`` and step at one version."""

    id: int
    workflow_id: str
    version: int
    step: str | None
    state: dict[str, Any]
    label: str | None
    created_at: datetime


@dataclass(frozen=True)
class WorkflowPage:
    """One page of :meth:`WorkflowStateManager.list_workflows`; pass ``next_cursor`` for the next."""

    items: list[Workflow]
    next_cursor: str | None = None


def _workflow(row: asyncpg.Record | dict[str, Any]) -> Workflow:
    data: dict[str, Any] = dict(row.items())
    data["agents"] = list(data["agents"])
    return Workflow(**data)


def _checkpoint(row: asyncpg.Record) -> Checkpoint:
    return Checkpoint(**dict(row.items()))


def _json_field(value: Any, name: str, kind: type) -> Any:
    if not isinstance(value, kind):
        raise InvalidInput(f"{name} must be a JSON {'object' if kind is dict else 'array'}", field=name)
    try:
        size = len(orjson.dumps(value))
    except TypeError as e:
        raise InvalidInput(f"{name} is not JSON-serialisable: {e}", field=name) from e
    if size > _MAX_JSON_BYTES:
        raise PayloadTooLarge(
            f"{name} is {size} bytes, over {_MAX_JSON_BYTES}; keep bulk data in the graph state or an artifact",
            field=name,
        )
    return value


def _check_id(workflow_id: str) -> None:
    if not isinstance(workflow_id, str) or not 0 < len(workflow_id) <= 128:
        raise InvalidInput("workflow_id must be a non-empty string of at most 128 characters", field="workflow_id")


def _check_agents(agents: list[str], name: str = "agents") -> list[str]:
    if not isinstance(agents, list | tuple) or not all(isinstance(a, str) and _AGENT_RE.match(a) for a in agents):
        raise InvalidInput(f"{name} must be agent ids matching {AGENT_ID_PATTERN}", field=name)
    return list(dict.fromkeys(agents))


def _check_status(status: str, *, allowed: tuple[str, ...] | frozenset[str] = WORKFLOW_STATUSES) -> None:
    if status not in allowed:
        raise InvalidInput(f"status must be one of {', '.join(sorted(allowed))}", field="status")


def _encode_cursor(created_at: datetime, workflow_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([created_at.isoformat(), workflow_id])).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, workflow_id = orjson.loads(raw)
        at = datetime.fromisoformat(created)
        if at.tzinfo is None or not isinstance(workflow_id, str) or find_unsafe_text(workflow_id) is not None:
            raise ValueError("naive timestamp or bad id")  # NUL or a surrogate: PostgreSQL cannot compare it
        at = at.astimezone(UTC)  # year 1 at +14:00 is before year 1: OverflowError, not a 500 from asyncpg
    except (ValueError, TypeError, OverflowError, binascii.Error, orjson.JSONDecodeError) as e:
        raise InvalidInput("cursor is not one this API returned; start again without a cursor", field="cursor") from e
    return at, workflow_id


def _older_than_s(older_than: timedelta | float) -> float:
    seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
    if not isinstance(seconds, int | float) or seconds < 0:
        raise InvalidInput("older_than must be a non-negative duration (timedelta or seconds)", field="older_than")
    return float(seconds)


class WorkflowStateManager:
    """Workflow metadata in PostgreSQL. Each method also takes ``conn=`` to join a transaction."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def _connection(self, conn: asyncpg.Connection | None) -> AsyncIterator[asyncpg.Connection]:
        """The caller's connection (inside its transaction) or one from the pool."""
        if conn is not None:
            yield conn
            return
        async with self._pool.acquire() as pooled:
            yield pooled

    # -- creating and reading ---------------------------------------------------------
    async def create_workflow(
        self,
        workflow_type: str,
        input_data: dict[str, Any] | None = None,
        *,
        workflow_id: str | None = None,
        idempotency_key: str | None = None,
        state: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> Workflow:
        """Insert a pending workflow (id: a new UUID unless given). A reused idempotency key
        raises Conflict naming the workflow it launched: use :meth:`find_by_idempotency_key`."""
        created, _ = await self.create_workflow_along(
            workflow_type,
            input_data,
            along=(),
            workflow_id=workflow_id,
            idempotency_key=idempotency_key,
            state=state,
            metadata=metadata,
            conn=conn,
        )
        return created

    async def create_workflow_along(
        self,
        workflow_type: str,
        input_data: dict[str, Any] | None = None,
        *,
        along: Sequence[Along],
        workflow_id: str | None = None,
        idempotency_key: str | None = None,
        state: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        conn: asyncpg.Connection | None = None,
        status: str = "pending",
        step: str | None = None,
    ) -> tuple[Workflow, list[list[dict[str, Any]]]]:
        """:meth:`create_workflow`, with ``along`` in the same statement (all written, or none);
        also returns each one's RETURNING rows, as JSON objects. ``status="running"`` starts it
        running (the replica launching it runs it at once), at ``step`` (its first node)."""
        _check_status(status, allowed=_NEW_STATUSES)
        if not isinstance(workflow_type, str) or not _TYPE_RE.match(workflow_type):
            raise InvalidInput(f"workflow_type must match {WORKFLOW_TYPE_PATTERN}", field="workflow_type")
        if idempotency_key is not None and not (isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= 200):
            raise InvalidInput("idempotency_key must be 1 to 200 characters", field="idempotency_key")
        values = [
            _json_field({} if input_data is None else input_data, "input", dict),
            _json_field({} if state is None else state, "state", dict),
            _json_field({} if metadata is None else metadata, "metadata", dict),
        ]
        if workflow_id is not None:
            _check_id(workflow_id)
        sql, args = _with_along(along, [workflow_id, workflow_type, *values, idempotency_key, status, step])
        async with self._connection(conn) as c:
            try:
                row = await c.fetchrow(sql, *args)
            except asyncpg.UniqueViolationError as e:
                raise await self._duplicate(c, e, workflow_id, idempotency_key) from e
        assert row is not None
        columns = dict(row.items())
        rows = [columns.pop(f"along{i}") for i in range(len(along))]
        return _workflow(columns), rows

    async def _duplicate(
        self, conn: asyncpg.Connection, error: asyncpg.UniqueViolationError, workflow_id: str | None, key: str | None
    ) -> Conflict:
        if "idempotency_key" in (error.constraint_name or ""):
            existing = None if conn.is_in_transaction() else await self.find_by_idempotency_key(key or "")
            return Conflict(
                f"idempotency_key {key!r} already launched a workflow; fetch it instead of launching again",
                field="idempotency_key",
                resource=existing.id if existing else None,
            )
        return Conflict(f"workflow {workflow_id} already exists", field="workflow_id", resource=workflow_id)

    async def find_by_idempotency_key(
        self, idempotency_key: str, *, conn: asyncpg.Connection | None = None
    ) -> Workflow | None:
        async with self._connection(conn) as c:
            row = await c.fetchrow(_SELECT + "WHERE idempotency_key = $1", idempotency_key)
        return _workflow(row) if row is not None else None

    async def get_workflow(self, workflow_id: str, *, conn: asyncpg.Connection | None = None) -> Workflow:
        """The workflow, or NotFound."""
        _check_id(workflow_id)
        async with self._connection(conn) as c:
            row = await c.fetchrow(_SELECT + "WHERE id = $1", workflow_id)
        if row is None:
            raise _no_workflow(workflow_id)
        return _workflow(row)

    async def require_workflow(self, workflow_id: str) -> str:
        """The workflow's status; NotFound unless the workflow exists. Reads nothing else."""
        _check_id(workflow_id)
        status = await self._pool.fetchval("SELECT status FROM workflows WHERE id = $1", workflow_id)
        if status is None:
            raise _no_workflow(workflow_id)
        return str(status)

    async def get_workflows(self, workflow_ids: list[str]) -> dict[str, Workflow]:
        """The workflows of ``workflow_ids`` that exist, by id, in one read."""
        for workflow_id in workflow_ids:
            _check_id(workflow_id)
        rows = await self._pool.fetch(_SELECT + "WHERE id = ANY($1::text[])", workflow_ids)
        return {row["id"]: _workflow(row) for row in rows}

    # -- changing -------------------------------------------------------------------
    async def _change(
        self,
        workflow_id: str,
        assignments: str,
        args: list[Any],
        *,
        expected_version: int | None,
        conn: asyncpg.Connection | None,
        allow_terminal: bool = False,
    ) -> Workflow:
        """One UPDATE that bumps the version, compared with ``expected_version`` when given."""
        sql, params = _update(
            workflow_id, assignments, args, expected_version=expected_version, allow_terminal=allow_terminal
        )
        async with self._connection(conn) as c:
            row = await c.fetchrow(sql + f" RETURNING {_COLUMNS}", *params)
            if row is not None:
                return _workflow(row)
            current = await self.get_workflow(workflow_id, conn=c)
        raise _refused(current, expected_version)

    def step_change(self, workflow_id: str, step: str, *, agents: list[str] | None = None) -> tuple[str, list[Any]]:
        """:meth:`update_step` as a statement to run inside another one (it returns the id when it
        applied): ``EventBus.emit_after`` records the step and its event in one commit."""
        sql, params = _update(workflow_id, *_step_assignment(step, agents))
        return sql + " RETURNING id", params

    @staticmethod
    def pending_along(workflow_id: str, *, when: str) -> Along:
        """An interrupted workflow ``pending`` again (answered, waiting to run), as a statement to
        go in another one, applied only ``when`` (an SQL condition) holds."""
        _check_id(workflow_id)

        def statement(first: int) -> tuple[str, list[Any]]:
            return (
                "UPDATE workflows SET status = 'pending', version = version + 1, updated_at = now() "  # noqa: S608 - parameter numbers and code's condition
                f"WHERE id = ${first} AND status = 'interrupted' AND {when}",
                [workflow_id],
            )

        return statement

    def status_change(self, workflow_id: str, status: str, *, step: str | None = None) -> tuple[str, list[Any]]:
        """:meth:`set_status` as a statement to run inside another one (see :meth:`step_change`);
        with ``step``, it also records the step the workflow is at (an interrupted one: its node)."""
        sql, params = _update(workflow_id, *_with_step(*_status_assignment(status), step, None))
        return sql + " RETURNING id", params

    async def update_state(
        self,
        workflow_id: str,
        updates: dict[str, Any],
        agent_id: str,
        expected_version: int,
        *,
        conn: asyncpg.Connection | None = None,
    ) -> Workflow:
        """Merge ``updates`` into the snapshot (top-level keys) if the workflow is still at
        ``expected_version``; adds ``agent_id`` to the participating agents."""
        _json_field(updates, "updates", dict)
        (agent,) = _check_agents([agent_id], "agent_id")
        if not isinstance(expected_version, int):
            raise InvalidInput("expected_version is required: pass the version you read", field="expected_version")
        return await self._change(
            workflow_id,
            "state = state || $1::jsonb, "
            "agents = CASE WHEN $2::text = ANY(agents) THEN agents ELSE agents || $2::text END",
            [updates, agent],
            expected_version=expected_version,
            conn=conn,
        )

    async def update_step(
        self,
        workflow_id: str,
        step: str,
        *,
        agents: list[str] | None = None,
        expected_version: int | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> Workflow:
        """Record the step the workflow is at (and the agents it brought in). The version is
        bumped atomically, and compared first when ``expected_version`` is given."""
        return await self._change(
            workflow_id, *_step_assignment(step, agents), expected_version=expected_version, conn=conn
        )

    async def set_status(
        self,
        workflow_id: str,
        status: str,
        *,
        expected_version: int | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> Workflow:
        """Move an unfinished workflow to ``status``; a terminal one also gets its completion time."""
        return await self._change(
            workflow_id,
            *_status_assignment(status),
            expected_version=expected_version,
            conn=conn,
        )

    async def complete_workflow(
        self,
        workflow_id: str,
        *,
        status: str = "succeeded",
        result: dict[str, Any] | None = None,
        errors: list[dict[str, Any]] | None = None,
        metadata: dict[str, Any] | None = None,
        expected_version: int | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> Workflow:
        """Finish the workflow with a terminal status, its result and errors (``metadata`` is
        merged). Finishing an already finished workflow raises Conflict."""
        return await self._change(
            workflow_id,
            *_completion_assignment(status, result, errors, metadata),
            expected_version=expected_version,
            conn=conn,
        )

    def completion_change(
        self,
        workflow_id: str,
        *,
        status: str,
        result: dict[str, Any] | None = None,
        errors: list[dict[str, Any]] | None = None,
        metadata: dict[str, Any] | None = None,
        step: str | None = None,
        agents: list[str] | None = None,
    ) -> tuple[str, list[Any]]:
        """:meth:`complete_workflow` as a statement to run inside another one (see :meth:`step_change`);
        with ``step``, it also records the last step and its agents as :meth:`step_change` does."""
        assignments = _with_step(*_completion_assignment(status, result, errors, metadata), step, agents)
        sql, params = _update(workflow_id, *assignments)
        return sql + " RETURNING id", params

    # -- checkpoints ------------------------------------------------------------------
    async def checkpoint(
        self, workflow_id: str, *, label: str | None = None, conn: asyncpg.Connection | None = None
    ) -> Checkpoint:
        """Snapshot the workflow's current state and step (the version is not bumped)."""
        _check_id(workflow_id)
        async with self._connection(conn) as c:
            row = await c.fetchrow(
                "INSERT INTO workflow_checkpoints (workflow_id, version, step, state, label) "
                "SELECT id, version, current_step, state, $2 FROM workflows WHERE id = $1 "
                "RETURNING id, workflow_id, version, step, state, label, created_at",
                workflow_id,
                label,
            )
        if row is None:
            raise NotFound(f"no workflow {workflow_id} to checkpoint", resource=workflow_id)
        return _checkpoint(row)

    async def get_checkpoints(
        self, workflow_id: str, *, limit: int = 100, conn: asyncpg.Connection | None = None
    ) -> list[Checkpoint]:
        """The workflow's checkpoints, oldest first (at most ``limit``, the latest ones)."""
        _check_id(workflow_id)
        async with self._connection(conn) as c:
            rows = await c.fetch(
                "SELECT * FROM (SELECT id, workflow_id, version, step, state, label, created_at "
                "FROM workflow_checkpoints WHERE workflow_id = $1 ORDER BY id DESC LIMIT $2) c ORDER BY id",
                workflow_id,
                limit,
            )
        return [_checkpoint(r) for r in rows]

    async def restore_checkpoint(
        self,
        workflow_id: str,
        checkpoint_id: int,
        *,
        expected_version: int,
        conn: asyncpg.Connection | None = None,
    ) -> Workflow:
        """Put the checkpoint's state and step back, as a new version. Refuses (Conflict) if the
        workflow moved past ``expected_version`` or finished."""
        if not isinstance(expected_version, int):
            raise InvalidInput("expected_version is required: pass the version you read", field="expected_version")
        async with self._connection(conn) as c:
            cp = await c.fetchrow(
                "SELECT step, state FROM workflow_checkpoints WHERE id = $1 AND workflow_id = $2",
                checkpoint_id,
                workflow_id,
            )
            if cp is None:
                raise NotFound(
                    f"workflow {workflow_id} has no checkpoint {checkpoint_id}; list its checkpoints",
                    resource=workflow_id,
                )
            return await self._change(
                workflow_id,
                "state = $1, current_step = $2",
                [cp["state"], cp["step"]],
                expected_version=expected_version,
                conn=c,
            )

    # -- listing, statistics, cleanup --------------------------------------------------------
    async def list_workflows(
        self,
        *,
        status: str | None = None,
        workflow_type: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> WorkflowPage:
        """Newest first, filtered by status and/or type; ``cursor`` continues a previous page."""
        if status is not None:
            _check_status(status)
        if not isinstance(limit, int) or not 0 < limit <= _MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {_MAX_PAGE}", field="limit")
        after = _decode_cursor(cursor) if cursor else (None, None)
        async with self._pool.acquire() as c:
            rows = await c.fetch(
                _SELECT + "WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR workflow_type = $2) "
                "AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::text)) "
                "ORDER BY created_at DESC, id DESC LIMIT $5",
                status,
                workflow_type,
                *after,
                limit + 1,
            )
        items = [_workflow(r) for r in rows[:limit]]
        more = len(rows) > limit
        return WorkflowPage(items, _encode_cursor(items[-1].created_at, items[-1].id) if more else None)

    async def statistics(self) -> dict[str, Any]:
        """Counts by status and by type, and the mean duration of finished workflows per type."""
        async with self._pool.acquire() as c:
            rows = await c.fetch(
                "SELECT workflow_type, status, count(*) AS n, "
                "avg(extract(epoch FROM completed_at - created_at)) AS mean_s "
                "FROM workflows GROUP BY workflow_type, status"
            )
        by_status: dict[str, int] = dict.fromkeys(WORKFLOW_STATUSES, 0)
        by_type: dict[str, dict[str, int]] = {}
        durations: dict[str, list[tuple[float, int]]] = {}
        for r in rows:
            by_status[r["status"]] += r["n"]
            by_type.setdefault(r["workflow_type"], {})[r["status"]] = r["n"]
            if r["mean_s"] is not None:
                durations.setdefault(r["workflow_type"], []).append((float(r["mean_s"]), r["n"]))
        mean = {t: sum(m * n for m, n in v) / sum(n for _, n in v) for t, v in durations.items()}
        return {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "by_type": by_type,
            "mean_duration_s": mean,
        }

    async def cleanup(self, older_than: timedelta | float) -> int:
        """Delete finished workflows (and their checkpoints) completed more than ``older_than``
        ago (a timedelta or seconds). Unfinished workflows are never deleted. Returns the count."""
        seconds = _older_than_s(older_than)
        async with self._pool.acquire() as c:
            deleted: int = await c.fetchval(
                "WITH gone AS (DELETE FROM workflows WHERE completed_at IS NOT NULL "
                "AND completed_at < now() - $1 * interval '1 second' RETURNING 1) SELECT count(*) FROM gone",
                seconds,
            )
        return deleted


def _update(
    workflow_id: str,
    assignments: str,
    args: list[Any],
    *,
    expected_version: int | None = None,
    allow_terminal: bool = False,
) -> tuple[str, list[Any]]:
    """A guarded UPDATE that bumps the version (compared with ``expected_version`` when given),
    without its RETURNING clause, and its parameters."""
    _check_id(workflow_id)
    if expected_version is not None and (not isinstance(expected_version, int) or expected_version < 1):
        raise InvalidInput("expected_version must be a positive integer", field="expected_version")
    n = len(args)
    where = f"id = ${n + 1} AND (${n + 2}::integer IS NULL OR version = ${n + 2})"
    if not allow_terminal:
        where += " AND completed_at IS NULL"
    sql = f"UPDATE workflows SET {assignments}, version = version + 1, updated_at = now() WHERE {where}"  # noqa: S608 - literals
    return sql, [*args, workflow_id, expected_version]


def _step_assignment(step: str, agents: list[str] | None, *, first: int = 1) -> tuple[str, list[Any]]:
    """``current_step`` and the agents added, its parameters numbered from ``first``."""
    if not isinstance(step, str) or not 0 < len(step) <= 200:
        raise InvalidInput("step must be a non-empty string of at most 200 characters", field="step")
    return (
        f"current_step = ${first}, "  # noqa: S608 - parameter numbers only
        f"agents = agents || ARRAY(SELECT a FROM unnest(${first + 1}::text[]) a WHERE NOT a = ANY(agents))",
        [step, _check_agents(agents or [])],
    )


def _with_step(assignments: str, args: list[Any], step: str | None, agents: list[str] | None) -> tuple[str, list[Any]]:
    """``assignments`` and, when ``step`` is given, :func:`_step_assignment`'s after them."""
    if step is None:
        return assignments, args
    step_sql, step_args = _step_assignment(step, agents, first=len(args) + 1)
    return f"{assignments}, {step_sql}", [*args, *step_args]


def _status_assignment(status: str) -> tuple[str, list[Any]]:
    _check_status(status)
    return (
        "status = $1, started_at = CASE WHEN $1 = 'running' THEN coalesce(started_at, now()) "
        "ELSE started_at END, completed_at = CASE WHEN $1 IN ('succeeded', 'failed', 'cancelled') "
        "THEN now() END",
        [status],
    )


def _completion_assignment(
    status: str,
    result: dict[str, Any] | None,
    errors: list[dict[str, Any]] | None,
    metadata: dict[str, Any] | None,
) -> tuple[str, list[Any]]:
    _check_status(status, allowed=TERMINAL_STATUSES)
    return (
        "status = $1, result = $2, errors = $3, metadata = metadata || $4::jsonb, completed_at = now()",
        [
            status,
            None if result is None else _json_field(result, "result", dict),
            _json_field([] if errors is None else errors, "errors", list),
            _json_field({} if metadata is None else metadata, "metadata", dict),
        ],
    )


def _refused(current: Workflow, expected_version: int | None) -> Conflict:
    details = {"current_version": current.version, "status": current.status}
    if current.is_terminal:
        return Conflict(
            f"workflow {current.id} already finished as {current.status}; it can no longer change",
            resource=current.id,
            details=details,
        )
    return Conflict(
        f"workflow {current.id} is at version {current.version}, not {expected_version}; "
        "re-read it and apply your change again",
        resource=current.id,
        field="expected_version",
        details=details,
    )


def _no_workflow(workflow_id: str) -> NotFound:
    return NotFound(f"no workflow {workflow_id}; list workflows to find its id", resource=workflow_id)
