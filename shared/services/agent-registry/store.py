"""Every SQL statement of the registry, over an asyncpg pool.

Each operation is one statement where it can be, so concurrent replicas stay
consistent without application locks: the heartbeat is one UPDATE, the reaper's
sweeps are one UPDATE/DELETE ... RETURNING each. asyncpg prepares and caches
each statement per connection, so the hot path is parsed once.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg

from shared.lib.errors import Conflict, NotFound, Unauthorized
from shared.lib.registry_models import (
    DISCOVERY_ORDER,
    AgentInstance,
    AgentStatus,
    Registration,
    transition_allowed,
)
from shared.lib.safe_input import clipped

__all__ = [
    "Beat",
    "Discovery",
    "RegistryStore",
    "Removed",
    "Stale",
    "Transition",
    "hash_token",
    "new_token",
]

_COLUMNS = (
    "id, name, version, endpoint, capabilities, metadata, status, in_flight, "
    "last_heartbeat, registered_at, status_changed_at, status_reason"
)

_REGISTER = f"""
INSERT INTO agent_instances AS a (id, name, version, endpoint, capabilities, metadata, status, token_hash)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name, version = EXCLUDED.version, endpoint = EXCLUDED.endpoint,
    capabilities = EXCLUDED.capabilities, metadata = EXCLUDED.metadata, status = EXCLUDED.status,
    token_hash = EXCLUDED.token_hash, prior_status = NULL, status_reason = NULL, in_flight = 0,
    last_heartbeat = now(), registered_at = clock_timestamp(), status_changed_at = now()
RETURNING {_COLUMNS}
"""  # noqa: S608 - only constant column names are interpolated; values are bind parameters

# The self-join reads the row as it was before this UPDATE: whether the reaper had
# marked it offline (prior_status) and when the previous heartbeat came (the lag).
# The heartbeat commits asynchronously (set_config(..., true) lasts until this
# statement's own commit): a heartbeat lost in a PostgreSQL crash is replaced by the
# next one a second later, and not waiting for the WAL flush cuts an UPDATE from
# 1.2 ms to 0.33 ms on the embedded server (500 sequential UPDATEs of one row).
_HEARTBEAT = """
UPDATE agent_instances AS a SET
    last_heartbeat = now(), in_flight = $3,
    status = COALESCE(a.prior_status, a.status), prior_status = NULL,
    status_changed_at = CASE WHEN a.prior_status IS NULL THEN a.status_changed_at ELSE now() END
FROM agent_instances AS old, (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
WHERE a.id = $1 AND a.token_hash = $2 AND old.id = a.id
RETURNING a.name, a.status, old.prior_status AS revived_from,
          extract(epoch FROM now() - old.last_heartbeat)::float8 AS lag_s
"""

_TOKEN_OF = "SELECT token_hash, name FROM agent_instances WHERE id = $1"  # noqa: S105 - a query, not a password

_LOCK_FOR_STATUS = "SELECT name, status, prior_status, token_hash FROM agent_instances WHERE id = $1 FOR UPDATE"

_SET_STATUS = """
UPDATE agent_instances SET status = $2, status_reason = $3, prior_status = NULL,
    status_changed_at = CASE WHEN status = $2 THEN status_changed_at ELSE now() END,
    last_heartbeat = now()
WHERE id = $1
"""

_DELETE = "DELETE FROM agent_instances WHERE id = $1 RETURNING name, status"

_GET = f"SELECT {_COLUMNS} FROM agent_instances WHERE id = $1"  # noqa: S608 - constant column names only

# One statement marks every instance whose heartbeat is older than the TTL; a
# concurrent sweep on another replica re-checks the WHERE after the row lock and
# skips rows already marked, so each instance goes stale exactly once.
_MARK_STALE = """
UPDATE agent_instances SET prior_status = status, status = 'offline', status_changed_at = now(),
    status_reason = 'missed heartbeats'
WHERE status <> 'offline' AND last_heartbeat < now() - make_interval(secs => $1)
RETURNING id, name, prior_status
"""

# Offline for longer than the grace, and silent as long: the grace counts from going offline.
_REMOVE_EXPIRED = """
DELETE FROM agent_instances
WHERE status = 'offline' AND status_changed_at < now() - make_interval(secs => $1)
    AND last_heartbeat < now() - make_interval(secs => $1)
RETURNING id, name
"""

_COUNTS = "SELECT status, name, count(*) AS n FROM agent_instances GROUP BY status, name"

_ORDER = (
    "ORDER BY CASE status "
    + " ".join(f"WHEN '{s.value}' THEN {i}" for i, s in enumerate(DISCOVERY_ORDER))
    + " END, in_flight ASC, last_heartbeat DESC, id ASC"
)


def new_token() -> str:
    """A fresh per-instance token (256 random bits)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 suffices: the token is random, so there is nothing to brute-force from its hash."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Beat:
    """What one heartbeat did: the instance's status, and whether it came back from stale."""

    name: str
    status: AgentStatus
    revived_from: AgentStatus | None
    lag_s: float


@dataclass(frozen=True)
class Transition:
    agent_id: str
    name: str
    previous: AgentStatus
    status: AgentStatus


@dataclass(frozen=True)
class Stale:
    agent_id: str
    name: str
    previous: AgentStatus


@dataclass(frozen=True)
class Removed:
    agent_id: str
    name: str


@dataclass(frozen=True)
class Discovery:
    """Filters of ``GET /agents``; each set filter adds one indexed condition."""

    capability: str | None = None
    tag: str | None = None
    statuses: tuple[AgentStatus, ...] = ()
    name: str | None = None
    limit: int = 100

    def sql(self) -> tuple[str, list[Any]]:
        conditions: list[str] = []
        args: list[Any] = []

        def add(fragment: str, value: Any) -> None:
            args.append(value)
            conditions.append(fragment.format(n=len(args)))

        if self.capability is not None:
            add("capabilities @> jsonb_build_array(jsonb_build_object('id', ${n}::text))", self.capability)
        if self.tag is not None:
            add(
                "capabilities @> jsonb_build_array(jsonb_build_object('tags', jsonb_build_array(${n}::text)))", self.tag
            )
        if self.statuses:
            add("status = ANY(${n}::text[])", [s.value for s in self.statuses])
        if self.name is not None:
            add("name = ${n}", self.name)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        args.append(self.limit)
        # Only constant fragments are interpolated; every value is a bind parameter.
        sql = f"SELECT {_COLUMNS} FROM agent_instances {where} {_ORDER} LIMIT ${len(args)}"  # noqa: S608
        return sql, args


def _instance(row: asyncpg.Record) -> AgentInstance:
    return AgentInstance.model_validate(dict(row))


class RegistryStore:
    """The registry's table, one method per operation."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def register(self, reg: Registration, *, agent_id: str, token: str) -> AgentInstance:
        """Insert the instance, or replace an earlier registration under the same id (a new token)."""
        skills = [s.model_dump() for s in reg.capabilities]
        row = await self._pool.fetchrow(
            _REGISTER,
            agent_id,
            reg.name,
            reg.version,
            reg.endpoint,
            skills,
            reg.metadata,
            reg.status.value,
            hash_token(token),
        )
        assert row is not None
        return _instance(row)

    async def heartbeat(self, agent_id: str, token: str, *, in_flight: int) -> Beat:
        """One UPDATE: liveness and load; a status the agent set is kept, a stale one restored."""
        row = await self._pool.fetchrow(_HEARTBEAT, agent_id, hash_token(token), in_flight)
        if row is None:
            await self._raise_missing_or_unauthorized(agent_id)
        assert row is not None
        revived = row["revived_from"]
        return Beat(
            name=row["name"],
            status=AgentStatus(row["status"]),
            revived_from=AgentStatus(revived) if revived else None,
            lag_s=float(row["lag_s"]),
        )

    async def _raise_missing_or_unauthorized(self, agent_id: str) -> None:
        stored = await self._pool.fetchval(_TOKEN_OF, agent_id)
        if stored is None:
            raise _not_registered(agent_id)
        raise _bad_token(agent_id)

    async def set_status(self, agent_id: str, token: str, status: AgentStatus, *, reason: str | None) -> Transition:
        """Change the status if the transition is legal; a stale instance is judged by its status before going stale."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_LOCK_FOR_STATUS, agent_id)
            if row is None:
                raise _not_registered(agent_id)
            if not secrets.compare_digest(row["token_hash"], hash_token(token)):
                raise _bad_token(agent_id)
            current = AgentStatus(row["prior_status"] or row["status"])
            if not transition_allowed(current, status):
                raise Conflict(
                    f"agent {agent_id} cannot go from {current.value} to {status.value}; allowed: "
                    "initializing -> active, active <-> busy, any -> error or offline",
                    field="status",
                    resource=agent_id,
                    details={"current": current.value, "requested": status.value},
                )
            await conn.execute(_SET_STATUS, agent_id, status.value, reason)
        return Transition(agent_id=agent_id, name=row["name"], previous=AgentStatus(row["status"]), status=status)

    async def check_token(self, agent_id: str, token: str) -> str:
        """The agent name of instance ``agent_id`` if ``token`` is its token; else NotFound or Unauthorized."""
        row = await self._pool.fetchrow(_TOKEN_OF, agent_id)
        if row is None:
            raise _not_registered(agent_id)
        if not secrets.compare_digest(row["token_hash"], hash_token(token)):
            raise _bad_token(agent_id)
        name: str = row["name"]
        return name

    async def delete(self, agent_id: str) -> Removed:
        row = await self._pool.fetchrow(_DELETE, agent_id)
        if row is None:
            raise _not_registered(agent_id)
        return Removed(agent_id=agent_id, name=row["name"])

    async def get(self, agent_id: str) -> AgentInstance:
        row = await self._pool.fetchrow(_GET, agent_id)
        if row is None:
            raise _not_registered(agent_id)
        return _instance(row)

    async def discover(self, query: Discovery) -> list[AgentInstance]:
        sql, args = query.sql()
        return [_instance(r) for r in await self._pool.fetch(sql, *args)]

    async def mark_stale(self, *, stale_after_s: float) -> list[Stale]:
        rows = await self._pool.fetch(_MARK_STALE, stale_after_s)
        return [Stale(r["id"], r["name"], AgentStatus(r["prior_status"])) for r in rows]

    async def remove_expired(self, *, remove_after_s: float) -> list[Removed]:
        rows = await self._pool.fetch(_REMOVE_EXPIRED, remove_after_s)
        return [Removed(r["id"], r["name"]) for r in rows]

    async def counts(self) -> list[tuple[str, str, int]]:
        return [(r["status"], r["name"], int(r["n"])) for r in await self._pool.fetch(_COUNTS)]


# The id may be a caller's header (an agent's X-Agent-Id): repeated cut to a sane length.
def _not_registered(agent_id: str) -> NotFound:
    shown = clipped(agent_id)
    return NotFound(
        f"agent {shown} is not registered (never, or removed after missing heartbeats); register it again",
        resource=shown,
    )


def _bad_token(agent_id: str) -> Unauthorized:
    shown = clipped(agent_id)
    return Unauthorized(
        f"wrong token for agent {shown}; use the token its registration returned, or register again",
        field="X-Agent-Token",
        resource=shown,
    )
