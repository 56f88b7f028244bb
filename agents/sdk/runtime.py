"""An agent's life as a service: register, serve the bus, keep ``busy``/``active``
from in-flight work, heartbeat, and on shutdown drain and deregister.

Order at start: register as ``initializing`` -> serve the bus -> heartbeat ->
``active`` once the bus consumer is live. Order at :meth:`AgentRuntime.drain`
(SIGTERM): stop taking new work (bus and HTTP) -> let in-flight work finish for
``Settings.agent_drain_grace_s`` -> deregister. A registry that is down at
shutdown only costs a log line: the registry marks the instance offline after
its TTL anyway.

Should serving the bus stop on its own (a loop of the bus server ended: a bug), the
instance says so rather than look healthy while nobody takes its requests: it logs it,
``/ready`` answers 503 naming it (:attr:`AgentRuntime.serving_error`) and the registry is
told ``error``. Then it calls ``on_serving_failed``: ``serve_agent`` (and ``agent-orchestrator
serve``) drains and exits with status 1, for its supervisor (``up``, Compose, Kubernetes) to
start it again; an app served otherwise (a test's own loop) stays up, not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from agents.sdk.agent import Agent
from shared.lib import metrics, redis_keys
from shared.lib.errors import OrchestratorError, ServiceUnavailable, StartupError, Unauthorized
from shared.lib.event_bus import EventBus
from shared.lib.http_service import ServiceContext
from shared.lib.registry_client import RegistryClient
from shared.lib.registry_models import AgentStatus, Registration

__all__ = ["AgentRuntime"]

_log = logging.getLogger(__name__)

#: How long start-up waits for the bus consumer to show as live before giving up.
_CONSUMER_LIVE_TIMEOUT_S = 10.0


class AgentRuntime:
    """One running instance of ``agent``: its bus server, registry client and status keeper."""

    def __init__(
        self,
        agent: Agent,
        ctx: ServiceContext,
        *,
        instance_id: str,
        endpoint: str,
        on_serving_failed: Callable[[], object] | None = None,
    ) -> None:
        self.agent = agent
        self.on_serving_failed = on_serving_failed
        self.ctx = ctx
        self.settings = ctx.settings
        self.instance_id = instance_id
        self.endpoint = endpoint
        self.bus = EventBus(ctx.redis, ctx.settings, pool=ctx.pool, instance_id=instance_id)
        api_key = ctx.settings.api_keys[0] if ctx.settings.api_keys else None
        self.registry = RegistryClient(
            ctx.settings.registry_url, registration_secret=ctx.settings.registration_secret, api_key=api_key
        )
        self.draining = False
        self.registered = False
        self.reported: AgentStatus | None = None
        self.serving_error: BaseException | None = None
        """Why serving the bus stopped on its own (None while it serves, or stopped by a drain)."""
        self._serve_task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._drained: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        agent.services.registry = self.registry
        agent.services.redis = ctx.redis
        agent.services.pool = ctx.pool
        agent.services.bus = self.bus

    @property
    def in_flight(self) -> int:
        return self.bus.in_flight

    async def start(self) -> None:
        """Register, serve the bus, heartbeat, then report ``active``."""
        self._loop = asyncio.get_running_loop()
        metrics.preinitialize(metrics.AGENT_REQUEST_DURATION, (self.agent.name,))
        metrics.preinitialize(metrics.AGENT_REQUESTS_REDELIVERED, (self.agent.name,))
        metrics.preinitialize(metrics.AGENT_REQUESTS_DEAD_LETTERED, *((r,) for r in metrics.AGENT_DEAD_LETTER_REASONS))
        metrics.preinitialize(metrics.AGENT_REQUESTS_REFUSED, *((r,) for r in metrics.AGENT_REFUSAL_REASONS))
        metrics.declare_request_types(self.agent.name, self.agent.request_types)
        registration = Registration(
            name=self.agent.name,
            version=self.agent.version,
            endpoint=self.endpoint,
            capabilities=self.agent.capabilities(),
            metadata={"instance_id": self.instance_id, "request_types": self.agent.request_types},
            agent_id=self.instance_id,
            status=AgentStatus.INITIALIZING,
        )
        await self._register(registration)
        self._serve_task = asyncio.create_task(self._serve(), name=f"serve-{self.agent.name}")
        await self._wait_consumer_live()
        self.registry.start_heartbeat(interval_s=self.settings.heartbeat_interval_s, load=lambda: self.in_flight)
        await self._report(AgentStatus.ACTIVE)
        self._status_task = asyncio.create_task(self._keep_status(), name=f"status-{self.agent.name}")
        _log.info("%s is serving as %s at %s", self.agent.name, self.instance_id, self.endpoint)

    async def _register(self, registration: Registration) -> None:
        try:
            await self.registry.register(registration)
        except OrchestratorError as e:
            advice = "; set AO_REGISTRATION_SECRET to the registry's" if isinstance(e, Unauthorized) else ""
            where = "" if isinstance(e, ServiceUnavailable) else f" with the registry at {self.settings.registry_url}"
            raise StartupError(
                f"{self.agent.name} ({self.instance_id}) could not register{where}: {e.message}{advice}"
            ) from e
        self.registered = True

    async def _serve(self) -> None:
        """Serve the bus until a drain; an error ending it is kept in :attr:`serving_error`."""
        name, concurrency = self.agent.name, self.settings.agent_concurrency
        try:
            await self.bus.serve(name, self.agent.handle, concurrency=concurrency, consumer=self.instance_id)
        except Exception as e:  # noqa: BLE001 - kept, and raised at start or reported as error after it
            self.serving_error = e
            if self._status_task is not None and not self.draining:  # started: nobody else will say it
                _log.critical("%s (%s) no longer serves its requests on the bus: %s", name, self.instance_id, e)
                await self._report(AgentStatus.ERROR)
                if self.on_serving_failed is not None:
                    self.on_serving_failed()

    async def _wait_consumer_live(self) -> None:
        key = redis_keys.consumers_key(self.settings.redis_prefix, self.agent.name)
        deadline = time.monotonic() + _CONSUMER_LIVE_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._serve_task is not None and self._serve_task.done():
                raise self.serving_error or ServiceUnavailable(f"{self.agent.name} stopped serving as it started")
            if await self.ctx.redis.zscore(key, self.instance_id) is not None:
                return
            await asyncio.sleep(0.02)
        raise ServiceUnavailable(f"{self.agent.name} could not start consuming its requests on Redis")

    # -- status ------------------------------------------------------------------------
    async def _report(self, status: AgentStatus) -> None:
        reason = f"stopped serving the bus: {self.serving_error}" if status == AgentStatus.ERROR else None
        try:
            await self.registry.set_status(status, reason=reason)
        except OrchestratorError as e:
            _log.warning("could not report %s to the registry (%s); retrying", status.value, e)
            return
        self.reported = status

    def _wanted(self) -> AgentStatus:
        if self.serving_error is not None:
            return AgentStatus.ERROR
        return AgentStatus.BUSY if self.in_flight > 0 else AgentStatus.ACTIVE

    async def _keep_status(self) -> None:
        """Report ``busy``/``active`` once the in-flight state has held for the debounce time."""
        debounce_s = self.settings.agent_status_debounce_s
        tick_s = max(debounce_s / 4, 0.02)
        since = time.monotonic()
        last = self._wanted()
        while not self.draining:
            await asyncio.sleep(tick_s)
            wanted = self._wanted()
            if wanted != last:
                last, since = wanted, time.monotonic()
            if wanted != self.reported and time.monotonic() - since >= debounce_s:
                await self._report(wanted)

    # -- shutdown ----------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Start draining soon; safe to call from a signal handler (it only schedules the work)."""
        self.draining = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> asyncio.Task[None]:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_task(self._drain(), name="agent-drain")
        return self._drained

    async def drain(self) -> None:
        """Stop taking work, let in-flight work finish (up to the grace period), deregister."""
        self.draining = True
        await asyncio.shield(self._start_drain())

    async def _drain(self) -> None:
        grace_s = self.settings.agent_drain_grace_s
        started = time.monotonic()
        await self._stop_task(self._status_task)
        await self.bus.stop_serving(grace_s=grace_s)
        await self._stop_task(self._serve_task)
        await self._wait_idle(deadline=started + grace_s)  # requests that came over HTTP
        if self.in_flight:
            _log.warning("%d requests still running after %.1fs; leaving them", self.in_flight, grace_s)
        if not self.registered:  # it failed to start before registering: nothing to leave
            return
        try:
            await self.registry.deregister()
        except OrchestratorError as e:
            _log.warning(
                "%s (%s) drained but could not deregister (%s); the registry marks it offline after its TTL",
                self.agent.name,
                self.instance_id,
                e,
            )
            return
        _log.info("%s (%s) drained and deregistered", self.agent.name, self.instance_id)

    async def _wait_idle(self, *, deadline: float) -> None:
        """Poll (every 50 ms) until nothing is in flight or ``deadline`` (monotonic) passes."""
        while time.monotonic() < deadline:
            if self.in_flight == 0:
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Drain if not done yet, then close the bus and the registry client."""
        with contextlib.suppress(OrchestratorError):
            await self.drain()
        await self.bus.close()
        await self.registry.aclose()

    @staticmethod
    async def _stop_task(task: asyncio.Task[Any] | None) -> None:
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except (asyncio.CancelledError, OrchestratorError):
            pass
