"""Resource locks held by one workflow run, on top of :class:`ResourceLockManager`.

``hold`` keeps a lease for the rest of the run (a repository under review and
test); ``scoped`` guards one block (a deploy). When a run ends, parks on an
interrupt or dies, its leases go with it; a resumed run re-acquires the ones its
state lists before the graph continues.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from shared.lib.resource_lock import ResourceLockManager

__all__ = ["RunLocks"]

_log = logging.getLogger(__name__)

#: How long a held lock waits for another workflow's lease on the same resource.
_HOLD_WAIT_S = 300.0


class RunLocks:
    """The :class:`~agent_orchestrator.workflows.base.LockHolder` of one run."""

    def __init__(self, manager: ResourceLockManager, *, owner: str) -> None:
        self.manager = manager
        self.owner = owner
        self._held: dict[str, contextlib.AsyncExitStack] = {}
        self._tokens: dict[str, int] = {}

    async def hold(self, resource_id: str, *, ttl_s: float) -> int:
        if resource_id in self._tokens:
            return self._tokens[resource_id]
        stack = contextlib.AsyncExitStack()
        lease = await stack.enter_async_context(
            self.manager.acquire(resource_id, owner=self.owner, ttl_s=ttl_s, wait_s=_HOLD_WAIT_S)
        )
        self._held[resource_id] = stack
        self._tokens[resource_id] = int(lease.token)
        return self._tokens[resource_id]

    @contextlib.asynccontextmanager
    async def scoped(self, resource_id: str, *, ttl_s: float, wait_s: float) -> AsyncIterator[int]:
        async with self.manager.acquire(resource_id, owner=self.owner, ttl_s=ttl_s, wait_s=wait_s) as lease:
            yield int(lease.token)

    async def reacquire(self, resources: list[str], *, ttl_s: float) -> None:
        for resource_id in resources:
            await self.hold(resource_id, ttl_s=ttl_s)

    async def release_all(self) -> None:
        """Release every held lease; cleanup logs and carries on."""
        for resource_id, stack in list(self._held.items()):
            try:
                await stack.aclose()
            except Exception as e:  # noqa: BLE001 - a lease already expired or force-released is not fatal here
                _log.warning("releasing %s for %s: %s", resource_id, self.owner, e)
        self._held.clear()
        self._tokens.clear()

    def held(self) -> dict[str, Any]:
        return dict(self._tokens)
