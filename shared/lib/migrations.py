"""Ordered SQL migrations from ``config/state``, recorded in ``schema_migrations``.

Migrations are data: :data:`MIGRATIONS` is an ordered list whose index (from 1)
is the version. Applying them twice is a no-op, and a session-level advisory
lock, held on a dedicated connection, keeps two starting processes from
migrating at once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from shared.lib.connections import connect_postgres
from shared.lib.errors import StartupError

__all__ = ["MIGRATIONS", "MIGRATIONS_DIR", "MigrationResult", "apply_migrations"]

_log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "config" / "state"

#: Append only. Never reorder or edit an applied file; add a new one instead.
MIGRATIONS: list[str] = [
    "agent_registry.sql",
    "workflow_state.sql",
    "resource_locks.sql",
    "events.sql",
    "workflow_runs.sql",
    "resource_locks_fast_path.sql",
    "workflow_runs_losses.sql",
    "workflow_runs_handbacks.sql",
]

#: Advisory-lock key guarding migrations (an arbitrary constant: "ao-migr" in ASCII).
_MIGRATION_LOCK_KEY = 0x616F2D6D696772

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class MigrationResult:
    applied: list[str]
    current_version: int


def _read(name: str, directory: Path) -> tuple[str, str]:
    path = directory / name
    try:
        sql = path.read_text()
    except OSError as e:
        raise StartupError(f"migration {name} is listed but cannot be read at {path}: {e}") from e
    return sql, hashlib.sha256(sql.encode()).hexdigest()


async def apply_migrations(
    database_url: str, *, directory: Path = MIGRATIONS_DIR, names: list[str] | None = None
) -> MigrationResult:
    """Apply every migration not yet recorded, each in its own transaction."""
    names = MIGRATIONS if names is None else names
    conn = await connect_postgres(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        await conn.execute(_BOOTSTRAP)
        done = {
            r["version"]: r["checksum"] for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        applied: list[str] = []
        for version, name in enumerate(names, start=1):
            sql, checksum = _read(name, directory)
            if version in done:
                if done[version] != checksum:
                    _log.warning("migration %s changed after it was applied; add a new migration instead", name)
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    version,
                    name,
                    checksum,
                )
            applied.append(name)
            _log.info("applied migration %d %s", version, name)
        return MigrationResult(applied=applied, current_version=len(names))
    finally:
        await conn.close()  # closing the session releases the advisory lock
