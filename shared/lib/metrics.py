"""Every Prometheus metric the services export, in one place.

Operators' dashboards and alert rules (``deploy/``) query exactly these names.
Label values are plain strings of bounded cardinality: agent names, request
types, statuses, resource types, workflow types. Never a request id, workflow
id or owner id. A label whose value comes from a caller (an agent name, a
request type, a resource type) goes through a bound below, so random values
add at most a fixed number of series.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "AGENT_NAME_LABELS",
    "LATENCY_BUCKETS_S",
    "MAX_LABEL_VALUES",
    "OVERFLOW_LABEL",
    "RESOURCE_TYPE_LABELS",
    "UNSUPPORTED_LABEL",
    "LabelBound",
    "declare_request_types",
    "labels",
    "preinitialize",
    "request_type_label",
]

#: Distinct caller-given values one label keeps per process, beyond those declared known:
#: enough for the six agents' callers and a few of one's own; past it, ``other``.
MAX_LABEL_VALUES = 16
#: The value of a bounded label once its distinct values are used up.
OVERFLOW_LABEL = "other"
#: The ``request_type`` of a request an agent does not declare (it is rejected anyway).
UNSUPPORTED_LABEL = "unsupported"


class LabelBound:
    """Maps values taken from input to label values of bounded number: the values declared
    with :meth:`know` and the first ``limit`` other distinct ones seen pass as they are;
    any later new one becomes ``overflow``."""

    def __init__(self, *, limit: int = MAX_LABEL_VALUES, overflow: str = OVERFLOW_LABEL) -> None:
        self._known: set[str] = set()
        self._seen: set[str] = set()
        self._limit = limit
        self._overflow = overflow
        self._lock = threading.Lock()

    def know(self, *values: str) -> None:
        """Values that always pass (an agent's own name), not counted against the limit."""
        with self._lock:
            self._known.update(values)

    def __call__(self, value: str) -> str:
        if value in self._seen or value in self._known:  # the hot path: no lock
            return value
        with self._lock:
            if len(self._seen) >= self._limit:
                return self._overflow
            self._seen.add(value)
        return value


#: Agent names a caller gives: ``source_agent``, a call's ``target_agent``, registered names.
AGENT_NAME_LABELS = LabelBound()
#: Resource types (the prefix of a lock's resource id before ``:``).
RESOURCE_TYPE_LABELS = LabelBound()
_REQUEST_TYPE_LABELS = LabelBound()  # of agents that declared none (a bus used without the SDK)
_declared_types: dict[str, frozenset[str]] = {}


def declare_request_types(agent: str, request_types: Iterable[str]) -> None:
    """The request types ``agent`` serves: other ones are labelled ``unsupported``."""
    _declared_types[agent] = frozenset(request_types)
    AGENT_NAME_LABELS.know(agent)


def request_type_label(agent: str, request_type: str) -> str:
    """``request_type`` if ``agent`` declared it, else ``unsupported``; for an agent that
    declared none, the first distinct request types, then ``other``."""
    declared = _declared_types.get(agent)
    if declared is None:
        return _REQUEST_TYPE_LABELS(request_type)
    return request_type if request_type in declared else UNSUPPORTED_LABEL


def preinitialize(metric: Counter | Gauge | Histogram, *label_sets: tuple[str, ...]) -> None:
    """Create these label sets at zero now, so their first event is an increase ``rate()`` sees.

    A labelled series otherwise appears at its first value; if events come faster than
    scrapes, Prometheus never sees it rise (ingesting OpenMetrics created timestamps needs
    Prometheus 2.50+). Call it at start-up with the label values a process knows it will use.
    """
    for labels in label_sets:
        metric.labels(*labels)


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def labels(metric: _Metric, *values: str) -> _Metric:
    """``metric.labels(*values)``, looked up once per label set: ``labels()`` takes a lock and
    builds a tuple at every call (1.7 us for one label, 2.9 for two; this 0.13, timeit), and a
    workflow records about 14 on its replica. As many entries as the metric has series."""
    key = (metric, values)
    child: _Metric | None = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


#: Sub-millisecond to a day: bus round trips are ~0.5 ms, workflow steps take seconds, a test
#: suite up to AO_PIPELINE_TIMEOUT_S (600 s), a workflow waiting on an approval hours. Buckets
#: past the thresholds alerts compare with (cicd's p99 > 300 s), or a quantile above the last
#: bucket reads as that bucket's bound and such an alert could never fire.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600, 1800,
    3600, 14400, 86400,
)  # fmt: skip

_ = (Counter, Gauge, Histogram)  # each component's block below uses these

# -- agent registry ----------------------------------------------------------------
__all__ += [
    "REGISTRY_AGENTS",
    "REGISTRY_HEARTBEATS",
    "REGISTRY_HEARTBEAT_LAG",
    "REGISTRY_STALE_AGENTS",
]

REGISTRY_AGENTS = Gauge(
    "registry_agents",
    "Registered agent instances by status and agent name (refreshed by the reaper loop, not per request).",
    ["status", "name"],
)
REGISTRY_HEARTBEATS = Counter("registry_heartbeats_total", "Heartbeats accepted by this registry replica.")
REGISTRY_STALE_AGENTS = Counter(
    "registry_stale_agents_total", "Instances marked offline after missing heartbeats for the TTL.", ["name"]
)
#: A heartbeat interval is 1-5 s; lag past the TTL (20 s by default) means the instance goes stale.
REGISTRY_HEARTBEAT_LAG = Histogram(
    "registry_heartbeat_lag_seconds",
    "Time between an instance's heartbeat and its previous one, as the registry saw them.",
    buckets=(0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120),
)

# -- workflows (orchestrator) ----------------------------------------------------------
__all__ += [
    "WORKFLOWS_ACTIVE",
    "WORKFLOWS_FINISHED",
    "WORKFLOWS_HANDED_BACK",
    "WORKFLOWS_STARTED",
    "WORKFLOWS_STUCK",
    "WORKFLOW_APPROVALS_PENDING",
    "WORKFLOW_APPROVAL_OLDEST_WAIT",
    "WORKFLOW_DURATION",
    "WORKFLOW_EVENT_STREAMS",
    "WORKFLOW_HANDBACK_REASONS",
    "WORKFLOW_INTERRUPT_WAIT",
    "WORKFLOW_NODE_DURATION",
]
WORKFLOWS_STARTED = Counter("workflows_started_total", "Workflows accepted by the API.", ["type"])
WORKFLOWS_FINISHED = Counter(
    "workflows_finished_total", "Workflows that reached a terminal status.", ["type", "status"]
)
WORKFLOW_DURATION = Histogram(
    "workflow_duration_seconds", "Launch to terminal status, per workflow type.", ["type"], buckets=LATENCY_BUCKETS_S
)
WORKFLOW_NODE_DURATION = Histogram(
    "workflow_node_duration_seconds",
    "Duration of one node (task) of a workflow.",
    ["type", "node"],
    buckets=LATENCY_BUCKETS_S,
)
WORKFLOWS_ACTIVE = Gauge("workflows_active", "Workflows this replica is running now.", ["type"])
#: Why a replica hands a running workflow back to be resumed from its checkpoint (runner).
WORKFLOW_HANDBACK_REASONS = ("connection_lost", "lost_lock", "shutdown", "stuck", "vanished")
WORKFLOWS_HANDED_BACK = Counter(
    "workflows_handed_back_total",
    "Running workflows this replica handed back to resume from their checkpoint, by why: a lost server "
    "connection, a lost lock session, a shutdown, a stuck retry, a task ended by nobody here.",
    ["type", "reason"],
)
WORKFLOWS_STUCK = Gauge("workflows_stuck", "Running workflows with no progress for AO_STUCK_AFTER_S.", ["type"])
WORKFLOW_APPROVALS_PENDING = Gauge(
    "workflow_approvals_pending", "Workflows waiting on a human answer now (all replicas see the same value)."
)
WORKFLOW_APPROVAL_OLDEST_WAIT = Gauge(
    "workflow_approval_oldest_wait_seconds", "How long the oldest unanswered approval has waited; 0 when none."
)
WORKFLOW_EVENT_STREAMS = Gauge(
    "workflow_event_streams",
    "Workflow event streams open on this replica: GET /workflows/{id}/events, streamed launches, "
    "launches waiting with wait_s.",
)
WORKFLOW_INTERRUPT_WAIT = Histogram(
    "workflow_interrupt_wait_seconds",
    "Time a workflow waited on a human answer (approval).",
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
)

# -- messaging (shared.lib.event_bus) ------------------------------------------------
__all__ += [
    "AGENT_DEAD_LETTER_REASONS",
    "AGENT_REFUSAL_REASONS",
    "AGENT_REQUESTS",
    "AGENT_REQUESTS_ACTIVE",
    "AGENT_REQUESTS_DEAD_LETTERED",
    "AGENT_REQUESTS_REDELIVERED",
    "AGENT_REQUESTS_REFUSED",
    "AGENT_REQUEST_DURATION",
    "AGENT_REQUEST_QUEUE_DEPTH",
    "AGENT_REQUEST_TIMEOUTS",
    "AGENT_RESPONSES_DROPPED",
    "EVENT_BUS_EVENTS_DELIVERED",
    "EVENT_BUS_EVENTS_EMITTED",
    "EVENT_BUS_SUBSCRIBER_ERRORS",
]

AGENT_REQUESTS = Counter(
    "agent_requests_total",
    "Requests answered by this process's agent instances (stream and HTTP), by outcome: the "
    "response's status and, unless it succeeded, its error code (invalid_input, timeout...).",
    ["source_agent", "target_agent", "request_type", "status", "code"],
)
AGENT_REQUEST_DURATION = Histogram(
    "agent_request_duration_seconds",
    "Handler time of answered requests, from the start of the handler to the stored response.",
    ["target_agent"],
    buckets=LATENCY_BUCKETS_S,
)
AGENT_REQUESTS_ACTIVE = Gauge("agent_requests_active", "Requests this process is handling right now.", ["agent"])
AGENT_REQUEST_TIMEOUTS = Counter(
    "agent_request_timeouts_total", "Calls that got no response before their deadline (caller side).", ["target_agent"]
)
AGENT_REQUESTS_REDELIVERED = Counter(
    "agent_requests_redelivered_total", "Requests reclaimed from an instance that stopped renewing them.", ["agent"]
)
AGENT_REQUESTS_DEAD_LETTERED = Counter(
    "agent_requests_dead_lettered_total",
    "Requests moved to a dead-letter stream (max_deliveries, bad_signature, payload_too_large...).",
    ["reason"],
)
#: The reasons a request is dead-lettered (off the stream) or refused (over HTTP) for: each agent
#: process creates these series at zero at start, so its first dead letter is an increase
#: DeadLettersGrowing sees (a series born at 1 shows no increase).
AGENT_DEAD_LETTER_REASONS = ("max_deliveries", "bad_signature", "invalid_input", "payload_too_large")
AGENT_REFUSAL_REASONS = ("bad_signature", "invalid_input", "payload_too_large", "busy")
AGENT_REQUESTS_REFUSED = Counter(
    "agent_requests_refused_total",
    "Requests refused over HTTP by the bus (bad_signature, payload_too_large, busy...): answered, not stored.",
    ["reason"],
)
AGENT_REQUEST_QUEUE_DEPTH = Gauge(
    "agent_request_queue_depth", "Requests queued or pending for an agent, all priority bands.", ["agent"]
)
AGENT_RESPONSES_DROPPED = Counter(
    "agent_responses_dropped_total", "Responses a requester discarded (late, unsigned, malformed).", ["reason"]
)
EVENT_BUS_EVENTS_EMITTED = Counter(
    "event_bus_events_emitted_total", "Events written to the events table and published.", ["event_type"]
)
EVENT_BUS_EVENTS_DELIVERED = Counter("event_bus_events_delivered_total", "Events handed to a live subscriber callback.")
EVENT_BUS_SUBSCRIBER_ERRORS = Counter(
    "event_bus_subscriber_errors_total", "Subscriber callbacks that raised (the subscription carries on)."
)

# -- resource locks ----------------------------------------------------------------
__all__ += [
    "RESOURCE_LOCKS_ACTIVE",
    "RESOURCE_LOCK_ACQUISITIONS",
    "RESOURCE_LOCK_CONTENTIONS",
    "RESOURCE_LOCK_EXPIRATIONS",
    "RESOURCE_LOCK_WAIT",
]

#: status: granted, contended (wait_s=0 and held), timeout (still held after wait_s), error.
RESOURCE_LOCK_ACQUISITIONS = Counter(
    "resource_lock_acquisitions_total",
    "Lock acquisitions by outcome; resource_type is the resource id's prefix before the first ':'.",
    ["resource_type", "status"],
)
#: An uncontended grant is ~0.3 ms; a contended one waits for the holder's lease (seconds to minutes).
RESOURCE_LOCK_WAIT = Histogram(
    "resource_lock_wait_seconds",
    "Time from the start of an acquire to its grant.",
    ["resource_type"],
    buckets=LATENCY_BUCKETS_S,
)
RESOURCE_LOCKS_ACTIVE = Gauge("resource_locks_active", "Leases this process holds right now.", ["resource_type"])
RESOURCE_LOCK_CONTENTIONS = Counter(
    "resource_lock_contentions_total", "Acquisitions that found the lock held (counted once each).", ["resource_type"]
)
RESOURCE_LOCK_EXPIRATIONS = Counter(
    "resource_lock_expirations_total", "Leases this process expired because their TTL passed without renewal."
)

# -- service readiness (shared.lib.http_service) ----------------------------------------
__all__ += ["SERVICE_DEPENDENCY_UP"]

#: Set by every service's readiness ping (``/ready``, and each ``/metrics`` scrape), so an
#: alert sees PostgreSQL or Redis unreachable from the service's own side of the network.
SERVICE_DEPENDENCY_UP = Gauge(
    "service_dependency_up",
    "1 if this service's last ping of the dependency (postgres, redis) succeeded, else 0.",
    ["dependency"],
)
