"""The background runner: claims workflow runs, executes them, keeps their leases.

Several replicas share one database. A replica runs a workflow only while it
holds that workflow's session-level advisory lock on its own dedicated
connection (never a pooled one, whose reset would drop it), so no workflow runs
twice at once. If a replica dies its locks die with its session; once the
lease runs out another replica claims the run and resumes from the last
checkpoint. A watchdog answers expired approvals and reports stuck runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from agent_orchestrator.execution import Outcome
from agent_orchestrator.lock_session import LockSession
from agent_orchestrator.run_store import CANCEL_CHANNEL, RUNS_CHANNEL, RunRow, RunStore
from shared.lib import metrics
from shared.lib.connections import connection_lost
from shared.lib.errors import OrchestratorError, RunLost
from shared.lib.settings import Settings

__all__ = ["LocalRun", "RunExecutor", "RunFinished", "WorkflowRunner", "advisory_key"]

_log = logging.getLogger(__name__)

#: How often an idle runner looks for claimable runs when no NOTIFY woke it.
_POLL_S = 1.0
#: How long the advisory lock of a finished run may wait to go back with the next launch's lock.
_UNLOCK_DELAY_S = 0.05
#: Take a launch's advisory lock and give back those of finished runs, in one statement; the
#: time it was taken (the database's clock, read once it is held), or NULL when it was not.
_TAKE_SQL = (
    "SELECT (SELECT count(pg_advisory_unlock(k)) FROM unnest($2::int8[]) AS k) AS released, "
    "CASE WHEN taken THEN clock_timestamp() END AS taken_at "
    "FROM (SELECT pg_try_advisory_lock($1) AS taken OFFSET 0) AS t"
)
#: How long a cancel of a run not here is kept, in case this replica is claiming the run now
#: (a claim that started before the cancel; later ones read the run's cancel_requested).
_CANCEL_AHEAD_S = 30.0
#: Why a run stopped that hands it back to be resumed from its checkpoint: this replica stops;
#: its lock session was lost; it was stuck; its task was cancelled by nobody here (counted as a
#: loss, as a replica dying while running it is: see ``Settings.max_run_losses``).
_HANDED_BACK = frozenset({"shutdown", "lost-lock", "stuck", "vanished"})
#: How many times a stuck run is retried before it fails.
_MAX_STUCK_RETRIES = 2
#: How many times a run that failed because a server connection was lost is handed back (resumed
#: from its last checkpoint) instead of failed, since it last waited for a person. Counted apart
#: from its attempts: a pr_deployment resumed after its approval had used two or three of five.
_MAX_HANDBACKS = 5


def _count_handback(run: RunRow, reason: str) -> None:
    metrics.labels(metrics.WORKFLOWS_HANDED_BACK, run.workflow_type, reason).inc()


RunExecutor = Callable[["LocalRun"], Any]
"""``async def execute(local_run) -> Outcome``: runs the graph; raising means the workflow failed."""
RunFinished = Callable[["LocalRun", Any], Any]
"""``async def on_finished(local_run, outcome)``: records how the run ended (an Outcome or the exception)."""
RecordLoader = Callable[[list[RunRow]], Awaitable[dict[str, Any]]]
"""``async def load(runs) -> {workflow_id: record}``: the records of runs just claimed, in one read."""


def advisory_key(workflow_id: str) -> int:
    """A signed 64-bit advisory-lock key for a workflow (no 32-bit ``hashtext`` collisions)."""
    digest = hashlib.blake2b(f"workflow:{workflow_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass
class LocalRun:
    run: RunRow
    task: asyncio.Task[None] | None = None
    last_progress: float = field(default_factory=time.monotonic)
    record: Any = None
    """The workflow's record, once read (or handed over by :meth:`WorkflowRunner.adopt`)."""
    cancel_reason: str | None = None
    started: bool = False
    """Its task has started: a cancel now cancels the task, before then it stops the run as it starts."""
    launched_running: bool = False
    """The launch wrote the workflow ``running`` and its event already (:meth:`WorkflowRunner.adopt`)."""
    node_events: Any = None
    """The run's :class:`~agent_orchestrator.node_events.NodeEvents`: ``on_finished`` writes the
    ones not written yet with the run's outcome."""
    run_finished: bool = False
    """Set by ``on_finished`` when it wrote the run's finish (``RunStore.finish_along``) itself."""
    stuck: bool = False
    unstuck: bool = False  # progressed after being reported stuck: clear the mark at the next pass


class WorkflowRunner:
    """Claims and runs workflows on this replica, up to ``max_concurrent_workflows`` at once."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        execute: RunExecutor,
        on_finished: RunFinished,
        on_stuck: Callable[[RunRow], Any] | None = None,
        on_expired: Callable[[str], Awaitable[bool]] | None = None,
        load_records: RecordLoader | None = None,
        runner_id: str | None = None,
        workflow_types: list[str] | None = None,
    ) -> None:
        """``workflow_types``: the types this replica can run; it claims no run of another type
        (a replica without a plug-in leaves its runs to the replicas that have it). None: any."""
        self.settings = settings
        self.runner_id = runner_id or f"runner-{uuid.uuid4().hex[:12]}"
        self.store = RunStore(pool, runner_id=self.runner_id, lease_ttl_s=settings.run_lease_ttl_s)
        self._execute = execute
        self._on_finished = on_finished
        self._on_stuck_hook = on_stuck
        self._on_expired = on_expired
        self._load_records = load_records
        self._types = sorted(workflow_types) if workflow_types is not None else None
        self._local: dict[str, LocalRun] = {}
        self._reserved: set[str] = set()  # launches of this replica that it will run itself
        # Cancels of runs not (yet) here, by id, with when they came: a run claimed right after its
        # cancel was requested (its notice came while the claim was in flight) is stopped at start.
        self._cancels_ahead: dict[str, float] = {}
        self._session: LockSession | None = None  # holds the advisory locks of the runs here
        self._unlocks: list[str] = []  # ended runs whose advisory locks the next flush or take gives back
        self._unlocking: asyncio.Task[None] | None = None  # the flush of finished runs' locks, if due
        self._flushes: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        # Whether claimable runs may be waiting for room here: a finished run then wakes the claim
        # loop. Runs made claimable later NOTIFY (expired leases are found by the periodic poll).
        self._backlog = True
        self._stuck_types: set[str] = set()  # the workflow types with stuck runs at the last watchdog pass
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        assert self.settings.database_url is not None
        self._session = LockSession(
            self.settings.database_url,
            listeners={RUNS_CHANNEL: self._on_notify, CANCEL_CHANNEL: self._on_cancel_notify},
            on_lost=self._lock_session_lost,
            on_back=self._lock_session_back,
        )
        await self._session.open()
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="runner-claim"),
            asyncio.create_task(self._lease_loop(), name="runner-lease"),
            asyncio.create_task(self._watchdog_loop(), name="runner-watchdog"),
        ]
        _log.info("workflow runner %s started", self.runner_id)

    async def stop(self, *, grace_s: float = 5.0) -> None:
        """Stop claiming; hand running workflows back so another replica resumes them."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = [lr for lr in self._local.values() if lr.task is not None]
        for lr in running:  # a run whose task has not started yet hands itself back as it starts
            self.cancel_local(lr.run.workflow_id, reason="shutdown")
        if running:
            await asyncio.wait([lr.task for lr in running if lr.task], timeout=grace_s)
        for task in list(self._flushes):  # the session's end gives every lock back
            task.cancel()
        if self._session is not None:
            await self._session.close()

    def wake(self) -> None:
        self._wake.set()

    @property
    def running(self) -> list[str]:
        return list(self._local)

    # -- notifications ---------------------------------------------------------------------------
    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    def _on_cancel_notify(self, _conn: Any, _pid: int, _channel: str, workflow_id: str) -> None:
        self.cancel_local(workflow_id, reason="cancelled")

    def cancel_local(self, workflow_id: str, *, reason: str) -> bool:
        """Stop a run of this replica, for ``reason``; False when it does not run here. A cancel by
        request of a run not here is kept for a while, in case this replica is claiming it now.
        A run whose task has not started yet stops as it starts (a task cancelled before its
        first step would never record how it ended)."""
        lr = self._local.get(workflow_id)
        if lr is None:
            if reason == "cancelled":
                self._keep_cancel(workflow_id)
            return False
        lr.cancel_reason = reason
        if lr.started and lr.task is not None:
            lr.task.cancel()
        return True

    def _keep_cancel(self, workflow_id: str) -> None:
        now = time.monotonic()
        for old in [w for w, at in self._cancels_ahead.items() if now - at > _CANCEL_AHEAD_S]:
            del self._cancels_ahead[old]
        self._cancels_ahead[workflow_id] = now

    # -- claiming --------------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before looking: a wake-up while it looks brings another look
            try:
                await self._claim_available()
            except Exception as e:  # noqa: BLE001 - a failed pass is retried: the loop outlives any error
                _log.warning("claiming runs failed (%s); retrying", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=_POLL_S)

    async def _claim_available(self) -> None:
        free = self.settings.max_concurrent_workflows - len(self._local) - len(self._reserved)
        assert self._session is not None
        if not self._session.up:  # no locks to claim with: the session's return wakes the loop
            return
        if free <= 0:
            self._backlog = True
            return
        busy = self._local.keys() | self._reserved
        candidates = await self.store.candidates(limit=free, types=self._types)
        self._backlog = len(candidates) >= free  # there may be more than there was room for
        ids = [w for w in candidates if w not in busy]
        if not ids:
            return
        async with self._session.mutex:
            runs = await self.store.claim(self._session.conn(), ids, [advisory_key(w) for w in ids])
        records = await self._load_records(runs) if self._load_records is not None and runs else {}
        for run in runs:
            self._start(LocalRun(run=run, record=records.get(run.workflow_id)))

    def _start(self, lr: LocalRun) -> None:
        if self._cancels_ahead.pop(lr.run.workflow_id, None) is not None or lr.run.cancel_requested:
            lr.cancel_reason = "cancelled"  # requested while it was being claimed: it stops as it starts
        self._local[lr.run.workflow_id] = lr
        lr.task = asyncio.create_task(self._run(lr), name=f"workflow-{lr.run.workflow_id}")

    # -- runs launched here -------------------------------------------------------------------------
    def reserve(self, workflow_id: str) -> asyncio.Future[datetime | None] | None:
        """Make room for a workflow this replica is launching and start taking its advisory lock,
        so it runs here at once (no claim through the table). The lock is taken while the launch
        statement runs: no one else knows the new id, and the run row it writes is claimed with
        a fresh lease. None when there is no room; else when the lock was taken (the database's
        clock), None if it was not. Taken only after the lease ran out (this replica stalled that
        long), another replica may have claimed and even finished the run meanwhile: the caller
        must not run it then."""
        if self._stopping or len(self._local) + len(self._reserved) >= self.settings.max_concurrent_workflows:
            return None
        self._reserved.add(workflow_id)
        return asyncio.ensure_future(self._take(workflow_id))

    async def unreserve(self, workflow_id: str, *, locked: bool) -> None:
        """The launch did not give this replica a run to start: give the room (and the lock) back."""
        if workflow_id in self._reserved:
            self._reserved.discard(workflow_id)
            self._room_freed()
            if locked:
                await self._give_back(workflow_id)

    def adopt(self, run: RunRow, record: Any) -> None:
        """Run a reserved workflow whose launch wrote its run row already claimed and the workflow
        ``running``. A replica stopping meanwhile leaves it to its lease: once that runs out
        another replica claims it."""
        self._reserved.discard(run.workflow_id)
        if not self._stopping:
            self._start(LocalRun(run=run, record=record, launched_running=True))

    async def _take(self, workflow_id: str) -> datetime | None:
        """Take a workflow's advisory lock, giving back the locks of the runs ended meanwhile in
        the same statement; when it was taken, None if it was not."""
        assert self._session is not None
        async with self._session.mutex:
            conn = self._session.conn()
            ended, self._unlocks = self._unlocks, []
            try:
                row = await conn.fetchrow(_TAKE_SQL, advisory_key(workflow_id), [advisory_key(w) for w in ended])
            except BaseException:  # given back or not: the next flush gives them back (again)
                self._unlocks[:0] = ended
                raise
            return row["taken_at"] if row is not None else None

    async def _give_back(self, workflow_id: str) -> None:
        assert self._session is not None
        async with self._session.mutex:
            if self._session.up:  # else the session's end gave it back
                await self._session.conn().execute("SELECT pg_advisory_unlock($1)", advisory_key(workflow_id))

    def _lock_session_lost(self) -> None:
        """The lock session is gone, and our advisory locks with it: stop every local run. Each
        is left to its lease; once that runs out, a replica (this one, when its session is back)
        claims it and resumes it from its last checkpoint."""
        for workflow_id in list(self._local):
            self.cancel_local(workflow_id, reason="lost-lock")
        self._unlocks.clear()  # the session held them

    def _lock_session_back(self) -> None:
        """The lock session is back: hand back the runs it lost that could not be handed back
        then (PostgreSQL was down), so they are claimed again at once, with no loss counted."""
        task = asyncio.create_task(self._hand_back_lost(), name="runner-hand-back")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _hand_back_lost(self) -> None:
        with contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError):  # left to their leases
            await self.store.requeue_abandoned(exclude=[*self._local, *self._reserved])
        self.wake()

    # -- running ---------------------------------------------------------------------------------
    async def _run(self, lr: LocalRun) -> None:
        run = lr.run
        lr.started = True
        metrics.labels(metrics.WORKFLOWS_ACTIVE, run.workflow_type).inc()
        try:
            if lr.cancel_reason is not None:  # stopped before it started
                raise asyncio.CancelledError
            _check_losses(run, self.settings.max_run_losses)
            outcome: Outcome | BaseException = await self._execute(lr)
        except asyncio.CancelledError:
            # cancelled by nobody here: the process stops without stopping the runner (its event
            # loop torn down by a node's SystemExit, say): handed back as a loss, not cancelled by request
            lr.cancel_reason = lr.cancel_reason or ("shutdown" if self._stopping else "vanished")
            outcome = asyncio.CancelledError(lr.cancel_reason)
        except Exception as e:  # noqa: BLE001 - any failure of the graph fails the workflow, with its reason
            _log_failure(run.workflow_id, e)
            outcome = e
        finally:
            metrics.labels(metrics.WORKFLOWS_ACTIVE, run.workflow_type).dec()
        try:
            await asyncio.shield(self._settle(lr, outcome))
        except Exception as e:  # noqa: BLE001 - nothing recorded: the lease runs out and the run resumes
            _log.warning(
                "could not record how workflow %s ended (%s); it resumes from its last checkpoint once its "
                "lease runs out",
                run.workflow_id,
                e,
            )
        finally:
            self._local.pop(run.workflow_id, None)
            self._release(run.workflow_id, finished=lr.run_finished)
            self._room_freed()

    def _room_freed(self) -> None:
        """Look for claimable runs again, when some may have waited for room here."""
        if self._backlog:
            self._wake.set()

    def _release(self, workflow_id: str, *, finished: bool) -> None:
        """Give the run's advisory lock back. Releases that come while the lock session is busy
        go together in one statement; until then the run has ended, so holding it is harmless.
        A finished run's is never claimed again: it waits up to ``_UNLOCK_DELAY_S`` to go with
        the next launch's lock. One that may be claimed again (interrupted, handed back) goes now."""
        self._unlocks.append(workflow_id)
        if not finished:
            self._flush_unlocks_after(0.0)
        elif self._unlocking is None or self._unlocking.done():
            self._unlocking = self._flush_unlocks_after(_UNLOCK_DELAY_S)

    def _flush_unlocks_after(self, delay_s: float) -> asyncio.Task[None]:
        task = asyncio.create_task(self._flush_unlocks(delay_s), name="runner-unlock")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)
        return task

    async def _flush_unlocks(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        while self._unlocks:
            assert self._session is not None
            async with self._session.mutex:
                ids, self._unlocks = self._unlocks, []
                if not self._session.up:  # the session's end gave them back
                    return
                with contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
                    await self._session.conn().execute(
                        "SELECT pg_advisory_unlock(k) FROM unnest($1::int8[]) AS k", [advisory_key(w) for w in ids]
                    )

    async def _settle(self, lr: LocalRun, outcome: Outcome | BaseException) -> None:
        """Record how the run ended; a run handed back is requeued, not finished."""
        run = lr.run
        if isinstance(outcome, asyncio.CancelledError) and lr.cancel_reason in _HANDED_BACK:
            if lr.cancel_reason == "stuck" and run.attempts > _MAX_STUCK_RETRIES:
                await self._finish(
                    lr,
                    RuntimeError(f"no progress for {self.settings.stuck_after_s:g}s after {run.attempts} attempts"),
                )
                return
            # a lost lock session is the database's trouble, not the run's: no loss (if PostgreSQL
            # is down this fails, and the runs left are handed back when the session is)
            await self.store.requeue(run.workflow_id, lost=lr.cancel_reason == "vanished")
            _count_handback(run, lr.cancel_reason.replace("-", "_"))
            return
        if isinstance(outcome, Exception) and connection_lost(outcome) and run.handbacks < _MAX_HANDBACKS:
            _log.warning(
                "workflow %s lost a connection to a server (%s); handed back to resume from its last checkpoint",
                run.workflow_id,
                outcome,
            )
            await self.store.requeue(run.workflow_id, connection_lost=True)
            _count_handback(run, "connection_lost")
            return
        if isinstance(outcome, Outcome) and outcome.status == "interrupted":
            deadline = _wait_deadline(outcome.interrupt or {}, self.settings.approval_timeout_s)
            await self.store.park(run.workflow_id, interrupt=outcome.interrupt, deadline=deadline)
            await self._on_finished(lr, outcome)
            return
        await self._finish(lr, outcome)

    async def _finish(self, lr: LocalRun, outcome: Outcome | BaseException) -> None:
        # The workflow row first: if this replica dies in between, the run's lease runs out, another
        # replica claims it, finds the workflow finished and only finishes the run.
        await self._on_finished(lr, outcome)
        if not lr.run_finished:
            await self.store.finish(lr.run.workflow_id)
            lr.run_finished = True

    def progress(self, workflow_id: str) -> None:
        """Called by the executor after each node; the watchdog reads it (in memory, no write per node)."""
        lr = self._local.get(workflow_id)
        if lr is None:
            return
        lr.last_progress = time.monotonic()
        if lr.stuck:
            lr.stuck = False
            lr.unstuck = True

    # -- leases and watchdog ---------------------------------------------------------------------
    async def _lease_loop(self) -> None:
        period = max(self.settings.run_lease_ttl_s / 3, 0.2)
        while not self._stopping:
            await asyncio.sleep(period)
            if not self._local:
                continue
            try:
                held = await self.store.renew(list(self._local))
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
                _log.warning("renewing leases failed: %s", e)
                continue
            for workflow_id, cancel in held.items():
                if cancel:
                    self.cancel_local(workflow_id, reason="cancelled")

    async def _watchdog_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(min(1.0, self.settings.stuck_after_s / 4))
            try:
                await self._expire_waits()
                await self._check_stuck()
                pending, oldest_s = await self.store.waiting_summary()
                metrics.WORKFLOW_APPROVALS_PENDING.set(pending)
                metrics.WORKFLOW_APPROVAL_OLDEST_WAIT.set(oldest_s)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
                _log.warning("watchdog pass failed: %s", e)

    async def _expire_waits(self) -> None:
        """Answer the approvals past their deadline (``on_expired``; a runner without it answers none)."""
        if self._on_expired is None:
            return
        for workflow_id in await self.store.expired_waits():
            if await self._on_expired(workflow_id):
                _log.info("approval of workflow %s expired; resuming it as rejected", workflow_id)

    async def _check_stuck(self) -> None:
        now = time.monotonic()
        counts: dict[str, int] = {}
        for workflow_id, lr in list(self._local.items()):
            if lr.unstuck:
                lr.unstuck = False
                await self.store.progress(workflow_id)
            if now - lr.last_progress < self.settings.stuck_after_s:
                continue
            counts[lr.run.workflow_type] = counts.get(lr.run.workflow_type, 0) + 1
            if not lr.stuck:
                lr.stuck = True
                _log.warning(
                    "workflow %s made no progress for %.0fs; retrying it", workflow_id, self.settings.stuck_after_s
                )
                await self.store.mark_stuck(workflow_id)
                await self._on_stuck(lr)
        # every type counted now or at the last pass: a type whose stuck runs left (retried on
        # another replica, failed) goes back to 0 here
        for wtype in self._stuck_types | set(counts):
            metrics.WORKFLOWS_STUCK.labels(wtype).set(counts.get(wtype, 0))
        self._stuck_types = set(counts)

    async def _on_stuck(self, lr: LocalRun) -> None:
        if self._on_stuck_hook is not None:
            await self._on_stuck_hook(lr.run)
        self.cancel_local(lr.run.workflow_id, reason="stuck")


def _check_losses(run: RunRow, max_losses: int) -> None:
    """Refuse to run again a run that took its replica down ``max_losses`` times (RunLost)."""
    if run.losses >= max_losses:
        raise RunLost(
            f"its replica stopped while running it {run.losses} times (killed, out of memory, or a node "
            "that exits the process: see the replicas' logs); not run again"
        )


def _log_failure(workflow_id: str, exc: Exception) -> None:
    """A graph's failure: one line for one of ours (an agent's error answer, a timeout: its
    reason is the workflow's), the traceback for anything else (a defect to find)."""
    if isinstance(exc, OrchestratorError):
        _log.warning("workflow %s failed: %s: %s", workflow_id, type(exc).__name__, exc)
    else:
        _log.exception("workflow %s: its graph raised", workflow_id)


def _wait_deadline(interrupt: dict[str, Any], default_timeout_s: float) -> datetime:
    """When an unanswered interrupt expires: the ``expires_at`` its payload shows the person
    (so the two agree), else ``timeout_s`` (or the default) from now."""
    shown = interrupt.get("expires_at")
    with contextlib.suppress(ValueError):
        expires = datetime.fromisoformat(shown) if isinstance(shown, str) else None
        if expires is not None and expires.tzinfo is not None:
            return expires
    timeout_s = float(interrupt.get("timeout_s") or default_timeout_s)
    return datetime.now(UTC) + timedelta(seconds=timeout_s)
