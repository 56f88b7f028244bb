"""SQL over ``workflow_runs``: queue, claim, renew, park, finish, resume, cancel.

Every state change is one statement, guarded by the state it expects, so two
replicas racing on a row cannot both win. Enqueues and resumes ``NOTIFY`` the
``ao_workflow_runs`` channel so idle runners wake at once instead of polling.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shared.lib.connections import Along

__all__ = ["CANCEL_CHANNEL", "RUNS_CHANNEL", "RunRow", "RunStore"]

#: Wakes idle runners when a run becomes claimable.
RUNS_CHANNEL = "ao_workflow_runs"
#: Tells the replica running a workflow to cancel it now.
CANCEL_CHANNEL = "ao_workflow_cancel"


@dataclass(frozen=True)
class RunRow:
    workflow_id: str
    workflow_type: str
    state: str
    runner_id: str | None
    attempts: int
    resume_value: Any
    pending_interrupt: Any
    wait_deadline: datetime | None
    cancel_requested: bool
    stuck_since: datetime | None
    lease_expires_at: datetime | None = None
    losses: int = 0
    """How many times a runner died while running it (claimed again after its lease ran out)."""
    handbacks: int = 0
    """How many times it was handed back for a lost server connection since it last waited."""

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> RunRow:
        return cls(**{k: r[k] for k in cls.__dataclass_fields__})


# Take the advisory locks of the candidates that no live replica holds, claim those runs, and give
# back at once the locks of runs that stopped being claimable meanwhile: one statement.
_CLAIM_SQL = """
WITH locked AS MATERIALIZED (
    SELECT id, k FROM unnest($1::text[], $2::int8[]) AS c(id, k) WHERE pg_try_advisory_lock(k)
), claimed AS (
    UPDATE workflow_runs SET state = 'running', runner_id = $3, attempts = attempts + 1,
        losses = losses + CASE WHEN state = 'running' THEN 1 ELSE 0 END,
        lease_expires_at = now() + make_interval(secs => $4), last_progress_at = now(), stuck_since = NULL,
        updated_at = now()
    WHERE workflow_id IN (SELECT id FROM locked)
        AND (state = 'queued' OR (state = 'running' AND lease_expires_at < now()))
    RETURNING *
), released AS MATERIALIZED (
    SELECT pg_advisory_unlock(k) FROM locked WHERE id NOT IN (SELECT workflow_id FROM claimed)
)
SELECT * FROM claimed WHERE (SELECT count(*) FROM released) >= 0
"""


class RunStore:
    """Run leases in PostgreSQL for one runner (``runner_id``)."""

    def __init__(self, pool: asyncpg.Pool, *, runner_id: str, lease_ttl_s: float) -> None:
        self.pool = pool
        self.runner_id = runner_id
        self.lease_ttl_s = lease_ttl_s

    def queued_insert(self, workflow_id: str, workflow_type: str, first: int) -> tuple[str, list[Any]]:
        """The INSERT of a new queued run (parameters from ``$first``), to go in the launch's
        statement; it wakes the replicas when that commits."""
        a, b, c = (f"${first + i}" for i in range(3))
        sql = f"INSERT INTO workflow_runs (workflow_id, workflow_type) VALUES ({a}, {b}) RETURNING pg_notify({c}, {a})"  # noqa: S608 - parameter numbers only
        return sql, [workflow_id, workflow_type, RUNS_CHANNEL]

    def claimed_insert(self, workflow_id: str, workflow_type: str, first: int) -> tuple[str, list[Any]]:
        """The INSERT of a new run already claimed by this runner (parameters from ``$first``), to
        go in the launch's statement: the replica that takes the launch runs it at once (it holds
        the advisory lock). Nobody is woken; if this replica dies, the lease runs out and another
        one claims the run as usual. :meth:`claimed_row` is the row it writes."""
        a, b, c, d = (f"${first + i}" for i in range(4))
        sql = (
            "INSERT INTO workflow_runs (workflow_id, workflow_type, state, runner_id, attempts, lease_expires_at, "  # noqa: S608 - parameter numbers only
            f"last_progress_at) VALUES ({a}, {b}, 'running', {c}, 1, now() + make_interval(secs => {d}::float8), "
            "now()) RETURNING workflow_id, lease_expires_at"
        )
        return sql, [workflow_id, workflow_type, self.runner_id, self.lease_ttl_s]

    def claimed_row(self, workflow_id: str, workflow_type: str, lease_expires_at: datetime) -> RunRow:
        return RunRow(
            workflow_id, workflow_type, "running", self.runner_id, 1, None, None, None, False, None, lease_expires_at
        )

    async def get(self, workflow_id: str) -> RunRow | None:
        row = await self.pool.fetchrow("SELECT * FROM workflow_runs WHERE workflow_id = $1", workflow_id)
        return RunRow.from_record(row) if row else None

    async def candidates(self, *, limit: int, types: list[str] | None = None) -> list[str]:
        """Runs that are queued, or running under an expired lease (their runner died); with
        ``types``, only runs of those workflow types (the ones this replica can run)."""
        of_types, args = ("AND workflow_type = ANY($2::text[]) ", [types]) if types is not None else ("", [])
        rows = await self.pool.fetch(
            "SELECT workflow_id FROM workflow_runs WHERE (state = 'queued' "  # noqa: S608 - a constant condition
            f"OR (state = 'running' AND lease_expires_at < now())) {of_types}ORDER BY updated_at LIMIT $1",
            limit,
            *args,
        )
        return [r["workflow_id"] for r in rows]

    async def claim(self, lock_conn: asyncpg.Connection, workflow_ids: list[str], keys: list[int]) -> list[RunRow]:
        """Take the runs of ``workflow_ids`` that are still claimable and whose advisory locks
        (``keys``, in the same order) no live replica holds; the locks are taken on ``lock_conn``,
        this runner's lock session, and kept for the runs claimed."""
        rows = await lock_conn.fetch(_CLAIM_SQL, workflow_ids, keys, self.runner_id, self.lease_ttl_s)
        return [RunRow.from_record(r) for r in rows]

    async def renew(self, workflow_ids: list[str]) -> dict[str, bool]:
        """Extend our leases; returns {workflow_id: cancel_requested} for the ones still ours."""
        rows = await self.pool.fetch(
            "UPDATE workflow_runs SET lease_expires_at = now() + make_interval(secs => $3) "
            "WHERE workflow_id = ANY($1::text[]) AND runner_id = $2 AND state = 'running' "
            "RETURNING workflow_id, cancel_requested",
            workflow_ids,
            self.runner_id,
            self.lease_ttl_s,
        )
        return {r["workflow_id"]: r["cancel_requested"] for r in rows}

    async def progress(self, workflow_id: str) -> None:
        await self.pool.execute(
            "UPDATE workflow_runs SET last_progress_at = now(), stuck_since = NULL "
            "WHERE workflow_id = $1 AND runner_id = $2",
            workflow_id,
            self.runner_id,
        )

    async def park(self, workflow_id: str, *, interrupt: Any, deadline: datetime) -> None:
        """The run waits for a human: give up the lease until someone answers or ``deadline``."""
        await self.pool.execute(
            "UPDATE workflow_runs SET state = 'waiting', runner_id = NULL, lease_expires_at = NULL, "
            "resume_value = NULL, pending_interrupt = $2, wait_deadline = $3, handbacks = 0, "
            "updated_at = now() WHERE workflow_id = $1 AND runner_id = $4",
            workflow_id,
            interrupt,
            deadline,
            self.runner_id,
        )

    async def finish(self, workflow_id: str) -> None:
        sql, args = self.finish_along(workflow_id)(1)
        await self.pool.execute(sql, *args)

    @staticmethod
    def finish_along(workflow_id: str) -> Along:
        """The run's finish (state ``done``), to go in the statement that finishes its workflow."""

        def statement(first: int) -> tuple[str, list[Any]]:
            return (
                "UPDATE workflow_runs SET state = 'done', runner_id = NULL, lease_expires_at = NULL, "  # noqa: S608 - parameter numbers only
                f"pending_interrupt = NULL, resume_value = NULL, updated_at = now() WHERE workflow_id = ${first}",
                [workflow_id],
            )

        return statement

    async def requeue(self, workflow_id: str, *, lost: bool = False, connection_lost: bool = False) -> None:
        """Hand a run back (shutdown, stuck retry) so any replica resumes it from its checkpoint;
        ``lost``: it is counted as a loss, as if its runner had died running it;
        ``connection_lost``: as a handback for a lost server connection (``handbacks``)."""
        await self.pool.execute(
            "UPDATE workflow_runs SET state = 'queued', runner_id = NULL, lease_expires_at = NULL, "
            "losses = losses + $3::int, handbacks = handbacks + $4::int, updated_at = now() "
            "WHERE workflow_id = $1 AND runner_id = $2 AND state = 'running'",
            workflow_id,
            self.runner_id,
            int(lost),
            int(connection_lost),
        )
        await self.pool.execute("SELECT pg_notify($1, $2)", RUNS_CHANNEL, workflow_id)

    async def requeue_abandoned(self, *, exclude: list[str]) -> None:
        """Hand back every run this runner still holds in the table but not in memory (``exclude``:
        those it runs): ones it stopped when its lock session was lost and could not hand back."""
        await self.pool.execute(
            "WITH handed AS (UPDATE workflow_runs SET state = 'queued', runner_id = NULL, lease_expires_at = NULL, "
            "updated_at = now() WHERE runner_id = $1 AND state = 'running' AND NOT (workflow_id = ANY($2::text[])) "
            "RETURNING workflow_id) SELECT count(pg_notify($3, workflow_id)) FROM handed",
            self.runner_id,
            exclude,
            RUNS_CHANNEL,
        )

    @staticmethod
    def resume_change(workflow_id: str, value: Any, *, expired: bool = False) -> tuple[str, list[Any]]:
        """Answering a waiting run with ``value``, as a statement to run inside another one (it
        returns the id when the run was waiting, and with ``expired`` only if past its deadline);
        :meth:`wake` the replicas once it is written."""
        past = " AND wait_deadline < now()" if expired else ""
        return (
            "UPDATE workflow_runs SET state = 'queued', resume_value = $2, pending_interrupt = NULL, "  # noqa: S608 - a constant condition
            f"wait_deadline = NULL, updated_at = now() WHERE workflow_id = $1 AND state = 'waiting'{past} "
            "RETURNING workflow_id",
            [workflow_id, value],
        )

    async def wake(self, workflow_id: str) -> None:
        """Tell the replicas a run is claimable."""
        await self.pool.execute("SELECT pg_notify($1, $2)", RUNS_CHANNEL, workflow_id)

    async def expired_waits(self) -> list[str]:
        """The runs waiting on an approval past its deadline."""
        rows = await self.pool.fetch(
            "SELECT workflow_id FROM workflow_runs WHERE state = 'waiting' AND wait_deadline < now() "
            "ORDER BY wait_deadline LIMIT 100"
        )
        return [r["workflow_id"] for r in rows]

    async def request_cancel(self, workflow_id: str) -> str | None:
        """Flag a run for cancellation; returns its state before, None if unknown or done."""
        row = await self.pool.fetchrow(
            "UPDATE workflow_runs SET cancel_requested = true, updated_at = now() "
            "WHERE workflow_id = $1 AND state <> 'done' RETURNING state",
            workflow_id,
        )
        if row:
            await self.pool.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, workflow_id)
        return row["state"] if row else None

    async def cancel_idle(self, workflow_id: str) -> bool:
        """Finish a queued or waiting run as cancelled (nobody runs it); False if it is running."""
        row = await self.pool.fetchrow(
            "UPDATE workflow_runs SET state = 'done', pending_interrupt = NULL, updated_at = now() "
            "WHERE workflow_id = $1 AND state IN ('queued', 'waiting') RETURNING workflow_id",
            workflow_id,
        )
        return row is not None

    async def mark_stuck(self, workflow_id: str) -> None:
        await self.pool.execute(
            "UPDATE workflow_runs SET stuck_since = coalesce(stuck_since, now()) WHERE workflow_id = $1", workflow_id
        )

    async def waiting_summary(self) -> tuple[int, float]:
        """How many runs wait on a human, and how long the oldest has waited (seconds)."""
        row = await self.pool.fetchrow(
            "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(updated_at)), 0) AS oldest "
            "FROM workflow_runs WHERE state = 'waiting'"
        )
        assert row is not None
        return int(row["n"]), float(row["oldest"])

    async def pending_interrupts(self, *, limit: int) -> list[asyncpg.Record]:
        return list(
            await self.pool.fetch(
                "SELECT workflow_id, workflow_type, pending_interrupt, wait_deadline, updated_at FROM workflow_runs "
                "WHERE state = 'waiting' ORDER BY wait_deadline LIMIT $1",
                limit,
            )
        )
