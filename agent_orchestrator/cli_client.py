"""``run``, ``status``, ``list``, ``approve``, ``reject`` and ``cancel``: the orchestrator API
from a terminal."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any, NoReturn

import httpx
import orjson
import typer
from rich.console import Console
from rich.live import Live
from rich.prompt import Prompt
from rich.table import Table
from rich.text import Text

from shared.lib.errors import InvalidInput, OrchestratorError, ServiceUnavailable
from shared.lib.workflow_state import TERMINAL_STATUSES, canonical_workflow_id

__all__ = ["approve", "cancel", "list_workflows", "reject", "run", "status"]

#: No markup: what is printed is the API's text (reasons, JSON, error messages), whose square
#: brackets rich would take for style tags and drop.
_out = Console(markup=False)
_STOPPED = TERMINAL_STATUSES | {"interrupted"}
#: How long ``run --follow`` keeps reconnecting to a lost event stream before it gives up.
_RECONNECT_S = 120.0
_RECONNECT_PAUSE_S = 0.5
#: How often ``run --follow`` says it is still reconnecting (a line every pause was noise).
_RECONNECT_SAY_S = 10.0
#: What a refused key means for the CLI, whose key is a setting, not a header the user writes.
_KEY_HINT = (
    "the CLI sends AO_API_KEY, else the first of AO_API_KEYS, else the key of the stack `make up` "
    "runs from this directory"
)


def _client() -> httpx.Client:
    from shared.lib.settings import load_settings

    settings = load_settings(dev_mode=True)  # a client needs no server secrets
    key = settings.api_key or (settings.api_keys[0] if settings.api_keys else "")
    return httpx.Client(base_url=settings.orchestrator_url, headers={"X-API-Key": key} if key else {}, timeout=30.0)


def _call(
    client: httpx.Client, method: str, path: str, body: Any = None, *, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    try:
        r = client.request(method, path, json=body, params=params)
    except httpx.HTTPError as e:
        raise ServiceUnavailable(f"cannot reach the orchestrator at {client.base_url}: {e}; is it running?") from e
    if r.status_code >= 400:
        _refused(r)
    data: dict[str, Any] = r.json() if r.content else {}
    return data


def _refused(r: httpx.Response) -> NoReturn:
    try:
        err = r.json().get("error", {})
    except ValueError:
        err = {}
    unavailable = r.status_code in (502, 503, 504)  # a restarting or overloaded orchestrator: try again
    error = ServiceUnavailable if unavailable else OrchestratorError
    hint = f" ({_KEY_HINT})" if r.status_code == 401 else ""
    raise error(f"{r.status_code} {err.get('code', '')}: {err.get('message', r.text)}{hint}")


def _table(wf: dict[str, Any]) -> Table:
    # The title is as wide as the table and would wrap there, splitting the id people copy.
    title = Text(f"workflow {wf.get('workflow_id', '(launching)')}", no_wrap=True, overflow="ignore")
    table = Table(show_header=False, title=title)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # whole: digests and paths are copied from here
    for key in ("workflow_type", "status", "current_step", "reason", "stuck"):
        if wf.get(key) not in (None, ""):
            table.add_row(key, str(wf[key]))
    if wf.get("pending_interrupt"):
        table.add_row("waiting on", orjson.dumps(wf["pending_interrupt"], option=orjson.OPT_INDENT_2).decode())
    if wf.get("result"):
        table.add_row("result", _cut(orjson.dumps(wf["result"], option=orjson.OPT_INDENT_2).decode(), wf))
    return table


#: How much of a result a table shows; the rest is a GET away.
_RESULT_CHARS = 4000


def _cut(text: str, wf: dict[str, Any]) -> str:
    """``text``, or its first :data:`_RESULT_CHARS` characters and where the whole of it is."""
    if len(text) <= _RESULT_CHARS:
        return text
    where = f"GET /workflows/{wf['workflow_id']}" if wf.get("workflow_id") else "the record"
    return f"{text[:_RESULT_CHARS]}\n... ({len(text) - _RESULT_CHARS} more characters: {where} has it whole)"


def _ask_approval(client: httpx.Client, wf: dict[str, Any]) -> None:
    """Ask for the decision at the prompt and send it; with no one to answer (stdin closed), leave
    the workflow waiting, say how to answer it later, and exit 1."""
    _out.print(_table(wf), crop=False)
    try:
        # the words the interrupt's answer_with names, or y / n
        ok = Prompt.ask("approve?", choices=["y", "n", "approve", "reject"]) in {"y", "approve"}
        by = Prompt.ask("your name", default="cli")
        comment = Prompt.ask("comment", default="")
    except EOFError:
        wf_id = wf["workflow_id"]
        _out.print(
            f"\nno answer (stdin is closed): workflow {wf_id} waits for its approval; answer it with "
            f"agent-orchestrator approve {wf_id} (or reject)",
            soft_wrap=True,
        )
        raise typer.Exit(1) from None
    decision = {"decision": "approve" if ok else "reject", "by": by, "comment": comment}
    _call(client, "POST", f"/workflows/{wf['workflow_id']}/resume", {"decision": decision})


def _sse(r: httpx.Response) -> Iterator[dict[str, Any]]:
    """The server-sent events of a response, as ``{"event", "data"[, "id"]}``."""
    event: dict[str, Any] = {}
    for line in r.iter_lines():
        field, _, value = line.partition(":")
        if field in ("id", "event"):
            event[field] = value.strip()
        elif field == "data":
            event["data"] = orjson.loads(value)
        elif line == "" and "event" in event:
            yield event
            event = {}


def _stream(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """The events a request answers with (none for a 204); an error answer raised as :func:`_call` does."""
    try:
        with client.stream(method, path, timeout=httpx.Timeout(30.0, read=None), **kwargs) as r:
            if r.status_code >= 400:
                r.read()
                _refused(r)
            yield from _sse(r)
    except httpx.HTTPError as e:
        what = "cannot reach" if isinstance(e, httpx.ConnectError) else "lost"
        raise ServiceUnavailable(f"{what} the orchestrator at {client.base_url}: {e}") from e


def _watch(events: Iterator[dict[str, Any]], view: dict[str, Any]) -> str | None:
    """Show the workflow as its events come: a live table on a terminal (gone once it stops:
    the table printed next shows the same), a line per event elsewhere (a log, a pipe). The
    status it stopped at (terminal or ``interrupted``), or None when the stream ended first.
    ``view["last_id"]`` is the last event received, to follow on from; ``view["alive"]`` when
    the stream last answered."""
    if not _out.is_terminal:
        for ev in events:
            stopped = _see(ev, view)
            _out.print(_line(ev, view), soft_wrap=True)
            if stopped is not None:
                return stopped
        return None
    with Live(_table(view), console=_out, refresh_per_second=8, transient=True) as live:
        for ev in events:
            stopped = _see(ev, view)
            live.update(_table(view))
            if stopped is not None:
                return stopped
    return None


def _see(ev: dict[str, Any], view: dict[str, Any]) -> str | None:
    """Take an event into the view; the status the workflow stopped at, if it did."""
    data = ev.get("data") or {}
    view["alive"] = time.monotonic()
    view.pop("said_lost", None)  # back: the next loss is said at once
    view["last_id"] = ev.get("id", view.get("last_id"))
    if ev["event"] == "workflow.launched":
        view["workflow_id"] = data["workflow_id"]
    elif ev["event"] == "workflow.node":  # the node running by then, when it says one
        view["current_step"] = data.get("current_step", data.get("node"))
    elif ev["event"] == "workflow.resumed":  # answered: pending until a replica runs it
        view["status"] = data.get("status", view.get("status"))
    elif ev["event"] == "workflow.status":
        view["status"] = data["status"]
        view["reason"] = data.get("reason")
        # at an interrupt, the node that waits (approval), as `status` shows it, not the last one done
        view["current_step"] = data.get("current_step", view.get("current_step"))
        if data["status"] in _STOPPED:
            return str(data["status"])
    return None


def _line(ev: dict[str, Any], view: dict[str, Any]) -> str:
    """An event as a line of a log."""
    data = ev.get("data") or {}
    if ev["event"] == "workflow.launched":
        return f"workflow {data['workflow_id']} launched"  # its statuses follow, as events
    if ev["event"] == "workflow.node":
        running = f"; {data['current_step']} runs" if data.get("current_step") else ""
        return f"  {data.get('node')} done in {data.get('duration_s', 0):.2f}s{running}"
    if ev["event"] == "workflow.status":
        at = f" at {data['current_step']}" if data.get("current_step") else ""
        reason = f": {data['reason']}" if data.get("reason") else ""
        return f"  {data['status']}{at}{reason}"
    return f"  {ev['event'].removeprefix('workflow.')}"


def _connect(client: httpx.Client, body: dict[str, Any], view: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The streamed launch until it answered (launched again, its idempotency key follows the same
    workflow); then the workflow's events after the last one received."""
    if "workflow_id" not in view:
        return _stream(client, "POST", "/workflows", params={"stream": "true"}, json=body)
    headers = {"Last-Event-ID": str(view["last_id"])} if view.get("last_id") else {}
    return _stream(client, "GET", f"/workflows/{view['workflow_id']}/events", headers=headers)


def _leg(client: httpx.Client, body: dict[str, Any], view: dict[str, Any]) -> str | None:
    """Follow one connection: the status the workflow stopped at, or None when the stream was lost
    first (the orchestrator restarting, say) and is to be connected again. An orchestrator
    unreachable from the start is raised at once; a lost one after ``_RECONNECT_S`` in vain."""
    try:
        stopped = _watch(_connect(client, body, view), view)
        if stopped is None and "workflow_id" in view:  # ended: a finished workflow has no more events
            wf = _call(client, "GET", f"/workflows/{view['workflow_id']}")
            stopped = wf["status"] if wf["status"] in TERMINAL_STATUSES else None
    except ServiceUnavailable as e:
        if "alive" not in view and isinstance(e.__cause__, httpx.ConnectError):
            raise ServiceUnavailable(f"{e.message}; is it running?") from e
        view.setdefault("alive", time.monotonic())
        if time.monotonic() - view["alive"] > _RECONNECT_S:
            see = f"; `agent-orchestrator status {view['workflow_id']}` shows it" if "workflow_id" in view else ""
            raise ServiceUnavailable(f"{e.message}; gave up after {_RECONNECT_S:.0f}s{see}") from e
        if time.monotonic() - view.get("said_lost", -_RECONNECT_SAY_S) >= _RECONNECT_SAY_S:
            _out.print(f"{e.message}; reconnecting", style="yellow")
            view["said_lost"] = time.monotonic()
        time.sleep(_RECONNECT_PAUSE_S)
        return None
    return stopped


def _follow(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """Launch streaming and follow to the end, as an EventSource does: a lost stream is connected
    again after the last event received. Each approval is answered at the prompt on the way."""
    body = {**body, "idempotency_key": body["idempotency_key"] or f"cli-{uuid.uuid4()}"}
    view: dict[str, Any] = {"workflow_type": body["workflow_type"]}
    status = _leg(client, body, view)
    while status not in TERMINAL_STATUSES:
        if status == "interrupted":
            _ask_approval(client, _call(client, "GET", f"/workflows/{view['workflow_id']}"))
        status = _leg(client, body, view)
    return _call(client, "GET", f"/workflows/{view['workflow_id']}")


def run(
    workflow_type: str = typer.Argument(..., help="A type from GET /workflow-types."),
    input_json: str = typer.Option("{}", "--input", help="The workflow input, as JSON."),
    follow: bool = typer.Option(
        False, "--follow", help="Show progress live, reconnecting when the stream is lost; prompt at an approval."
    ),
    idempotency_key: str | None = typer.Option(None, help="Launching twice with one key runs once."),
) -> None:
    """Launch a workflow."""
    try:
        data = orjson.loads(input_json)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"--input is not valid JSON: {e}", field="input") from e
    body = {"workflow_type": workflow_type, "input": data, "idempotency_key": idempotency_key}
    with _client() as client:
        if not follow:
            launched = _call(client, "POST", "/workflows", body)
            _out.print(f"workflow {launched['workflow_id']} is {launched['status']}", soft_wrap=True)
            return
        wf = _follow(client, body)
    _out.print(_table(wf), crop=False)
    if wf["status"] != "succeeded":
        raise typer.Exit(1)


def status(workflow_id: str) -> None:
    """Show a workflow's status, step, pending approval and result."""
    workflow_id = canonical_workflow_id(workflow_id)
    with _client() as client:
        _out.print(_table(_call(client, "GET", f"/workflows/{workflow_id}")), crop=False)


def list_workflows(
    status: str | None = typer.Option(None, help="Only workflows in this status (pending, running, ...)."),
    workflow_type: str | None = typer.Option(None, "--type", help="Only workflows of this type."),
    limit: int = typer.Option(20, min=1, max=500, help="How many, newest first."),
    cursor: str | None = typer.Option(None, help="Where the previous page stopped (its next cursor)."),
) -> None:
    """List workflows, newest first: id, type, status and current step."""
    params = {"status": status, "type": workflow_type, "limit": limit, "cursor": cursor}
    with _client() as client:
        page = _call(client, "GET", "/workflows", params={k: v for k, v in params.items() if v is not None})
    table = Table(box=None, header_style="bold")
    table.add_column("workflow_id", no_wrap=True, min_width=36)  # whole: it is what the other commands take
    for column in ("type", "status", "current_step"):
        table.add_column(column, overflow="fold")  # whole, not cut to "explain_modu…" when piped
    for wf in page["items"]:
        table.add_row(wf["workflow_id"], wf["workflow_type"], wf["status"], wf.get("current_step") or "")
    _out.print(table)
    if page.get("next_cursor"):  # a cursor goes on only with the filters it came with
        given = (("--status", status), ("--type", workflow_type))
        filters = "".join(f" {flag} {value}" for flag, value in given if value)
        _out.print(f"more:{filters} --cursor {page['next_cursor']}", soft_wrap=True)


#: What cancelling a running workflow does (``Orchestrator.cancel``, ``BusAgentCalls``).
_CANCEL_RUNNING = (
    "its running node stops now: the agent calls it waits on are cancelled at the agents, "
    "whose work (a test run, say) is killed within seconds"
)


def cancel(workflow_id: str) -> None:
    """Cancel a workflow that has not finished. A pending or waiting one is cancelled at once; a
    running one stops its current node at once: the agent calls it waits on are cancelled at the
    agents, whose work (a test run, say) is killed within seconds, then its locks are released."""
    workflow_id = canonical_workflow_id(workflow_id)
    with _client() as client:
        wf = _call(client, "POST", f"/workflows/{workflow_id}/cancel")
    now = f"it is {wf['status']}" if wf["status"] in TERMINAL_STATUSES else _CANCEL_RUNNING
    _out.print(f"workflow {workflow_id}: cancel sent; {now}", soft_wrap=True)


def _decide(workflow_id: str, decision: str, by: str, comment: str) -> None:
    workflow_id = canonical_workflow_id(workflow_id)
    with _client() as client:
        _call(
            client,
            "POST",
            f"/workflows/{workflow_id}/resume",
            {"decision": {"decision": decision, "by": by, "comment": comment}},
        )
    # The answer is queued: the workflow resumes once a runner takes it (it still reads interrupted).
    _out.print(
        f"workflow {workflow_id}: {decision} sent; it resumes (see: agent-orchestrator status {workflow_id})",
        soft_wrap=True,
    )


def approve(
    workflow_id: str, by: str = typer.Option("cli", help="Who approves."), comment: str = typer.Option("", help="Why.")
) -> None:
    """Approve a workflow waiting on a human approval."""
    _decide(workflow_id, "approve", by, comment)


def reject(
    workflow_id: str, by: str = typer.Option("cli", help="Who rejects."), comment: str = typer.Option("", help="Why.")
) -> None:
    """Reject a workflow waiting on a human approval."""
    _decide(workflow_id, "reject", by, comment)
