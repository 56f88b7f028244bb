"""What a running stack (``agent-orchestrator up``) leaves under its data dir for the commands
run beside it: its embedded servers, and ``stack.env``, the secrets it runs with.

``up`` generates the secrets the environment does not give (the registration secret, the
signing key, an API key) and hands them to its own services; it keeps them in
``<data_dir>/stack.env``, readable by the user alone (0600), with the URLs its services
are reached at (``DATABASE_URL``, ``REDIS_URL`` and ``AO_REDIS_PREFIX``, ``REGISTRY_URL``,
``ORCHESTRATOR_URL``: a program of one's own sources the file to reach the stack), and
removes the file when it stops. A command started by hand with the same data dir (``dlq requeue``, ``agent NAME``,
``serve``, ``run``) takes from it the secrets its environment leaves unset, as it takes the
embedded servers' URLs when DATABASE_URL or REDIS_URL is unset (:func:`server_urls`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from shared.lib.embedded import EmbeddedPostgres, EmbeddedRedis
from shared.lib.errors import StartupError

if TYPE_CHECKING:
    from shared.lib.settings import Settings

__all__ = ["STACK_ENV_FILE", "read_stack_env", "remove_stack_env", "server_urls", "write_stack_env"]

#: The secrets file's name under the data dir.
STACK_ENV_FILE = "stack.env"


def write_stack_env(data_dir: Path, values: dict[str, str], *, pid: int) -> Path:
    """Write ``values`` (environment variable -> value) to ``<data_dir>/stack.env``, created
    0600 and moved into place whole; a file a shell can source. Returns its path."""
    path = (data_dir / STACK_ENV_FILE).resolve()
    lines = [
        f"# The secrets and URLs of the stack `agent-orchestrator up` (pid {pid}) runs with data under {path.parent}.",
        "# agent-orchestrator commands run with this data dir take the secrets their environment leaves unset.",
        f"# Removed when the stack stops. In a shell: set -a; . {shlex.quote(str(path))}; set +a",
        *(f"{name}={shlex.quote(value)}" for name, value in values.items()),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{STACK_ENV_FILE}.{pid}")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    partial.replace(path)
    return path


def read_stack_env(data_dir: Path) -> dict[str, str]:
    """The variables of ``<data_dir>/stack.env``; none when there is no such file (no stack runs)
    or it cannot be read or parsed."""
    try:
        text = (data_dir / STACK_ENV_FILE).read_text()
        words = shlex.split(text, comments=True)
    except (OSError, ValueError):
        return {}
    pairs = (word.partition("=") for word in words)
    return {name: value for name, sign, value in pairs if sign and name}


def remove_stack_env(data_dir: Path) -> None:
    """Remove the secrets file once the stack that wrote it stops."""
    with contextlib.suppress(OSError):
        (data_dir / STACK_ENV_FILE).unlink(missing_ok=True)


def _nothing_to_reach(variable: str, server: str, data_dir: Path) -> StartupError:
    return StartupError(
        f"no {server} to connect to: set {variable}, or start the stack (`agent-orchestrator up`) "
        f"so that its embedded {server} runs under {data_dir.resolve()} (AO_DATA_DIR)"
    )


def server_urls(settings: Settings, *, postgres: bool, redis: bool) -> tuple[str | None, str | None]:
    """The URLs of the servers to use (None where not asked for): the configured ones, else the
    embedded ones running under the data dir; StartupError when a needed one is neither. Nothing
    is started: a fresh, empty server would lack the stack's schema, data and agents."""
    db_url = redis_url = None
    if postgres:
        db_url = settings.database_url or EmbeddedPostgres(settings.data_dir).running_url()
        if db_url is None:
            raise _nothing_to_reach("DATABASE_URL", "PostgreSQL", settings.data_dir)
    if redis:
        redis_url = settings.redis_url or EmbeddedRedis(settings.data_dir).running_url()
        if redis_url is None:
            raise _nothing_to_reach("REDIS_URL", "Redis", settings.data_dir)
    return db_url, redis_url
