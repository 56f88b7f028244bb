"""How workflow nodes call agents: over the bus, with keys that make re-runs safe.

LangGraph re-runs a node after an interrupt resume, a retry or a crash
recovery. Each call's idempotency key is derived from the thread, the task (its
step and its place in it: the node, and a ``Send``'s index) and a label the node
gives the call, so the bus hands back the stored response instead of running
the side effect again. None of these depends on a checkpoint's id, so the key
is the same when the step's checkpoint was lost in a crash and the step runs
again (a workflow at durability ``async``). A subgraph's node has only its task
ids, which do depend on its parent's checkpoint: it keeps them in its key and
may call agents only at durability ``sync``.

Transient failures retry with a tenacity policy. An error the bus raises itself
(a timeout, an offline agent, Redis out of reach) keeps the key: the first attempt
may still run and its answer be stored (a send whose reply was lost with the
connection may have been queued). A retryable *error response* is stored under its
key, so the next attempt gets a fresh key with the attempt number. A call gives up
after four attempts, but while Redis cannot be reached it tries on for up to its own
timeout, so a workflow rides out a Redis restart as it waits out a slow agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from langgraph.config import get_config
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from agent_orchestrator.workflows.base import AgentReply
from shared.lib.agent_events import MAX_ID_LENGTH, AgentRequestEvent
from shared.lib.errors import AgentOffline, InvalidInput, OrchestratorError, ServiceUnavailable, Timeout
from shared.lib.event_bus import EventBus
from shared.lib.settings import Settings
from shared.lib.tracing import child_span

__all__ = ["CANCEL_WAIT_S", "KEYS_OUTLIVE_CHECKPOINTS", "BusAgentCalls", "call_key"]

#: ``configurable`` flag the runner sets for a run at durability ``async``: a key must not
#: depend on a checkpoint that a crash may lose.
KEYS_OUTLIVE_CHECKPOINTS = "ao_keys_outlive_checkpoints"
# LangGraph's (private) names: the separator of nested checkpoint namespaces, a pushed task's path.
_NS_SEP = "|"
_PUSH = "__pregel_push"

_ATTEMPTS = 4
#: Errors the bus raises itself, not an agent's answer: nothing is stored under the key as the
#: answer, so the next attempt keeps it (and gets the first attempt's answer if that one ran).
_BUS_ERRORS = (Timeout, AgentOffline, ServiceUnavailable)
#: How long a cancelled workflow waits for the agent to confirm a call's work was cancelled.
CANCEL_WAIT_S = 5.0
_log = logging.getLogger(__name__)
SOURCE_AGENT = "orchestrator"


def call_key(label: str) -> str:
    """``wf:<thread>:<step>:<task>:<label>``, from the running node's config; a subgraph's node:
    ``wf:<thread>:<task namespace>:<label>``."""
    config = get_config()
    conf, meta = config.get("configurable", {}), config.get("metadata", {})
    ns = str(conf.get("checkpoint_ns", ""))
    if _NS_SEP in ns:
        if conf.get(KEYS_OUTLIVE_CHECKPOINTS):
            raise InvalidInput(
                f"a subgraph's node ({ns.split(':')[0]}) calls an agent (label {label!r}) in a workflow at "
                "durability 'async'; its key would change if a crash lost a checkpoint: declare the "
                "workflow type with durability='sync'",
                field="durability",
            )
        return _bounded(f"wf:{conf.get('thread_id')}:{ns}:{label}")
    return _bounded(f"wf:{conf.get('thread_id')}:{meta.get('langgraph_step')}:{_task(meta)}:{label}")


def _bounded(key: str) -> str:
    """``key``, or when longer than an envelope takes, its head and a digest of the whole."""
    if len(key) <= MAX_ID_LENGTH:
        return key
    return f"{key[: MAX_ID_LENGTH - 33]}~{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}"


def _task(meta: dict[str, Any]) -> str:
    """The task's place in its step: the node, and for a ``Send`` (a push) its index."""
    node, path = str(meta.get("langgraph_node")), tuple(meta.get("langgraph_path", ()))
    if path and path[0] == _PUSH:
        return f"{node}#{'.'.join(str(p) for p in path[1:3] if p is not False)}"
    return node


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, OrchestratorError) and exc.retryable


class _Stop(stop_base):
    """After ``_ATTEMPTS`` failed attempts that reached Redis; attempts that found it out of reach
    (``ServiceUnavailable``) go on for up to ``timeout_s``, and do not count among those: a restart
    of Redis takes longer than four quick attempts, and right after it the agents may look offline
    until they beat again. One per call (it counts)."""

    def __init__(self, *, timeout_s: float) -> None:
        self._outage = stop_after_delay(timeout_s)
        self._failures = 0

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is not None and isinstance(outcome.exception(), ServiceUnavailable):
            return self._outage(retry_state)
        self._failures += 1
        return self._failures >= _ATTEMPTS


class BusAgentCalls:
    """The :class:`~agent_orchestrator.workflows.base.AgentCalls` of one workflow run."""

    def __init__(
        self,
        bus: EventBus,
        settings: Settings,
        *,
        workflow_id: str,
        correlation_id: str,
        trace_headers: Callable[[], dict[str, str]] | None = None,
        cancelled_by_request: Callable[[], bool] | None = None,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.workflow_id = workflow_id
        self.correlation_id = correlation_id
        self.trace_headers = trace_headers
        self.cancelled_by_request = cancelled_by_request
        """Whether the run is being cancelled by request (not stopped for a shutdown, a lost lock or
        a takeover, after which another replica sends the same keys again and needs the answers)."""

    async def call(
        self, agent: str, request_type: str, payload: dict[str, Any], *, label: str, timeout_s: float | None = None
    ) -> AgentReply:
        key = call_key(label)
        timeout = timeout_s or self.settings.request_timeout_s
        try:  # the first attempt outside the retry loop, whose bookkeeping costs as much as the call
            return await self._once(agent, request_type, payload, key=key, timeout_s=timeout)
        except OrchestratorError as e:
            if not e.retryable:
                raise
            failed = e
        return await self._retried(agent, request_type, payload, key=key, timeout_s=timeout, failed=failed)

    async def _retried(
        self,
        agent: str,
        request_type: str,
        payload: dict[str, Any],
        *,
        key: str,
        timeout_s: float,
        failed: OrchestratorError,
    ) -> AgentReply:
        """The attempts after the first, which ended in ``failed``, as the tenacity policy says: the
        loop's first attempt raises ``failed`` again, so its wait and count are tenacity's."""
        first: OrchestratorError | None = failed
        bumped = 0
        retrying = AsyncRetrying(
            stop=_Stop(timeout_s=timeout_s),
            reraise=True,
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
            retry=retry_if_exception(_retryable),
        )
        async for attempt in retrying:
            with attempt:
                try:
                    if first is not None:
                        error, first = first, None
                        raise error
                    return await self._once(
                        agent,
                        request_type,
                        payload,
                        key=key if not bumped else _bounded(f"{key}~{bumped}"),
                        timeout_s=timeout_s,
                    )
                except _BUS_ERRORS:
                    raise
                except OrchestratorError as e:
                    if e.retryable:
                        bumped += 1
                    raise
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    async def _once(
        self, agent: str, request_type: str, payload: dict[str, Any], *, key: str, timeout_s: float
    ) -> AgentReply:
        # The call is a child run of the node; the agent resumes these headers, so its spans nest under it.
        async with child_span(
            f"call:{agent}.{request_type}", inputs=payload, metadata={"agent": agent, "idempotency_key": key}
        ) as span:
            metadata: dict[str, Any] = {"workflow_id": self.workflow_id}
            if self.trace_headers is not None:
                metadata["trace"] = self.trace_headers()
            request = AgentRequestEvent.create(
                source_agent=SOURCE_AGENT,
                target_agent=agent,
                request_type=request_type,
                payload=payload,
                timeout_s=timeout_s,
                correlation_id=self.correlation_id,
                idempotency_key=key,
                metadata=metadata,
            )
            try:
                response = await self.bus.request_agent(request, timeout_s=timeout_s)
            except asyncio.CancelledError:
                if self.cancelled_by_request is not None and self.cancelled_by_request():
                    await self._cancel_at_agent(request)
                raise
            if span is not None:
                span.add_metadata({"served_by": response.served_by, "status": response.status})
            result = response.raise_for_status()
        return AgentReply(payload=result, agent=agent, instance=response.served_by or agent)

    async def _cancel_at_agent(self, request: AgentRequestEvent) -> None:
        """The workflow is cancelled: stop the call's work at the agent (its handler and child
        processes), waiting up to ``CANCEL_WAIT_S`` for the agent's ``cancelled`` answer, so the
        run's resource locks are released once that work has ended, not while it goes on.

        The cancel runs in a task of its own: the node is cancelled more than once (LangGraph
        cancels its tasks as the run's task is cancelled, the lease loop cancels a run flagged
        cancelled again), and a repeat must not stop the notice before it is sent. Repeats are
        let through once the cancel is done (bounded by ``CANCEL_WAIT_S``), or at once when the
        run is no longer cancelled by request (a shutdown hands it back)."""
        cancel = asyncio.ensure_future(self.bus.cancel_request(request, wait_s=CANCEL_WAIT_S))
        current = asyncio.current_task()
        while not cancel.done():
            try:
                await asyncio.shield(cancel)
            except asyncio.CancelledError:
                if self.cancelled_by_request is None or not self.cancelled_by_request():
                    raise
                if current is not None:
                    current.uncancel()
        if cancel.cancelled() or cancel.exception() is not None or cancel.result() is None:
            _log.warning(
                "cancelled call %s to %s: the agent did not confirm it stopped",
                request.idempotency_key,
                request.target_agent,
            )
