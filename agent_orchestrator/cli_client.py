"""``run``, ``status``, ``approve`` and ``reject``: the orchestrator API from a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

import httpx
import orjson
import typer
from rich.console import Console
from rich.live import Live
from rich.prompt import Confirm, Prompt
from rich.table import Table

from shared.lib.errors import InvalidInput, OrchestratorError, ServiceUnavailable
from shared.lib.workflow_state import TERMINAL_STATUSES

__all__ = ["approve", "reject", "run", "status"]

_out = Console()
_STOPPED = TERMINAL_STATUSES | {"interrupted"}


def _client() -> httpx.Client:
    from shared.lib.settings import load_settings

    settings = load_settings(dev_mode=True)  # a client needs no server secrets
    key = settings.api_key or (settings.api_keys[0] if settings.api_keys else "")
    return httpx.Client(
        base_url=settings.url_for("orchestrator"), headers={"X-API-Key": key} if key else {}, timeout=30.0
    )


def _call(client: httpx.Client, method: str, path: str, body: Any = None) -> dict[str, Any]:
    try:
        r = client.request(method, path, json=body)
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
    raise OrchestratorError(f"{r.status_code} {err.get('code', '')}: {err.get('message', r.text)}")


def _table(wf: dict[str, Any]) -> Table:
    table = Table(show_header=False, title=f"workflow {wf['workflow_id']}")
    for key in ("workflow_type", "status", "current_step", "reason", "stuck"):
        if wf.get(key) not in (None, ""):
            table.add_row(key, str(wf[key]))
    if wf.get("pending_interrupt"):
        table.add_row("waiting on", orjson.dumps(wf["pending_interrupt"], option=orjson.OPT_INDENT_2).decode())
    if wf.get("result"):
        table.add_row("result", orjson.dumps(wf["result"], option=orjson.OPT_INDENT_2).decode()[:4000])
    return table


def _ask_approval(client: httpx.Client, wf: dict[str, Any]) -> None:
    _out.print(_table(wf))
    ok = Confirm.ask("approve?")
    by = Prompt.ask("your name", default="cli")
    comment = Prompt.ask("comment", default="")
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
    """The events a request answers with; an error answer raised as :func:`_call` does."""
    try:
        with client.stream(method, path, timeout=httpx.Timeout(30.0, read=None), **kwargs) as r:
            if r.status_code >= 400:
                r.read()
                _refused(r)
            yield from _sse(r)
    except httpx.HTTPError as e:
        raise ServiceUnavailable(f"lost the orchestrator at {client.base_url}: {e}; is it running?") from e


def _watch(events: Iterator[dict[str, Any]], view: dict[str, Any]) -> str:
    """Show the workflow live as its events come; the status it stopped at (terminal or
    ``interrupted``). ``view["last_id"]`` is the last event received, to follow on from."""
    with Live(_table(view), console=_out, refresh_per_second=8) as live:
        for ev in events:
            data = ev.get("data") or {}
            view["last_id"] = ev.get("id", view.get("last_id"))
            if ev["event"] == "workflow.launched":
                view["workflow_id"] = data["workflow_id"]
            elif ev["event"] == "workflow.node":
                view["current_step"] = data.get("node")
            elif ev["event"] == "workflow.status":
                view["status"] = data["status"]
                view["reason"] = data.get("reason")
            live.update(_table(view))
            if ev["event"] == "workflow.status" and data["status"] in _STOPPED:
                return str(data["status"])
    raise ServiceUnavailable(f"the event stream of workflow {view.get('workflow_id')} ended before it stopped")


def _follow(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """Launch streaming and follow to the end; answer each approval at the prompt on the way."""
    view: dict[str, Any] = {"workflow_id": "(launching)", "workflow_type": body["workflow_type"]}
    status = _watch(_stream(client, "POST", "/workflows", params={"stream": "true"}, json=body), view)
    while status == "interrupted":
        _ask_approval(client, _call(client, "GET", f"/workflows/{view['workflow_id']}"))
        headers = {"Last-Event-ID": str(view["last_id"])}
        status = _watch(_stream(client, "GET", f"/workflows/{view['workflow_id']}/events", headers=headers), view)
    return _call(client, "GET", f"/workflows/{view['workflow_id']}")


def run(
    workflow_type: str = typer.Argument(..., help="A type from GET /workflow-types."),
    input_json: str = typer.Option("{}", "--input", help="The workflow input, as JSON."),
    follow: bool = typer.Option(False, "--follow", help="Show progress live; prompt at an approval."),
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
            _out.print(f"workflow {launched['workflow_id']} is {launched['status']}")
            return
        wf = _follow(client, body)
    _out.print(_table(wf))
    if wf["status"] != "succeeded":
        raise typer.Exit(1)


def status(workflow_id: str) -> None:
    """Show a workflow's status, step, pending approval and result."""
    with _client() as client:
        _out.print(_table(_call(client, "GET", f"/workflows/{workflow_id}")))


def _decide(workflow_id: str, decision: str, by: str, comment: str) -> None:
    with _client() as client:
        wf = _call(
            client,
            "POST",
            f"/workflows/{workflow_id}/resume",
            {"decision": {"decision": decision, "by": by, "comment": comment}},
        )
    _out.print(f"workflow {workflow_id}: {decision} sent; it is {wf['status']}")


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
