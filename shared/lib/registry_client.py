"""Client of the agent registry: registration, heartbeat, status, discovery, deregistration.

An agent process holds one :class:`RegistryClient` for its life. The client
keeps working through a registry restart or a removal: when the registry
answers 404 (the instance is gone) or 401 (its token no longer matches, e.g. a
fresh registry database), the client registers again under the same id and
the status it last set, then carries on. Transport errors and the answers that
say the registry cannot serve right now (502, 503, 504, unless their body says
``"retryable": false``) are retried with jittered exponential backoff (tenacity)
for at most ``retry_for_s``; an attempt after the first never runs past that
budget. A 500 is a permanent answer and is not retried (a registry bug once made
ROUTE_REQUEST retry a 500 for 30 s, past its caller's 10 s deadline). The
heartbeat loop simply tries again at its next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import TypeAdapter
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from shared.lib.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    OrchestratorError,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from shared.lib.registry_models import (
    INITIAL_STATUSES,
    AgentInstance,
    AgentStatus,
    Registered,
    Registration,
)

__all__ = ["RegistryClient"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")
_INSTANCES = TypeAdapter(list[AgentInstance])
_ERRORS: dict[int, type[OrchestratorError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidInput,
}
#: Answers meaning the registry cannot serve right now (restarting, overloaded): worth another try.
_RETRYABLE_STATUSES = frozenset({502, 503, 504})
#: Heartbeat intervals are jittered by this fraction, so instances started together drift apart.
_JITTER = 0.1


def _error_from(response: httpx.Response) -> OrchestratorError:
    try:
        body = response.json().get("error") or {}
    except ValueError:
        body = {}
    message = str(body.get("message") or f"registry answered {response.status_code}: {response.text[:200]}")
    status = response.status_code
    cls = _ERRORS.get(status, ServiceUnavailable if status in _RETRYABLE_STATUSES else OrchestratorError)
    error = cls(message, field=body.get("field"), resource=body.get("resource"), details=body.get("details"))
    error.retryable = cls.retryable and body.get("retryable") is not False
    return error


def _worth_retrying(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError) or (isinstance(exc, OrchestratorError) and exc.retryable)


class RegistryClient:
    """One agent instance's connection to the registry (or a reader's, for discovery only)."""

    def __init__(
        self,
        base_url: str,
        *,
        registration_secret: str,
        api_key: str | None = None,
        timeout_s: float = 5.0,
        retry_for_s: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        """``http`` lets many clients in one process share a connection pool; it is then not closed here."""
        self._base_url = base_url.rstrip("/")
        self._secret = registration_secret
        self._api_key = api_key
        self._retry_for_s = retry_for_s
        self._timeout_s = timeout_s
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout_s)
        self._registration: Registration | None = None
        self._registered: Registered | None = None
        self._status: AgentStatus | None = None
        self._registrations = 0
        self._reregister_lock = asyncio.Lock()
        self._heartbeat_task: asyncio.Task[None] | None = None

    # -- identity ---------------------------------------------------------------------
    @property
    def agent_id(self) -> str | None:
        """This instance's id once registered (kept across re-registrations)."""
        return self._registered.agent.id if self._registered else None

    @property
    def registrations(self) -> int:
        """How many times this client registered (more than one means it recovered from a removal)."""
        return self._registrations

    # -- instance calls -----------------------------------------------------------------
    async def register(self, registration: Registration) -> Registered:
        """Register (retrying while the registry is unreachable) and remember the id and token."""
        self._registration = registration
        self._status = registration.status
        return await self._register()

    async def heartbeat(self, *, in_flight: int = 0, retry_for_s: float | None = None) -> AgentStatus:
        """One heartbeat; re-registers first if the registry no longer knows this instance."""
        body = {"in_flight": in_flight}

        async def beat() -> AgentStatus:
            data = await self._call("POST", f"/agents/{self._id()}/heartbeat", json=body, retry_for_s=retry_for_s)
            return AgentStatus(data["status"])

        return await self._self_healing(beat)

    async def set_status(self, status: AgentStatus, *, reason: str | None = None) -> AgentInstance:
        """Change this instance's status (409 :class:`Conflict` for an illegal transition)."""
        body = {"status": status.value, "reason": reason}

        async def put() -> AgentInstance:
            data = await self._call("PUT", f"/agents/{self._id()}/status", json=body)
            return AgentInstance.model_validate(data)

        instance = await self._self_healing(put)
        self._status = status
        return instance

    async def deregister(self, *, retry_for_s: float = 5.0) -> None:
        """Stop heartbeating and remove this instance; an instance already gone is fine."""
        await self.stop_heartbeat()
        if self._registered is None:
            return
        with contextlib.suppress(NotFound):
            await self._call("DELETE", f"/agents/{self._id()}", retry_for_s=retry_for_s)
        self._registered = None

    # -- background heartbeat -----------------------------------------------------------
    def start_heartbeat(
        self,
        *,
        interval_s: float,
        load: Callable[[], int] | None = None,
        on_heartbeat: Callable[[float], None] | None = None,
    ) -> None:
        """Heartbeat every ``interval_s`` (±10 %) with ``load()`` as in-flight count, until stopped.

        ``on_heartbeat`` receives each successful heartbeat's round trip in seconds.
        """
        if self._heartbeat_task is not None and not self._heartbeat_task.done():
            raise Conflict("the heartbeat is already running; stop it before starting another")
        self._id()
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat_loop(interval_s, load, on_heartbeat), name=f"registry-heartbeat-{self.agent_id}"
        )

    async def stop_heartbeat(self) -> None:
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _heartbeat_loop(
        self, interval_s: float, load: Callable[[], int] | None, on_heartbeat: Callable[[float], None] | None
    ) -> None:
        await asyncio.sleep(random.uniform(0, interval_s))  # noqa: S311 - spreading load, not security
        failing = False
        while True:
            started = time.monotonic()
            try:
                await self.heartbeat(in_flight=load() if load else 0, retry_for_s=0)
            except OrchestratorError as e:
                if not failing:
                    _log.warning(
                        "heartbeat of %s failed (%s: %s); retrying every %.1fs",
                        self.agent_id,
                        type(e).__name__,
                        e,
                        interval_s,
                    )
                failing = True
            else:
                if failing:
                    _log.info("heartbeat of %s is back", self.agent_id)
                failing = False
                if on_heartbeat is not None:
                    on_heartbeat(time.monotonic() - started)
            jitter = random.uniform(1 - _JITTER, 1 + _JITTER)  # noqa: S311 - spreading load, not security
            await asyncio.sleep(max(0.0, interval_s * jitter - (time.monotonic() - started)))

    # -- reads ----------------------------------------------------------------------------
    async def discover(
        self,
        *,
        capability: str | None = None,
        tag: str | None = None,
        status: AgentStatus | Iterable[AgentStatus] | None = None,
        name: str | None = None,
        limit: int = 100,
        retry_for_s: float | None = None,
    ) -> list[AgentInstance]:
        """Instances matching every given filter (``status``: one or any of several), healthiest first.
        ``retry_for_s`` (default: the client's) bounds the whole call: pass the caller's time left."""
        params: dict[str, Any] = {"capability": capability, "tag": tag, "name": name, "limit": limit}
        if status is not None:
            params["status"] = [status.value] if isinstance(status, AgentStatus) else [s.value for s in status]
        query = {k: v for k, v in params.items() if v is not None}
        data = await self._call("GET", "/agents", params=query, retry_for_s=retry_for_s)
        return _INSTANCES.validate_python(data)

    async def get(self, agent_id: str) -> AgentInstance:
        """One instance by id; :class:`NotFound` if it is not registered."""
        return AgentInstance.model_validate(await self._call("GET", f"/agents/{agent_id}"))

    # -- lifecycle ----------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop the heartbeat and close the connection pool (does not deregister)."""
        await self.stop_heartbeat()
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- internals ------------------------------------------------------------------------
    def _id(self) -> str:
        if self._registered is None:
            raise Conflict("this client has not registered an instance; call register() first")
        return self._registered.agent.id

    async def _register(self) -> Registered:
        assert self._registration is not None
        reg = self._registration
        if self._registered is not None:
            resume = self._status if self._status in INITIAL_STATUSES else reg.status
            reg = reg.model_copy(update={"agent_id": self._registered.agent.id, "status": resume})
        data = await self._call("POST", "/agents/register", json=reg.model_dump(mode="json"), secret=True)
        self._registered = Registered.model_validate(data)
        self._registrations += 1
        return self._registered

    async def _self_healing(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``call``; if the registry forgot this instance, register again and run it once more."""
        token = self._registered.token if self._registered else None
        try:
            return await call()
        except (NotFound, Unauthorized):
            async with self._reregister_lock:
                if self._registered is None or self._registered.token == token:
                    _log.info("registry no longer knows %s; registering it again", self.agent_id)
                    await self._register()
            return await call()

    def _headers(self, *, secret: bool) -> dict[str, str]:
        headers: dict[str, str] = {}
        if secret:
            headers["X-Registration-Secret"] = self._secret
        elif self._registered is not None:
            headers["X-Agent-Token"] = self._registered.token
        if self._api_key:
            headers["X-API-Key"] = self._api_key
        return headers

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        secret: bool = False,
        retry_for_s: float | None = None,
    ) -> Any:
        """One request, retried on transport errors and retryable answers for up to ``retry_for_s``;
        the first attempt gets the client's timeout, a later one at most what is left of the budget.
        A registry still out of reach then is :class:`ServiceUnavailable`."""
        budget_s = self._retry_for_s if retry_for_s is None else retry_for_s
        try:
            return await self._attempts(method, path, json=json, params=params, secret=secret, budget_s=budget_s)
        except httpx.HTTPError as e:
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise ServiceUnavailable(
                f"the registry at {self._base_url} is out of reach ({detail}); is it running?"
            ) from e

    async def _attempts(
        self, method: str, path: str, *, json: Any, params: dict[str, Any] | None, secret: bool, budget_s: float
    ) -> Any:
        give_up_at = time.monotonic() + budget_s
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_worth_retrying),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
            stop=stop_after_delay(budget_s),
            reraise=True,
        ):
            with attempt:
                timeout: Any = httpx.USE_CLIENT_DEFAULT
                if attempt.retry_state.attempt_number > 1:
                    timeout = max(0.05, min(self._timeout_s, give_up_at - time.monotonic()))
                response = await self._http.request(
                    method,
                    self._base_url + path,
                    json=json,
                    params=params,
                    headers=self._headers(secret=secret),
                    timeout=timeout,
                )
                if response.status_code >= 400:
                    raise _error_from(response)
                return response.json() if response.content else None
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover
