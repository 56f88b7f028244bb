"""The ``agent-orchestrator`` command: services, the stack, the demo and operator tools."""

from __future__ import annotations

import asyncio
import sys

import typer
from rich.console import Console
from rich.markup import escape

from agent_orchestrator import cli_bench, cli_client, cli_stack
from agent_orchestrator.cli_agents import agent
from agent_orchestrator.cli_bus import dlq_app, events_app
from agent_orchestrator.cli_locks import locks_app
from agent_orchestrator.cli_registry import registry
from agent_orchestrator.config_reference import config_reference
from shared.lib.errors import OrchestratorError

__all__ = ["app", "main"]

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Run and operate the multi-agent orchestrator.",
)
_err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Run and operate the multi-agent orchestrator."""


@app.command()
def migrate() -> None:
    """Apply the SQL migrations in config/state to DATABASE_URL (or the embedded server)."""
    from shared.lib.bootstrap import configure_logging
    from shared.lib.embedded import servers_for
    from shared.lib.migrations import apply_migrations
    from shared.lib.settings import load_settings

    settings = load_settings(dev_mode=True)  # migrating needs no secrets
    configure_logging(settings.log_level)
    with servers_for(settings.data_dir, database_url=settings.database_url, redis_url=None, with_redis=False) as urls:
        assert urls[0] is not None
        result = asyncio.run(apply_migrations(urls[0]))
    applied = ", ".join(result.applied) or "nothing to apply"
    typer.echo(f"schema at version {result.current_version}: {applied}")


app.command("registry")(registry)
app.command("agent")(agent)
app.command("serve")(cli_stack.serve)
app.command("up")(cli_stack.up)
app.command("demo")(cli_stack.demo)
app.command("run")(cli_client.run)
app.command("status")(cli_client.status)
app.command("list")(cli_client.list_workflows)
app.command("approve")(cli_client.approve)
app.command("reject")(cli_client.reject)
app.command("cancel")(cli_client.cancel)


app.add_typer(dlq_app, name="dlq")
app.add_typer(events_app, name="events")
app.add_typer(locks_app, name="locks")
app.command("config-reference")(config_reference)
app.command("bench")(cli_bench.bench)


def main() -> None:
    """Entry point: errors the project raises print as one line, with no traceback."""
    try:
        app()
    except OrchestratorError as e:
        # escaped: a message quoting a pattern ([a-z0-9]) or JSON ([null]) is not rich markup
        _err.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
