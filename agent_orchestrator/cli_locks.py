"""Operator commands for resource locks: ``locks list`` and ``locks release``.

Each command connects to DATABASE_URL (or the embedded server a running stack
keeps under the data dir; see ``cli_clients``), does its work and closes. A forced release is announced on the event
bus as ``resource.unlocked`` like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent_orchestrator.cli_clients import one_shot_clients
from shared.lib.resource_lock import LockInfo, ResourceLockManager
from shared.lib.settings import Settings, load_settings

__all__ = ["locks_app"]

locks_app = typer.Typer(no_args_is_help=True, help="Resource locks: list the leases, force one free.")
_out = Console(markup=False)  # resource ids, owners and reasons are shown as they are
_STATE_STYLE = {"held": "green", "expired": "yellow", "abandoned": "red"}


@contextlib.asynccontextmanager
async def _open_locks(settings: Settings, *, with_bus: bool) -> AsyncIterator[ResourceLockManager]:
    """A lock manager (and, to announce releases, an event bus) over fresh connections."""
    async with one_shot_clients(settings, postgres=True, redis=with_bus) as clients:
        assert clients.pool is not None
        emit = clients.bus.emit if clients.bus is not None else None
        manager = ResourceLockManager(clients.pool, settings, dsn=clients.database_url, emit=emit)
        try:
            yield manager  # not started: a one-shot command needs no listener or sweep
        finally:
            await manager.close()


def _ago(moment: datetime, now: datetime) -> str:
    seconds = (moment - now).total_seconds()
    return f"in {seconds:.0f}s" if seconds >= 0 else f"{-seconds:.0f}s ago"


def _table(locks: list[LockInfo]) -> Table:
    now = datetime.now(UTC)
    table = Table(title="Resource locks", show_lines=False)
    for column in ("resource", "owner", "token", "state", "acquired", "expires", "session"):
        table.add_column(column, overflow="fold")
    for lock in locks:
        style = _STATE_STYLE.get(lock.state, "")
        table.add_row(
            lock.resource_id,
            lock.owner,
            str(lock.token),
            Text(lock.state, style=style),
            _ago(lock.acquired_at, now),
            _ago(lock.expires_at, now),
            str(lock.backend_pid or "-"),
        )
    return table


@locks_app.command("list")
def list_locks() -> None:
    """Show every lease that has not ended: holder, fencing token, state and expiry."""
    settings = load_settings(dev_mode=True)  # reading needs no secrets

    async def main() -> list[LockInfo]:
        async with _open_locks(settings, with_bus=False) as locks:
            return await locks.list_locks()

    held = asyncio.run(main())
    if not held:
        _out.print("no resource is locked")
        return
    _out.print(_table(held))


@locks_app.command("release")
def release(
    resource: Annotated[str, typer.Argument(help="The resource id, e.g. repo:acme/api")],
    reason: Annotated[str, typer.Option("--reason", help="Why the lock is taken away (kept in the history)")],
) -> None:
    """Force a lock free by ending its holder's session; the holder's next renew or release fails."""
    settings = load_settings(dev_mode=True)  # the lock tables need no secrets; events are not signed

    async def main() -> LockInfo:
        async with _open_locks(settings, with_bus=True) as locks:
            return await locks.force_release(resource, reason)

    ended = asyncio.run(main())
    released = Text.assemble(
        "released ",
        (ended.resource_id, "bold"),
        " held by ",
        (ended.owner, "bold"),
        f" (token {ended.token}): {reason}",
    )
    _out.print(released, highlight=False)
