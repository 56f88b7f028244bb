"""The stale-instance reaper: offline after the heartbeat TTL, removed after the grace period.

Every replica runs it. Each sweep is one UPDATE and one DELETE ... RETURNING, so
two replicas sweeping at once never mark or remove the same instance twice (the
second re-checks the row after the first's lock and skips it). The same loop
refreshes the ``registry_agents`` gauge, so no request ever counts rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from agent_registry.events import AgentEvents
from agent_registry.store import RegistryStore
from shared.lib.metrics import AGENT_NAME_LABELS, REGISTRY_AGENTS, REGISTRY_STALE_AGENTS
from shared.lib.registry_models import AgentStatus
from shared.lib.tasks import cancel_and_wait

__all__ = ["Reaper", "sweep_interval_s"]

_log = logging.getLogger(__name__)

_SWEEP_TIMEOUT_S = 10.0


def sweep_interval_s(stale_after_s: float) -> float:
    """A quarter of the TTL (at most 5 s, at least 0.1 s): an instance goes offline within 1.25 TTL."""
    return max(0.1, min(stale_after_s / 4, 5.0))


class Reaper:
    """Periodic sweep of stale and expired instances."""

    def __init__(
        self, store: RegistryStore, events: AgentEvents, *, stale_after_s: float, remove_after_s: float
    ) -> None:
        self._store = store
        self._events = events
        self._stale_after_s = stale_after_s
        self._remove_after_s = remove_after_s
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> None:
        """Mark stale instances offline, remove expired ones, refresh the gauge."""
        for stale in await self._store.mark_stale(stale_after_s=self._stale_after_s):
            REGISTRY_STALE_AGENTS.labels(name=AGENT_NAME_LABELS(stale.name)).inc()
            _log.info(
                "agent %s (%s) missed heartbeats for %.1fs: offline", stale.agent_id, stale.name, self._stale_after_s
            )
            await self._events.status_changed(
                stale.agent_id,
                name=stale.name,
                previous=stale.previous,
                status=AgentStatus.OFFLINE,
                reason="missed heartbeats",
            )
        for removed in await self._store.remove_expired(remove_after_s=self._remove_after_s):
            _log.info("agent %s (%s) offline past the grace period: removed", removed.agent_id, removed.name)
            await self._events.removed(removed.agent_id, name=removed.name, reason="expired")
        await self._refresh_gauge()

    async def _refresh_gauge(self) -> None:
        totals: dict[tuple[str, str], int] = {}
        for status, name, n in await self._store.counts():
            labels = (status, AGENT_NAME_LABELS(name))  # names past the bound add up under "other"
            totals[labels] = totals.get(labels, 0) + n
        REGISTRY_AGENTS.clear()
        for (status, name), n in totals.items():
            REGISTRY_AGENTS.labels(status=status, name=name).set(n)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="registry-reaper")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        """Sweep every interval; marking and removing wait one TTL after start.

        While the registry was down, no heartbeat could arrive: sweeping at once
        would mark every live instance offline for the registry's own absence.
        Until then each tick only refreshes the gauge.
        """
        interval_s = sweep_interval_s(self._stale_after_s)
        sweep_from = time.monotonic() + self._stale_after_s
        while True:
            work = self.sweep if time.monotonic() >= sweep_from else self._refresh_gauge
            await self._tick(work, interval_s)
            await asyncio.sleep(interval_s)

    @staticmethod
    async def _tick(work: Callable[[], Awaitable[None]], interval_s: float) -> None:
        try:
            async with asyncio.timeout(_SWEEP_TIMEOUT_S):
                await work()
        except Exception:  # noqa: BLE001 - a failed sweep (database blip) is retried on the next tick
            _log.warning("registry sweep failed; retrying in %.1fs", interval_s, exc_info=True)
