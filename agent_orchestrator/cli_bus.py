"""Operator commands of the bus: ``dlq list|requeue`` and ``events replay``.

Each command opens its own connections (to the embedded servers a running stack
keeps under the data dir when no URL is set; see ``cli_clients``), does its work
and closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import orjson
import typer
from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from agent_orchestrator.cli_clients import one_shot_clients
from shared.lib.errors import InvalidInput, OrchestratorError
from shared.lib.event_bus import DeadLetter, EventBus
from shared.lib.safe_input import check_bigint
from shared.lib.settings import Settings, load_settings

__all__ = ["dlq_app", "events_app"]

dlq_app = typer.Typer(no_args_is_help=True, help="Dead-lettered agent requests: list and requeue.")
events_app = typer.Typer(no_args_is_help=True, help="The events log: replay stored events to live subscribers.")
_out = Console(markup=False)  # dead letters' reasons and messages are shown as they are
T = TypeVar("T")
_REPLAY_PAGE = 500


@contextlib.asynccontextmanager
async def _open_bus(settings: Settings, *, with_pool: bool) -> AsyncIterator[EventBus]:
    async with one_shot_clients(settings, postgres=with_pool, redis=True) as clients:
        assert clients.bus is not None
        yield clients.bus


def _run(settings: Settings, work: Callable[[EventBus], Awaitable[T]], *, with_pool: bool = False) -> T:
    async def main() -> T:
        async with _open_bus(settings, with_pool=with_pool) as bus:
            return await work(bus)

    return asyncio.run(main())


def _print_letters(letters: list[DeadLetter]) -> None:
    """Each dead letter as its id on a line of its own, whole however narrow the terminal (it is
    what ``dlq requeue`` takes; a table cut it to ``code-revi…`` at 80 columns), then what
    happened to it and its message, indented."""
    _out.print(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}, newest first:")
    for d in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.dead_at))
        request_type = (d.request or {}).get("request_type", "?")
        _out.print()
        _out.print(d.id, style="bold", soft_wrap=True)
        times = "once" if d.deliveries == 1 else f"{d.deliveries} times"
        details = f"{d.reason} at {when}: {request_type}, delivered {times}"
        _out.print(Padding(Text(f"{details}\n{d.message}"), (0, 0, 0, 2), expand=False))


@dlq_app.command("list")
def dlq_list(
    agent: Annotated[str | None, typer.Option(help="Only this agent's dead letters.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
) -> None:
    """List dead-lettered requests with the reason each was moved there."""
    settings = load_settings(dev_mode=True)  # reading needs no secrets
    letters = _run(settings, lambda bus: bus.dead_letters(agent, limit=limit))
    if as_json:
        for d in letters:
            typer.echo(orjson.dumps(d.__dict__).decode())
        return
    if not letters:
        typer.echo("no dead letters")
        return
    _print_letters(letters)


@dlq_app.command("requeue")
def dlq_requeue(
    entry_ids: Annotated[list[str], typer.Argument(help="Ids as printed by `dlq list` (agent/stream-id).")],
) -> None:
    """Send dead-lettered requests again, with a fresh deadline, and remove them from the list.
    Each id is tried: one refused (unknown, malformed) is reported and the others still go;
    the exit status is 2 if any was refused."""
    settings = load_settings(require=("signing_key",))  # re-signing needs the signing keys, nothing else

    async def work(bus: EventBus) -> int:
        refused = 0
        for entry_id in entry_ids:
            try:
                request = await bus.requeue_dead_letter(entry_id)
            except OrchestratorError as e:
                refused += 1
                typer.echo(f"error: {e.message}", err=True)
                continue
            typer.echo(f"requeued {entry_id} as request {request.request_id}")
        return refused

    if _run(settings, work):
        raise typer.Exit(2)


def _parse_aggregate(value: str | None) -> tuple[str | None, str | None]:
    """``TYPE`` or ``TYPE:ID`` as (type, id); an empty part is refused, not read as "any"."""
    if value is None:
        return None, None
    aggregate_type, colon, aggregate_id = value.partition(":")
    if not aggregate_type.strip() or (colon and not aggregate_id.strip()):
        raise InvalidInput(
            f"--aggregate {value!r} is not TYPE or TYPE:ID (workflow, workflow:<id>): a part is empty",
            field="aggregate",
        )
    return aggregate_type, aggregate_id or None


def _parse_since(value: str | None) -> tuple[int, datetime | None]:
    if value is None:
        return 0, None
    if value.isascii() and value.isdigit():
        return check_bigint(int(value), field="--since"), None
    try:
        at = datetime.fromisoformat(value)
        return 0, at.astimezone(UTC) if at.tzinfo is not None else at
    except (ValueError, OverflowError) as e:  # OverflowError: year 1 at +14:00 is before year 1
        raise InvalidInput(
            f"--since {value!r} is neither an event id nor an ISO timestamp (2025-01-31T12:00:00+00:00)",
            field="since",
        ) from e


@events_app.command("replay")
def events_replay(
    since: Annotated[
        str | None, typer.Option(help="After this event id, or from this ISO timestamp (default: everything).")
    ] = None,
    event_type: Annotated[str | None, typer.Option("--type", help="Only this event type.")] = None,
    aggregate: Annotated[str | None, typer.Option(help="Only this aggregate: TYPE or TYPE:ID.")] = None,
) -> None:
    """Publish stored events again, oldest first, to live subscribers (they dedupe by id)."""
    after_id, since_at = _parse_since(since)
    aggregate_type, aggregate_id = _parse_aggregate(aggregate)
    if event_type is not None and not event_type.strip():
        raise InvalidInput("--type is empty: give an event type (workflow.status) or leave it out", field="type")
    settings = load_settings(dev_mode=True)  # publishing stored events needs no secrets

    async def work(bus: EventBus) -> int:
        cursor, count = after_id, 0
        while True:
            page = await bus.events_since(
                cursor,
                event_type=event_type,
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                since=since_at,
                limit=_REPLAY_PAGE,
            )
            for event in page:
                await bus.republish(event)
            count += len(page)
            if len(page) < _REPLAY_PAGE:
                return count
            cursor = page[-1].id

    typer.echo(f"replayed {_run(settings, work, with_pool=True)} events")
