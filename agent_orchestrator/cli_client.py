"""``run``, ``status``, ``approve`` and ``reject``: the orchestrator API from a terminal."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import typer
from rich.console import Console
from rich.live import Live
from rich.prompt import Confirm, Prompt
from rich.table import Table

from shared.lib.errors import InvalidInput, OrchestratorError, ServiceUnavailable

__all__ = ["approve", "reject", "run", "status"]

_out = Console()
_TERMINAL = {"succeeded", "failed", "cancelled"}


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
    data: dict[str, Any] = r.json() if r.content else {}
    if r.status_code >= 400:
        err = data.get("error", {})
        raise OrchestratorError(f"{r.status_code} {err.get('code', '')}: {err.get('message', r.text)}")
    return data


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


def _follow(client: httpx.Client, workflow_id: str, *, interactive: bool) -> dict[str, Any]:
    with Live(console=_out, refresh_per_second=4) as live:
        while True:
            wf = _call(client, "GET", f"/workflows/{workflow_id}")
            live.update(_table(wf))
            if wf["status"] in _TERMINAL or (wf["status"] == "interrupted" and interactive):
                return wf
            time.sleep(0.3)


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
    with _client() as client:
        launched = _call(
            client,
            "POST",
            "/workflows",
            {"workflow_type": workflow_type, "input": data, "idempotency_key": idempotency_key},
        )
        _out.print(f"workflow {launched['workflow_id']} is {launched['status']}")
        if not follow:
            return
        wf = _follow(client, launched["workflow_id"], interactive=True)
        while wf["status"] == "interrupted":
            _ask_approval(client, wf)
            wf = _follow(client, launched["workflow_id"], interactive=True)
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
