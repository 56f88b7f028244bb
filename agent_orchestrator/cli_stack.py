"""``serve``, ``up`` and ``demo``: the orchestrator service and the whole stack."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:  # imported where used: the CLI starts without the stack's dependencies
    from agent_orchestrator.stack import Stack

__all__ = ["demo", "serve", "up"]

_out = Console()


def serve(port: int | None = typer.Option(None, help="Port (default: AO_PORTS['orchestrator'], 8001).")) -> None:
    """Run the orchestrator API and its workflow runner (one replica)."""
    from agent_orchestrator.app import create_app
    from agents.sdk.app import exit_if_serving_failed
    from shared.lib.bootstrap import bootstrap
    from shared.lib.http_service import serve as serve_app

    settings = bootstrap("orchestrator")
    port = port or settings.port_for("orchestrator")
    app = create_app(settings, port=port)
    serve_app(app, host=settings.host, port=port, service="orchestrator", log_level=settings.log_level)
    exit_if_serving_failed(app, "orchestrator")


def _stack(*, docs_instances: int, replicas: int, env: dict[str, str] | None = None) -> object:
    import os

    from agent_orchestrator.stack import Stack
    from shared.lib.bootstrap import configure_logging
    from shared.lib.settings import load_settings

    # The supervisor serves nothing itself: it reads URLs, ports and the data dir, and hands
    # the services the configured secrets, or random ones, so they never run on defaults.
    settings = load_settings(dev_mode=True)
    configure_logging(settings.log_level)
    dev = os.environ.get("AO_DEV_MODE", "").lower() in {"1", "true", "yes"}
    return Stack(
        settings,
        dev_mode=dev,
        extra_instances={"documentation": docs_instances - 1},
        orchestrator_replicas=replicas,
        env_overrides=env or {},
    )


def _stop_uninterrupted(stack: object) -> None:
    """Stop everything, ignoring further Ctrl-C: make and uv forward the same interrupt again,
    and a second KeyboardInterrupt would abandon the cleanup halfway (servers left running)."""
    from agent_orchestrator.stack import Stack

    assert isinstance(stack, Stack)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stack.stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def _announce(stack: Stack) -> None:
    """What ``up`` prints once the stack is up: its services, the API key, where its secrets are,
    and in development mode, loudly, that nothing is checked."""
    _out.print("[bold green]stack is up[/]")
    for p in stack.processes:  # soft_wrap: a URL or path split across lines cannot be copied
        _out.print(f"  {p.name:<22} {p.url}  (log: {p.log})", soft_wrap=True, highlight=False, markup=False)
    checked = "not checked: development mode" if stack.dev_mode else "send it as X-API-Key"
    _out.print(f"  API key: {stack.api_key}   ({checked})", soft_wrap=True, highlight=False, markup=False)
    _out.print(
        f"  secrets: {stack.secrets_file}   (mode 0600: the registration secret, signing key and API keys "
        "it runs with; agent-orchestrator commands run with this data dir use them)",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    if stack.dev_mode:
        _out.print(
            "[bold red]!!! DEVELOPMENT MODE (AO_DEV_MODE): API keys, agent tokens and signatures are NOT "
            "checked; anyone who reaches these ports controls the stack. Never expose it beyond this "
            "machine. !!![/]",
            soft_wrap=True,
        )
    _out.print("Ctrl-C stops everything; a service that exits by itself is started again.")


def up(
    docs_instances: int = typer.Option(2, min=1, help="Documentation agent instances."),
    replicas: int = typer.Option(1, min=1, help="Orchestrator replicas."),
) -> None:
    """Serve the whole stack until Ctrl-C, printing its URLs."""
    from agent_orchestrator.stack import Stack

    stack = _stack(docs_instances=docs_instances, replicas=replicas)
    assert isinstance(stack, Stack)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stack.start()
    try:
        _announce(stack)
        while not stopped.wait(1.0):
            for line in stack.supervise():
                _out.print(line, soft_wrap=True, highlight=False, markup=False)
    except KeyboardInterrupt:
        pass
    finally:
        _out.print("stopping...")
        _stop_uninterrupted(stack)


def demo(
    work_dir: Annotated[Path | None, typer.Option(help="Where the sample repository goes (default: data dir).")] = None,
) -> None:
    """Start the stack, run the three reference workflows through the API, print what they did, stop."""
    from agent_orchestrator.demo import run_demo, summary_table
    from agent_orchestrator.stack import Stack

    # Short heartbeat TTLs so the killed instance of the self-healing scenario is noticed in seconds.
    stack = _stack(docs_instances=2, replicas=1, env={"AO_HEARTBEAT_INTERVAL_S": "1", "AO_AGENT_STALE_AFTER_S": "3"})
    assert isinstance(stack, Stack)
    _out.print("starting the stack (PostgreSQL, Redis, registry, 6 agents, orchestrator)...")
    stack.start()
    try:
        results = run_demo(stack, work_dir=(work_dir or stack.settings.data_dir / "demo"), out=_out)
    finally:
        _stop_uninterrupted(stack)
    _out.print(summary_table(results))
    if not all(r.ok for r in results):
        raise typer.Exit(1)
    _out.print("[bold green]all three workflows succeeded[/]")
