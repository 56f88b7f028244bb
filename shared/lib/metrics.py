"""Every Prometheus metric the services export, in one place.

Operators' dashboards and alert rules (``deploy/``) query exactly these names.
Label values are plain strings of bounded cardinality: agent names, request
types, statuses, resource types, workflow types. Never a request id, workflow
id or owner id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["LATENCY_BUCKETS_S"]

#: Sub-millisecond to minutes: bus round trips are ~0.5 ms, workflow steps take seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

_ = (Counter, Gauge, Histogram)  # each component's block below uses these
