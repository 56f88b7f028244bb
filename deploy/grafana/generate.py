"""Generate the Grafana dashboards in ``deploy/grafana/dashboards/`` from one table of panels.

Run ``python deploy/grafana/generate.py`` after editing a panel (``--check`` only
compares). Every panel's PromQL queries metrics defined in ``shared/lib/metrics.py``
(or prometheus-client's process collector, or Prometheus's own ``up``); the tests
evaluate each query against a real Prometheus scraping a real stack.

A panel that stays empty in a quiet run (nothing failed, nothing was redelivered)
says so in ``quiet_empty`` with the reason; the live test accepts exactly those.

Queries group only by bounded labels (job, agent name, request type, status,
workflow type, node, resource type, reason): never by a request, workflow or
owner id, and never by instance, so a dashboard does not grow with replicas.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DASHBOARDS", "DATASOURCE_UID", "RATE_WINDOW", "Dashboard", "Panel", "Query", "render", "write_all"]

#: Provisioned in provisioning/datasources/prometheus.yml under this uid.
DATASOURCE_UID = "prometheus"
#: Grafana's own rate window; the live test substitutes a concrete duration for it.
RATE_WINDOW = "$__rate_interval"
_W = RATE_WINDOW
_OUT = Path(__file__).resolve().parent / "dashboards"
_SERVICES = "agent-registry|orchestrator|feature-dev|code-review|infrastructure|cicd|documentation"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    #: Why this panel may show nothing in a quiet run (empty: it must show data).
    quiet_empty: str = ""


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    panels: tuple[Panel, ...]
    tags: tuple[str, ...] = field(default=("agent-orchestrator",))


def _q(expr: str, legend: str) -> tuple[Query, ...]:
    return (Query(expr, legend),)


def _quantiles(metric: str, by: str, legend: str) -> tuple[Query, ...]:
    """p50 and p99 of a histogram, grouped by ``by`` (plus ``le``)."""
    group = f"le, {by}" if by else "le"
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{_W}])))",
            f"p{int(q * 100)} {legend}".strip(),
        )
        for q in (0.5, 0.99)
    )


_NO_FAILURES = "a quiet run has no failed or rejected agent request"

OVERVIEW = Dashboard(
    uid="ao-overview",
    title="Agent orchestrator / Overview",
    panels=(
        Panel(
            "Services up",
            "Scrape targets up per job (orchestrator replicas, registry, agents).",
            _q(f'sum by (job) (up{{job=~"{_SERVICES}"}})', "{{job}}"),
            kind="stat",
        ),
        Panel(
            "Dependencies reachable",
            "Lowest service_dependency_up per job: 0 means a service cannot reach PostgreSQL or Redis.",
            _q("min by (job, dependency) (service_dependency_up)", "{{job}} -> {{dependency}}"),
            kind="stat",
        ),
        Panel(
            "Workflows finished by status",
            "Workflows reaching a terminal status, per type and status.",
            _q(f"sum by (type, status) (increase(workflows_finished_total[{_W}]))", "{{type}} {{status}}"),
        ),
        Panel(
            "Workflows running",
            "Workflows the orchestrator replicas are running now, per type.",
            _q("sum by (type) (workflows_active)", "{{type}}"),
        ),
        Panel(
            "Agent request rate",
            "Requests answered per second, per agent and request type.",
            _q(
                f"sum by (target_agent, request_type) (rate(agent_requests_total[{_W}]))",
                "{{target_agent}} {{request_type}}",
            ),
            unit="reqps",
        ),
        Panel(
            "Agent request errors",
            "Requests answered error, timeout or rejected, per agent, request type and error code.",
            _q(
                "sum by (target_agent, request_type, status, code)"
                f' (rate(agent_requests_total{{status!="success"}}[{_W}]))',
                "{{target_agent}} {{request_type}} {{status}} {{code}}",
            ),
            unit="reqps",
            quiet_empty=_NO_FAILURES,
        ),
        Panel(
            "Agent request latency p50 / p99",
            "Handler time per agent (the duration histogram is labelled by agent only).",
            _quantiles("agent_request_duration_seconds", "target_agent", "{{target_agent}}"),
            unit="s",
        ),
        Panel(
            "Process CPU",
            "CPU seconds per second used by each job's processes.",
            _q(f'sum by (job) (rate(process_cpu_seconds_total{{job=~"{_SERVICES}"}}[{_W}]))', "{{job}}"),
            unit="percentunit",
        ),
    ),
)

AGENTS = Dashboard(
    uid="ao-agents",
    title="Agent orchestrator / Agents",
    panels=(
        Panel(
            "Registered instances by status",
            "Agent instances in the registry per agent name and status (max over registry replicas).",
            _q("max by (name, status) (registry_agents)", "{{name}} {{status}}"),
        ),
        Panel(
            "Heartbeat lag p50 / p99",
            "Time between consecutive heartbeats of an instance as the registry saw them.",
            _quantiles("registry_heartbeat_lag_seconds", "", ""),
            unit="s",
        ),
        Panel(
            "Heartbeats per second",
            "Heartbeats accepted by the registry.",
            _q(f"sum(rate(registry_heartbeats_total[{_W}]))", "heartbeats"),
            unit="ops",
        ),
        Panel(
            "Instances gone stale",
            "Instances marked offline after missing heartbeats for AO_AGENT_STALE_AFTER_S.",
            _q(f"sum by (name) (increase(registry_stale_agents_total[{_W}]))", "{{name}}"),
            quiet_empty="no instance misses its heartbeats in a quiet run",
        ),
        Panel(
            "In-flight requests",
            "Requests being handled right now, per agent.",
            _q("sum by (agent) (agent_requests_active)", "{{agent}}"),
        ),
        Panel(
            "Queue depth",
            "Requests queued or pending per agent (every instance reports the same streams: max).",
            _q("max by (agent) (agent_request_queue_depth)", "{{agent}}"),
        ),
        Panel(
            "Redeliveries",
            "Requests reclaimed from an instance that stopped renewing them.",
            _q(f"sum by (agent) (rate(agent_requests_redelivered_total[{_W}]))", "{{agent}}"),
            unit="reqps",
            quiet_empty="no instance dies holding requests in a quiet run",
        ),
        Panel(
            "Dead letters",
            "Requests moved to a dead-letter stream, per reason.",
            _q(f"sum by (reason) (increase(agent_requests_dead_lettered_total[{_W}]))", "{{reason}}"),
            quiet_empty="no request is refused or redelivered too often in a quiet run",
        ),
        Panel(
            "Call timeouts",
            "Agent calls that got no response before their deadline (caller side).",
            _q(f"sum by (target_agent) (rate(agent_request_timeouts_total[{_W}]))", "{{target_agent}}"),
            unit="reqps",
            quiet_empty="no agent call times out in a quiet run",
        ),
        Panel(
            "Events emitted",
            "Events written to the events table and published, per event type.",
            _q(f"sum by (event_type) (rate(event_bus_events_emitted_total[{_W}]))", "{{event_type}}"),
            unit="ops",
        ),
    ),
)

WORKFLOWS = Dashboard(
    uid="ao-workflows",
    title="Agent orchestrator / Workflows",
    panels=(
        Panel(
            "Workflows started",
            "Workflows accepted by the API, per type.",
            _q(f"sum by (type) (increase(workflows_started_total[{_W}]))", "{{type}}"),
        ),
        Panel(
            "Workflow duration p50 / p99",
            "Launch to terminal status, per workflow type (includes time waiting for approval).",
            _quantiles("workflow_duration_seconds", "type", "{{type}}"),
            unit="s",
        ),
        Panel(
            "Node duration p99",
            "Duration of one node (task) per workflow type and node.",
            (
                Query(
                    "histogram_quantile(0.99, sum by (le, type, node) "
                    f"(rate(workflow_node_duration_seconds_bucket[{_W}])))",
                    "{{type}} {{node}}",
                ),
            ),
            unit="s",
        ),
        Panel(
            "Stuck workflows",
            "Running workflows with no progress for AO_STUCK_AFTER_S, per type, over all replicas (0 when healthy).",
            _q("sum by (type) (workflows_stuck)", "{{type}}"),
            kind="stat",
        ),
        Panel(
            "Workflows handed back",
            "Running workflows a replica handed back to resume from their checkpoint, per type and why: "
            "a lost server connection or lock session (PostgreSQL or Redis restarting), a shutdown, a stuck retry.",
            _q(
                f"sum by (type, reason) (increase(workflows_handed_back_total[{_W}]))",
                "{{type}} {{reason}}",
            ),
        ),
        Panel(
            "Approval wait p50 / p99",
            "Time a workflow waited for a human answer before it was resumed.",
            _quantiles("workflow_interrupt_wait_seconds", "", ""),
            unit="s",
        ),
        Panel(
            "Open event streams",
            "Event streams open over all replicas: followers of GET /workflows/{id}/events, streamed "
            "launches and launches waiting with wait_s (back to 0 when nobody follows).",
            _q("sum(workflow_event_streams)", "streams"),
        ),
        Panel(
            "Workflows failed or cancelled",
            "Workflows ending failed or cancelled, per type and status.",
            _q(
                f'sum by (type, status) (increase(workflows_finished_total{{status!="succeeded"}}[{_W}]))',
                "{{type}} {{status}}",
            ),
            quiet_empty="every workflow of a quiet run succeeds",
        ),
    ),
)

LOCKS = Dashboard(
    uid="ao-locks",
    title="Agent orchestrator / Locks",
    panels=(
        Panel(
            "Active locks",
            "Leases held right now, per resource type (repo, env, ...).",
            _q("sum by (resource_type) (resource_locks_active)", "{{resource_type}}"),
        ),
        Panel(
            "Acquisitions by outcome",
            "Lock acquisitions per resource type and outcome (granted, contended, timeout, error).",
            _q(
                f"sum by (resource_type, status) (rate(resource_lock_acquisitions_total[{_W}]))",
                "{{resource_type}} {{status}}",
            ),
            unit="ops",
        ),
        Panel(
            "Lock wait p50 / p99",
            "Time from the start of an acquire to its grant, per resource type.",
            _quantiles("resource_lock_wait_seconds", "resource_type", "{{resource_type}}"),
            unit="s",
        ),
        Panel(
            "Contention",
            "Acquisitions that found the lock held, per resource type.",
            _q(f"sum by (resource_type) (rate(resource_lock_contentions_total[{_W}]))", "{{resource_type}}"),
            unit="ops",
        ),
        Panel(
            "Lease expirations",
            "Leases expired because their TTL passed without renewal (a holder stalled).",
            _q(f"sum(increase(resource_lock_expirations_total[{_W}]))", "expired"),
        ),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (OVERVIEW, AGENTS, WORKFLOWS, LOCKS)


def _panel_json(panel: Panel, index: int) -> dict[str, Any]:
    ds = {"type": "prometheus", "uid": DATASOURCE_UID}
    return {
        "id": index + 1,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": ds,
        "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": ds, "expr": q.expr, "legendFormat": q.legend}
            for i, q in enumerate(panel.queries)
        ],
    }


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The Grafana JSON model of ``dashboard`` (schema 39, Grafana 10/11)."""
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "tags": list(dashboard.tags),
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": [_panel_json(p, i) for i, p in enumerate(dashboard.panels)],
    }


def _text(dashboard: Dashboard) -> str:
    return json.dumps(render(dashboard), indent=2, sort_keys=True) + "\n"


def write_all(out: Path = _OUT, *, check: bool = False) -> list[Path]:
    """Write every dashboard (or, with ``check``, return the files that differ)."""
    out.mkdir(parents=True, exist_ok=True)
    stale = []
    for dashboard in DASHBOARDS:
        path = out / f"{dashboard.uid}.json"
        text = _text(dashboard)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            path.write_text(text)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is out of date")
    args = parser.parse_args()
    stale = write_all(check=args.check)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path.name}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
