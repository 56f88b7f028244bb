"""The orchestrator's HTTP API (port 8001): workflows, their events and history,
pending human approvals, workflow types.

Every route except the operations ones needs an API key outside dev mode. Every
body is a pydantic model, so a wrong type or a missing field gets a 422 naming
the field; anything the service refuses comes back through the one error
handler as a JSON body naming the field or resource.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from sse_starlette import EventSourceResponse, ServerSentEvent

from agent_orchestrator.event_watch import Feed
from agent_orchestrator.records import WorkflowRecord
from agent_orchestrator.service import Orchestrator
from shared.lib.agent_events import Event
from shared.lib.errors import InvalidInput
from shared.lib.http_service import ApiKeyDep
from shared.lib.safe_input import BIGINT_MAX
from shared.lib.workflow_state import TERMINAL_STATUSES, WORKFLOW_STATUSES, WORKFLOW_TYPE_PATTERN, canonical_workflow_id

__all__ = ["CancelRequest", "LaunchRequest", "ResumeRequest", "workflows_router"]

_SSE_POLL_S = 1.0
_SSE_READ_LIMIT = 500
#: The line separator of the event stream (sse-starlette's default, given to the events encoded here too).
_SSE_SEP = "\r\n"
#: The longest ``POST /workflows?wait_s=`` a launch may wait for its outcome.
_MAX_WAIT_S = 300.0
_TYPE_NAME = re.compile(WORKFLOW_TYPE_PATTERN)


class _Body(BaseModel):
    """A request body: a field it does not take is a 422 naming it, not dropped (a misspelt
    ``idempotency_kye`` would launch the workflow again)."""

    model_config = ConfigDict(extra="forbid")


class LaunchRequest(_Body):
    workflow_type: str = Field(min_length=1, max_length=100)
    input: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class ResumeRequest(_Body):
    decision: Any = Field(description="The answer to the pending interrupt, e.g. {'decision': 'approve', 'by': 'ana'}")


class CancelRequest(_Body):
    """A cancel takes no fields: its body may be left out, or be ``{}``."""


async def _orchestrator(request: Request) -> Orchestrator:  # async: no thread-pool hop
    orch: Orchestrator = request.app.state.orchestrator
    return orch


OrchestratorDep = Annotated[Orchestrator, Depends(_orchestrator)]


def _workflow_id(value: str) -> str:
    try:
        return canonical_workflow_id(value)
    except InvalidInput as e:
        raise PydanticCustomError(
            "uuid_parsing", "must be a UUID, like {example}", {"example": str(uuid.UUID(int=0))}
        ) from e


#: A workflow id path parameter, in its canonical spelling (ids are pasted from elsewhere).
WorkflowId = Annotated[
    str,
    Path(description="Workflow id: a UUID in any spelling (upper case, no hyphens, braces)."),
    AfterValidator(_workflow_id),
]


def _view(record: WorkflowRecord) -> dict[str, Any]:
    return record.to_api()


async def _workflow_view(orch: Orchestrator, workflow_id: str, *, with_state: bool) -> dict[str, Any]:
    record = await orch.records.get(workflow_id)
    view = _view(record)
    if with_state:
        view["state"] = jsonable_encoder(await orch.state(record))
    return view


def _check_filters(*, status: str | None, workflow_type: str | None) -> None:
    """A listing's filters name a known status and a well-formed type name, of a type this replica
    runs or not: workflows of a plug-in type are listed by a replica without the plug-in too."""
    if status is not None and status not in WORKFLOW_STATUSES:
        raise InvalidInput(f"status must be one of {list(WORKFLOW_STATUSES)}", field="status")
    if workflow_type is not None and not _TYPE_NAME.fullmatch(workflow_type):
        raise InvalidInput(f"type must be a workflow type's name, matching {WORKFLOW_TYPE_PATTERN}", field="type")


def workflows_router() -> APIRouter:
    router = APIRouter(dependencies=[ApiKeyDep])

    @router.post("/workflows", status_code=202)
    async def launch(
        body: LaunchRequest,
        orch: OrchestratorDep,
        wait_s: float = Query(
            default=0,
            ge=0,
            le=_MAX_WAIT_S,
            description="Wait this long for the workflow to finish or stop at an interrupt; "
            "200 with its outcome if it did.",
        ),
        stream: bool = Query(
            default=False,
            description="Answer 200 with the workflow's event stream (server-sent events, as "
            "GET /workflows/{id}/events), opened by a workflow.launched event.",
        ),
    ) -> Response:
        if stream and wait_s > 0:
            raise InvalidInput("give stream or wait_s, not both", field="stream")
        if stream:
            return await _launch_streamed(orch, body)
        if wait_s == 0:
            record, created = await orch.launch(body.workflow_type, body.input, idempotency_key=body.idempotency_key)
            return JSONResponse(_launched_view(record, created), status_code=202)
        async with _launched(orch, body) as (launched, feed):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    outcome = await _outcome(orch, launched["workflow_id"], feed)
                    return JSONResponse({**launched, **outcome}, status_code=200)
        return JSONResponse(launched, status_code=202)

    @router.get("/workflows")
    async def list_workflows(
        orch: OrchestratorDep,
        status: str | None = None,
        type: str | None = None,
        limit: int = Query(default=50, ge=1, le=500),
        cursor: str | None = None,
    ) -> dict[str, Any]:
        _check_filters(status=status, workflow_type=type)
        items, next_cursor = await orch.records.page(status=status, workflow_type=type, limit=limit, cursor=cursor)
        return {"items": [_view(r) for r in items], "next_cursor": next_cursor}

    @router.get("/workflows/{workflow_id}")
    async def get_workflow(
        orch: OrchestratorDep,
        workflow_id: WorkflowId,
        state: bool = Query(
            default=True,
            description="Include the workflow's state (its latest checkpoint's values); false spares "
            "a client that polls for the status the checkpoint read.",
        ),
    ) -> dict[str, Any]:
        return await _workflow_view(orch, workflow_id, with_state=state)

    @router.post("/workflows/{workflow_id}/resume", status_code=202)
    async def resume(body: ResumeRequest, orch: OrchestratorDep, workflow_id: WorkflowId) -> dict[str, Any]:
        return _view(await orch.resume(workflow_id, body.decision))

    @router.post("/workflows/{workflow_id}/cancel", status_code=202)
    async def cancel(
        orch: OrchestratorDep, workflow_id: WorkflowId, _: Annotated[CancelRequest | None, Body()] = None
    ) -> dict[str, Any]:
        return _view(await orch.cancel(workflow_id))

    return router


def _workflow_views_router() -> APIRouter:
    """History, events, pending interrupts and workflow types: reads beside the workflow itself."""
    router = APIRouter(dependencies=[ApiKeyDep])

    @router.get("/workflows/{workflow_id}/history")
    async def history(
        orch: OrchestratorDep, workflow_id: WorkflowId, limit: int = Query(default=100, ge=1, le=1000)
    ) -> dict[str, Any]:
        return {"workflow_id": workflow_id, "checkpoints": await orch.history(workflow_id, limit=limit)}

    @router.get("/workflows/{workflow_id}/events")
    async def events(
        orch: OrchestratorDep,
        workflow_id: WorkflowId,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> Response:
        status = await orch.records.require(workflow_id)  # 404 before the stream starts
        after = _parse_last_id(last_event_id)
        if after:
            await _check_received(orch, workflow_id, after)
        if status not in _TERMINAL:
            return EventSourceResponse(_followed_stream(orch, workflow_id, after), ping=15, sep=_SSE_SEP)
        stored = await _events_after(orch, workflow_id, after, limit=_SSE_READ_LIMIT)
        if not stored:
            return Response(status_code=204)  # all received: an EventSource stops reconnecting
        return EventSourceResponse(_replayed_stream(orch, workflow_id, stored), ping=15, sep=_SSE_SEP)

    @router.get("/interrupts")
    async def interrupts(orch: OrchestratorDep, limit: int = Query(default=100, ge=1, le=1000)) -> dict[str, Any]:
        rows = await orch.records.run_store.pending_interrupts(limit=limit)
        return {
            "items": [
                {
                    "workflow_id": r["workflow_id"],
                    "workflow_type": r["workflow_type"],
                    "interrupt": r["pending_interrupt"],
                    "expires_at": r["wait_deadline"],
                    "waiting_since": r["updated_at"],
                }
                for r in rows
            ]
        }

    @router.get("/workflow-types")
    async def workflow_types(orch: OrchestratorDep) -> dict[str, Any]:
        return {
            "items": [
                {
                    "name": t.name,
                    "description": t.description,
                    "input_schema": t.input_schema(),
                    "resume_schema": t.resume_schema(),
                    "mermaid": t.mermaid(),
                }
                for t in orch.types.values()
            ],
            "skipped": [{"name": name, "reason": why} for name, why in sorted(orch.failed_types.items())],
        }

    return router


def _parse_last_id(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not (value.isascii() and value.isdigit()) or int(value) > BIGINT_MAX:  # "²".isdigit(), but int() refuses it
        raise InvalidInput(
            f"Last-Event-ID must be the integer id (0 to {BIGINT_MAX}) of an event already received",
            field="Last-Event-ID",
        )
    return int(value)


async def _check_received(orch: Orchestrator, workflow_id: str, after: int) -> None:
    """Refuse a Last-Event-ID past the workflow's latest stored event: no event of this workflow
    has such an id, so it was not received from this stream (ids are the events table's, shared
    by every workflow). An event reaches a stream once it is stored, so the id of any event a
    client received is at most the latest. Followed, such an id would hide every event to come,
    the terminal one too."""
    latest = await orch.records.last_event_id(workflow_id)
    if latest is None or after > latest:
        raise InvalidInput(
            f"Last-Event-ID {after} is past this workflow's latest event ({latest or 'none yet'}); send the id "
            "of the last event received from this workflow's stream, or no Last-Event-ID to start from its first",
            field="Last-Event-ID",
        )


_TERMINAL = TERMINAL_STATUSES
_STOPPED = TERMINAL_STATUSES | {"interrupted"}


def _launched_view(record: WorkflowRecord, created: bool) -> dict[str, Any]:
    return {"workflow_id": record.workflow_id, "status": record.status, "created": created}


@contextlib.asynccontextmanager
async def _launched(orch: Orchestrator, body: LaunchRequest) -> AsyncIterator[tuple[dict[str, Any], Feed]]:
    """Launch, with the workflow's feed open from before it exists: a new workflow's events all
    arrive live, so following it reads no table. A repeated idempotency key gives the existing
    workflow, followed from its stored events."""
    new_id = str(uuid.uuid4())
    async with orch.watch.follow(new_id, new=True) as feed:
        record, created = await orch.launch(
            body.workflow_type, body.input, idempotency_key=body.idempotency_key, workflow_id=new_id
        )
        if created:
            yield _launched_view(record, created), feed
            return
    async with orch.watch.follow(record.workflow_id) as feed:
        yield _launched_view(record, created), feed


async def _launch_streamed(orch: Orchestrator, body: LaunchRequest) -> EventSourceResponse:
    """``POST /workflows?stream=true``: the launch, then the workflow's events to its terminal
    status. The launch happens before the response starts, so a refused one answers 4xx."""
    launched: dict[str, Any] = {}
    chunks = _launch_then_follow(orch, body, launched)
    first = await anext(chunks)  # launches (or raises)
    return EventSourceResponse(
        _prepend(first, chunks),
        ping=15,
        sep=_SSE_SEP,
        headers={"Location": f"/workflows/{launched['workflow_id']}"},
    )


async def _launch_then_follow(
    orch: Orchestrator, body: LaunchRequest, launched: dict[str, Any]
) -> AsyncGenerator[bytes, None]:
    """A ``workflow.launched`` event (no id: it is not stored) with what a plain launch answers
    (also put in ``launched``), then the workflow's events as server-sent events. The first
    chunk holds the launch's own events too: they are in the feed when the launch returns."""
    async with _launched(orch, body) as (view, feed):
        launched.update(view)
        head = ServerSentEvent(data=orjson.dumps(view).decode(), event="workflow.launched", sep=_SSE_SEP).encode()
        async for batch in _follow(orch, view["workflow_id"], 0, feed):
            yield head + _sse(batch)
            head = b""


async def _prepend(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


async def _followed_stream(orch: Orchestrator, workflow_id: str, after: int) -> AsyncIterator[bytes]:
    """The workflow's events after ``after`` as server-sent events, to its terminal status."""
    async with orch.watch.follow(workflow_id) as feed:
        async for batch in _follow(orch, workflow_id, after, feed):
            yield _sse(batch)


async def _replayed_stream(orch: Orchestrator, workflow_id: str, stored: list[Event]) -> AsyncIterator[bytes]:
    """A finished workflow's stored events from ``stored`` (the first page) on, to the last one:
    nothing more will come, so nothing is followed live."""
    while stored:
        yield _sse(stored)
        if len(stored) < _SSE_READ_LIMIT:
            return
        stored = await _events_after(orch, workflow_id, stored[-1].id, limit=_SSE_READ_LIMIT)


def _sse(batch: list[Event]) -> bytes:
    """A batch of events as server-sent events, in one chunk (one write to the socket)."""
    return b"".join(
        ServerSentEvent(
            data=orjson.dumps(ev.payload).decode(), event=ev.event_type, id=str(ev.id), sep=_SSE_SEP
        ).encode()
        for ev in batch
    )


async def _outcome(orch: Orchestrator, workflow_id: str, feed: Feed) -> dict[str, Any]:
    """The data of the workflow's status event once it is terminal or ``interrupted``: the last
    status of a batch is the current one (the first batch replays every stored event)."""
    async for batch in _follow(orch, workflow_id, 0, feed, until=_STOPPED):
        if _status(batch) in _STOPPED:
            return dict(next(ev.payload for ev in reversed(batch) if ev.event_type == "workflow.status"))
    raise AssertionError("unreachable: _follow ends at a stopping status")  # pragma: no cover


async def _follow(
    orch: Orchestrator, workflow_id: str, after: int, feed: Feed, *, until: frozenset[str] = _TERMINAL
) -> AsyncIterator[list[Event]]:
    """Replay stored events after ``after``, then follow live ones, in batches (each in id order),
    until a batch's last status is in ``until``.

    The feed (subscribed before the table is read) hands over each event as it is
    published, so following costs no query per event. The table is read again
    whenever the feed may have missed one: at the start (unless the feed was open
    before the workflow existed), after the subscription reconnected, and after
    ``_SSE_POLL_S`` without an event. An event is given once,
    whichever way it came, so a reconnect with ``Last-Event-ID`` misses nothing and
    never sees an event twice.
    """
    floor, sent = after, set[int]()  # the client has everything up to its Last-Event-ID
    while True:  # sse-starlette ends the generator when the client goes away
        events = await _next_events(orch, feed, workflow_id, after)
        fresh = [ev for ev in events if ev.id not in sent]  # not given by this stream before
        batch = [ev for ev in fresh if ev.id > floor]
        if batch:
            sent.update(ev.id for ev in batch)
            after = max(after, *(ev.id for ev in batch))
            yield batch
        # sent now, or the client had it (at or below its Last-Event-ID): nothing follows it. An
        # event this stream sent before and reads again says nothing new (a later one may have).
        if _status(fresh) in until:
            return
        if not feed.arrived.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(feed.arrived.wait(), timeout=_SSE_POLL_S)
            feed.stale = feed.stale or not feed.arrived.is_set()  # a quiet second: look at the table


def _status(batch: list[Event]) -> str | None:
    """The last status a batch of events reports, if any."""
    statuses = [ev.payload.get("status") for ev in batch if ev.event_type == "workflow.status"]
    return statuses[-1] if statuses else None


async def _next_events(orch: Orchestrator, feed: Feed, workflow_id: str, after: int) -> list[Event]:
    """What the feed brought; after the table's events past ``after`` when the feed is stale."""
    live = feed.take()
    if not feed.stale:
        return live
    stored = await _events_after(orch, workflow_id, after, limit=_SSE_READ_LIMIT)
    feed.stale = len(stored) == _SSE_READ_LIMIT  # more to read before following live
    return sorted({ev.id: ev for ev in [*stored, *live]}.values(), key=lambda ev: ev.id)


async def _events_after(orch: Orchestrator, workflow_id: str, after: int, *, limit: int) -> list[Event]:
    return await orch.bus.events_since(after, aggregate_type="workflow", aggregate_id=workflow_id, limit=limit)


def mount(app: FastAPI) -> None:
    app.include_router(workflows_router())
    app.include_router(_workflow_views_router())
