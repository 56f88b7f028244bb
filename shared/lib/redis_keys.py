"""Every Redis key pattern and TTL, in one place.

Every key starts with the deployment's prefix (``Settings.redis_prefix``), so
deployments and tests can share one server. Keys that belong to one agent carry
its name as a hash tag (``{name}``), so all of an agent's keys land in the same
Redis Cluster slot and multi-key operations on them stay legal.
"""

from __future__ import annotations

__all__: list[str] = []
