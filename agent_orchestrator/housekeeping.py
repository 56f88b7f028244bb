"""Checkpoint hygiene: finished workflows keep only their final checkpoint.

Every finished node of a running workflow is a checkpoint, which is what lets a
run resume anywhere. Once a workflow is finished and older than
``AO_CHECKPOINT_RETENTION_S``, only its final state is still useful (the API's
history and result read it), so the rest is pruned. Any replica may run this:
rows are taken with ``FOR UPDATE SKIP LOCKED`` and marked in the same
transaction, so each workflow is pruned once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

from shared.lib.tasks import cancel_and_wait

__all__ = ["Housekeeper", "prune_finished"]

_log = logging.getLogger(__name__)

_CANDIDATES = """
SELECT r.workflow_id FROM workflow_runs r JOIN workflows w ON w.id = r.workflow_id
WHERE r.state = 'done' AND r.checkpoints_pruned_at IS NULL
  AND w.completed_at < now() - make_interval(secs => $1)
ORDER BY w.completed_at LIMIT $2 FOR UPDATE OF r SKIP LOCKED
"""


async def prune_finished(pool: asyncpg.Pool, saver: Any, *, retention_s: float, limit: int = 100) -> list[str]:
    """Prune the checkpoints of up to ``limit`` finished workflows past retention; returns their ids."""
    async with pool.acquire() as conn, conn.transaction():
        ids = [r["workflow_id"] for r in await conn.fetch(_CANDIDATES, retention_s, limit)]
        if ids:
            await saver.aprune(ids, strategy="keep_latest")
            await conn.execute(
                "UPDATE workflow_runs SET checkpoints_pruned_at = now() WHERE workflow_id = ANY($1::text[])", ids
            )
    return ids


class Housekeeper:
    """Runs :func:`prune_finished` every ``interval_s`` until stopped."""

    def __init__(self, pool: asyncpg.Pool, saver: Any, *, retention_s: float, interval_s: float) -> None:
        self.pool, self.saver = pool, saver
        self.retention_s, self.interval_s = retention_s, interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="checkpoint-housekeeping")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                pruned = await prune_finished(self.pool, self.saver, retention_s=self.retention_s)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
                _log.warning("pruning finished workflows' checkpoints failed: %s; retrying later", e)
                continue
            if pruned:
                _log.info("pruned the checkpoints of %d finished workflow(s)", len(pruned))
