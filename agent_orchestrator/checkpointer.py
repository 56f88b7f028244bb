"""The LangGraph checkpointer: ``AsyncPostgresSaver`` on a psycopg pool, tuned for
durability ``sync`` (the built-in workflows run at ``async``, where the same holds but
LangGraph does not wait for each checkpoint before the next node).

:class:`PooledPostgresSaver` is a drop-in ``AsyncPostgresSaver``: the same
tables, serialisation and results (``setup``, ``alist``, ``adelete_thread`` and
the rest are upstream's). Only the hot path reaches PostgreSQL differently:

- **No process-wide lock.** Upstream ``_cursor`` takes one ``asyncio.Lock``
  around every call, even on a pool (langgraph#7259), so one busy process runs
  all its checkpoint writes one at a time. On a pool each call checks out its
  own connection, so the lock buys nothing here.
- **One statement, one commit.** Upstream ``aput`` upserts the blobs with
  ``executemany`` and then the checkpoint, and ``aput_writes`` upserts one row
  per write. In autocommit every statement is its own transaction, and each
  commit waits for a WAL flush (an INSERT takes ~0.2 ms here, ~0.04 ms without
  the flush). Here ``aput`` is one statement, blobs and writes as CTEs reading
  one JSON parameter each, and so is ``aput_writes``: 3 commits for a one-node
  run instead of upstream's 5 (``agent-orchestrator bench checkpoint``).
- **Writes ride with the next checkpoint.** LangGraph submits a finished task's
  writes and, when the superstep ends, the next checkpoint, and at durability
  ``sync`` waits for that checkpoint. ``aput_writes`` waits a few event-loop
  turns (``merge_ticks``) for that ``aput`` and its rows go in the same
  statement; when none comes (an interrupt, an error, the last task) it sends
  them itself. Either way it returns only once its rows are committed.
- **Only what there is.** The statement is composed of just the parts with rows
  (an empty CTE still costs ~0.1 ms), and prepared after a few uses. Rows travel
  as JSON made by orjson: psycopg's ``Jsonb`` (stdlib encoder) and list adapters
  were most of the client time of a statement (pyinstrument).
- **Steps written with what the run writes anyway, at durability ``async``.** A
  caller that sets ``configurable[WRITE_BEHIND_KEY]`` (seconds; the orchestrator's is
  ``AO_CHECKPOINT_WRITE_BEHIND_MS``) lets checkpoints wait that long. It takes what is
  held with :meth:`PooledPostgresSaver.take_held`, as statements to go in one of its
  own (the orchestrator's node events and the run's outcome), or sends it with
  :meth:`PooledPostgresSaver.flush`; what is still held when its window runs out is
  written then. A finished three-step run then costs no statement of the saver's. A
  write that fails in the background is raised by the thread's next put, take or flush.
- **No thread hop.** Upstream (de)serialises in ``asyncio.to_thread``; for the
  small states of a step the hop costs more than the work, so it runs inline.
- **No read, and no commit before the first node, for a thread known to be new.**
  A run of a brand-new thread starts with ``aget_tuple`` of nothing, then writes the
  input checkpoint and step 0's (after ``__start__``), both made from the input
  alone. A caller that knows the thread is new and keeps its input (the
  orchestrator launching a workflow) can say so with
  ``configurable[NEW_THREAD_KEY] = True``: the read is skipped, and those
  checkpoints ride with the first node's statement (one commit for a one-node
  run). A crash before it loses only what the input makes again. A run that
  stops before any node ran leaves them held back: the caller sends them with
  :meth:`PooledPostgresSaver.flush`.

``AO_CHECKPOINT_SYNCHRONOUS_COMMIT=false`` also skips the WAL flush per commit (see
the setting for what that trades). The effect of each is measured by
``agent-orchestrator bench checkpoint``; docs/BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import re
import select
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.postgres import _ainternal
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.types import _DeltaSnapshot
from psycopg import AsyncConnection, AsyncPipeline
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from shared.lib.connections import Along
from shared.lib.errors import StartupError
from shared.lib.settings import Settings

__all__ = ["NEW_THREAD_KEY", "WRITE_BEHIND_KEY", "PooledPostgresSaver", "SaverStats", "open_checkpointer"]

#: How long a held-back opening checkpoint waits for its thread's next statement before it is
#: written on its own (its first node runs long, waiting on a lock say, or its run stopped).
_DEFERRED_MAX_S = 60.0
#: ``configurable`` key a caller sets when it knows the thread has no checkpoint yet.
NEW_THREAD_KEY = "thread_is_new"
#: ``configurable`` key (seconds) a caller sets, at durability ``async`` only, to let checkpoints
#: wait that long for a statement to ride with; when its run stops it takes what is still held
#: (``take_held``) or sends it (``flush``).
WRITE_BEHIND_KEY = "checkpoint_write_behind_s"

_WRITES_INSERT = """
    INSERT INTO checkpoint_writes
        (thread_id, checkpoint_ns, checkpoint_id, task_id, task_path, idx, channel, type, blob)
    SELECT %(thread_id)s, %(ns)s, w.checkpoint_id, w.task_id, w.task_path, w.idx, w.channel, w.type,
           decode(w.blob, 'base64')
    FROM jsonb_to_recordset(%({p}writes)s::jsonb)
        AS w(checkpoint_id text, task_id text, task_path text, idx int, channel text, type text, blob text)
    ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
"""
_WRITES_UPSERT = _WRITES_INSERT.format(p="u_") + (
    "    DO UPDATE SET channel = EXCLUDED.channel, type = EXCLUDED.type, blob = EXCLUDED.blob\n"
)
_WRITES_INSERT_ONLY = _WRITES_INSERT.format(p="i_") + "    DO NOTHING\n"
_BLOBS_INSERT = """
    INSERT INTO checkpoint_blobs (thread_id, checkpoint_ns, channel, version, type, blob)
    SELECT %(thread_id)s, %(ns)s, b.channel, b.version, b.type, decode(b.blob, 'base64')
    FROM jsonb_to_recordset(%(blobs)s::jsonb) AS b(channel text, version text, type text, blob text)
    ON CONFLICT (thread_id, checkpoint_ns, channel, version) DO NOTHING
"""
_CHECKPOINT_UPSERT = """
INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, checkpoint, metadata)
SELECT %(thread_id)s, %(ns)s, c.id, c.parent, c.checkpoint, c.metadata
FROM jsonb_to_recordset(%(checkpoints)s::jsonb) AS c(id text, parent text, checkpoint jsonb, metadata jsonb)
ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id)
DO UPDATE SET checkpoint = EXCLUDED.checkpoint, metadata = EXCLUDED.metadata
"""


def _parts(params: dict[str, Any]) -> list[str]:
    """The INSERTs ``params`` has rows for: task writes (upserted or inserted), blobs, checkpoints."""
    return [
        sql
        for sql, name in (
            (_WRITES_UPSERT, "u_writes"),
            (_WRITES_INSERT_ONLY, "i_writes"),
            (_BLOBS_INSERT, "blobs"),
            (_CHECKPOINT_UPSERT, "checkpoints"),
        )
        if params.get(name) is not None
    ]


@functools.cache
def _statement(*parts: str) -> str:
    """One statement writing what there is, the others as CTEs of the last. Only the parts with
    rows are included: an empty CTE still costs ~0.1 ms a statement (prepared, measured on
    PostgreSQL 18)."""
    *ctes, last = parts
    if not ctes:
        return last
    return "WITH " + ", ".join(f"part{i} AS ({sql})" for i, sql in enumerate(ctes)) + last


_WriteRow = tuple[str, str, str, int, str, str, bytes | None]
"""(checkpoint_id, task_id, task_path, idx, channel, type, blob)"""

_WRITE_KEYS = ("checkpoint_id", "task_id", "task_path", "idx", "channel", "type", "blob")


@dataclass
class SaverStats:
    """What the saver sent, for the benchmark's account of where a step's time goes."""

    statements: int = 0
    """Statements sent: each is one round trip and, for writes, one commit."""
    merged_write_batches: int = 0
    """``aput_writes`` calls whose rows rode in a statement another call sent."""


@dataclass(eq=False)
class _WriteBatch:
    """One ``aput_writes`` call's rows, waiting briefly to ride with the thread's next checkpoint."""

    upsert: bool
    rows: list[_WriteRow]
    done: asyncio.Future[None]
    taken: bool = False

    def keys(self) -> set[tuple[str, str, int]]:
        return {(r[0], r[1], r[3]) for r in self.rows}


def _split_channel_values(checkpoint: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint copy with primitive values inline, values stored as blobs), as upstream ``aput``."""
    copy: dict[str, Any] = dict(checkpoint)
    inline = copy["channel_values"] = dict(checkpoint["channel_values"])
    blob_values: dict[str, Any] = {}
    for k, v in checkpoint["channel_values"].items():
        if isinstance(v, _DeltaSnapshot):
            blob_values[k] = inline.pop(k)
            inline[k] = True
        elif not (v is None or isinstance(v, str | int | float | bool)):
            blob_values[k] = inline.pop(k)
    return copy, blob_values


def _json(value: Any) -> str:
    """JSON text for a ``::jsonb`` parameter: orjson (psycopg's ``Jsonb`` runs the stdlib encoder and
    its array adapter a regex per item, most of a statement's client time); the stdlib as a fallback."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(value)


def _b64(blob: bytes | None) -> str | None:
    return None if blob is None else base64.b64encode(blob).decode()


def _writes_params(batches: Sequence[_WriteBatch]) -> dict[str, str | None]:
    """The rows of the batches as two JSON arrays: ``u_writes`` (upserted) and ``i_writes`` (inserted)."""
    params: dict[str, str | None] = {}
    for prefix, upsert in (("u_", True), ("i_", False)):
        rows = [
            dict(zip(_WRITE_KEYS, (*row[:6], _b64(row[6])), strict=True))
            for b in batches
            if b.upsert is upsert
            for row in b.rows
        ]
        params[prefix + "writes"] = _json(rows) if rows else None
    return params


def _statement_for(params: dict[str, Any]) -> str:
    return _statement(*_parts(params))


_PARAM = re.compile(r"%\((\w+)\)s")


def _along(sql: str, params: dict[str, Any]) -> Along:
    """A part as a statement to go in an asyncpg statement: its ``%(name)s`` parameters numbered
    from the ``int`` given, each sent as text (every one is a string, or None)."""

    def statement(first: int) -> tuple[str, list[Any]]:
        names: list[str] = []

        def number(m: re.Match[str]) -> str:
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"(${first + names.index(m.group(1))}::text)"

        numbered = _PARAM.sub(number, sql)
        return numbered, [params[n] for n in names]

    return statement


@dataclass
class _CheckpointRows:
    """One checkpoint's row and its new blobs, as ``jsonb_to_recordset`` takes them."""

    checkpoint: dict[str, Any]
    blobs: list[dict[str, str | None]]


def _checkpoint_params(rows: Sequence[_CheckpointRows]) -> dict[str, str | None]:
    blobs = [blob for r in rows for blob in r.blobs]
    return {
        "checkpoints": _json([r.checkpoint for r in rows]) if rows else None,
        "blobs": _json(blobs) if blobs else None,
    }


def _blob_row(row: tuple[str, str, str, str, str, bytes | None]) -> dict[str, str | None]:
    """A ``_dump_blobs`` row (thread, ns, channel, version, type, blob) for ``jsonb_to_recordset``."""
    return {"channel": row[2], "version": row[3], "type": row[4], "blob": _b64(row[5])}


def _first_of_new_thread(configurable: dict[str, Any], metadata: CheckpointMetadata) -> bool:
    """The input checkpoint of a thread the caller said is new (``NEW_THREAD_KEY``)."""
    return (
        bool(configurable.get(NEW_THREAD_KEY))
        and not configurable.get("checkpoint_id")
        and (metadata.get("source") == "input")
    )


def _opening(metadata: CheckpointMetadata) -> bool:
    """A checkpoint taken before any node ran: the input's, or step 0 (after ``__start__``)."""
    step = metadata.get("step")
    return step is not None and step <= 0


@dataclass
class _Deferred:
    """What a thread holds back: checkpoints and the writes that came with them."""

    rows: list[_CheckpointRows] = field(default_factory=list)
    batches: list[_WriteBatch] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    """When it is written anyway: at the end of a write-behind window, or of ``_DEFERRED_MAX_S``."""


def _consume_exception(fut: asyncio.Future[None]) -> None:
    """Mark a batch's failure as seen: its waiter may be gone, and the error is raised to the sender."""
    if not fut.cancelled():
        fut.exception()


class PooledPostgresSaver(AsyncPostgresSaver):
    """``AsyncPostgresSaver`` whose calls run concurrently, one statement and one commit each.

    ``merge_ticks`` is how many event-loop turns an ``aput_writes`` waits for its
    thread's next ``aput`` to carry its rows before sending them itself (0: never).
    """

    def __init__(
        self,
        conn: _ainternal.Conn,
        pipe: AsyncPipeline | None = None,
        serde: SerializerProtocol | None = None,
        *,
        merge_ticks: int = 3,
    ) -> None:
        super().__init__(conn, pipe, serde)
        self.merge_ticks = merge_ticks
        self.stats = SaverStats()
        self._waiting: dict[tuple[str, str], list[_WriteBatch]] = {}
        self._puts: dict[tuple[str, str], set[asyncio.Future[None]]] = {}
        # checkpoints (and their writes) held back: a new thread's opening ones, a write-behind window's
        self._deferred: dict[tuple[str, str], _Deferred] = {}
        # held rows being written when their window ran out, and such writes that failed
        self._writing: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._failed: dict[tuple[str, str], Exception] = {}

    @contextlib.asynccontextmanager
    async def _cursor(self, *, pipeline: bool = False) -> AsyncIterator[Any]:
        if not isinstance(self.conn, AsyncConnectionPool):
            async with super()._cursor(pipeline=pipeline) as cur:
                yield cur
            return
        async with _live_connection(self.conn) as conn:
            if pipeline and self.supports_pipeline:
                async with conn.pipeline(), conn.cursor(binary=True, row_factory=dict_row) as cur:
                    yield cur
            elif pipeline:
                async with conn.transaction(), conn.cursor(binary=True, row_factory=dict_row) as cur:
                    yield cur
            else:
                async with conn.cursor(binary=True, row_factory=dict_row) as cur:
                    yield cur

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        configurable = config["configurable"]
        if configurable.get(NEW_THREAD_KEY) and not configurable.get("checkpoint_id"):
            return None
        return await super().aget_tuple(config)

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        configurable = config["configurable"]
        key = (configurable["thread_id"], configurable["checkpoint_ns"])
        rows = self._rows(config, checkpoint, metadata, new_versions)
        saved: RunnableConfig = {
            "configurable": {"thread_id": key[0], "checkpoint_ns": key[1], "checkpoint_id": checkpoint["id"]}
        }
        if (failed := self._failed.get(key)) is not None:
            raise failed  # until the run stops: no checkpoint goes in over one that was lost
        if _first_of_new_thread(configurable, metadata) or (key in self._deferred and _opening(metadata)):
            self._defer(key, rows)
            return saved
        if window_s := configurable.get(WRITE_BEHIND_KEY):
            self._defer(key, rows, write_within_s=float(window_s))
            return saved
        if (writing := self._writing.get(key)) is not None:  # held rows on their way: this one goes after
            await asyncio.wait([writing])
            if (failed := self._failed.get(key)) is not None:
                raise failed
        batches = self._take(key)
        self.stats.merged_write_batches += len(batches)
        params = self._statement_params(key, rows, batches)
        in_flight: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._puts.setdefault(key, set()).add(in_flight)
        try:
            await self._execute(_statement_for(params), params, batches)
        finally:
            in_flight.set_result(None)
            puts = self._puts[key]
            puts.discard(in_flight)
            if not puts:
                del self._puts[key]
        return saved

    def _rows(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> _CheckpointRows:
        configurable = config["configurable"]
        copy, blob_values = _split_channel_values(checkpoint)
        blob_rows = self._dump_blobs(
            configurable["thread_id"],
            configurable["checkpoint_ns"],
            blob_values,
            {k: v for k, v in new_versions.items() if k in blob_values},
        )
        row = {
            "id": checkpoint["id"],
            "parent": configurable.get("checkpoint_id"),
            "checkpoint": copy,
            "metadata": get_serializable_checkpoint_metadata(config, metadata),
        }
        return _CheckpointRows(row, [_blob_row(b) for b in blob_rows])

    def _statement_params(
        self, key: tuple[str, str], rows: _CheckpointRows | None, batches: list[_WriteBatch]
    ) -> dict[str, str | None]:
        """The parameters of the thread's next statement: what was held back for it (if anything)
        first, then ``rows`` and the write ``batches``."""
        held = self._deferred.pop(key, None)
        if held is not None:
            batches[:0] = held.batches
            if held.timer is not None:
                held.timer.cancel()
        checkpoints = [*(held.rows if held else ()), *([rows] if rows is not None else [])]
        return {"thread_id": key[0], "ns": key[1], **_checkpoint_params(checkpoints), **_writes_params(batches)}

    def _defer(self, key: tuple[str, str], rows: _CheckpointRows, *, write_within_s: float | None = None) -> None:
        """Hold a checkpoint back, with the writes waiting for it, to ride with the thread's
        next statement.

        - A new thread's opening checkpoints, until the first node's statement. Until a node
          has run, all of it follows from the input, which the caller keeps (the orchestrator
          stores it with the workflow); a crash loses nothing the run cannot make again.
        - At durability ``async``, with a write-behind window (``WRITE_BEHIND_KEY``): the
          held rows are written ``write_within_s`` after the first of them, with whatever
          came meanwhile; a crash may lose that window's steps, which run again.

        The caller sends what a run leaves held back with :meth:`flush`. Opening checkpoints
        still held after ``_DEFERRED_MAX_S`` are written on their own: their first node runs long
        (waiting on a lock), or their run stopped and was never flushed; never dropped, since
        the run goes on from them."""
        held = self._deferred.setdefault(key, _Deferred())
        held.rows.append(rows)
        for batch in self._take(key):
            held.batches.append(batch)
            batch.done.set_result(None)
        loop = asyncio.get_running_loop()
        due = loop.time() + (_DEFERRED_MAX_S if write_within_s is None else write_within_s)
        if held.timer is None or due < held.timer.when():  # the earliest deadline of what it holds
            if held.timer is not None:
                held.timer.cancel()
            held.timer = loop.call_at(due, self._write_held_soon, key)

    def _write_held_soon(self, key: tuple[str, str]) -> None:
        """A write-behind window ran out: write the thread's held rows (after its write before)."""
        if (held := self._deferred.get(key)) is not None:
            held.timer = None
        previous = self._writing.get(key)
        task = asyncio.get_running_loop().create_task(self._write_held(key, after=previous))
        self._writing[key] = task
        task.add_done_callback(lambda t: self._writing.pop(key) if self._writing.get(key) is t else None)

    async def _write_held(self, key: tuple[str, str], *, after: asyncio.Task[None] | None = None) -> None:
        """Write what is held for ``key``. A failure is raised by each of the thread's next puts and
        writes, and by its take or flush, which end it; what is held then, and held later, is
        dropped: a checkpoint stored without its lost parents (and their blobs) breaks the chain a
        resume reads (a PostgreSQL restart left a run whose newest checkpoint had no ``input``)."""
        if after is not None:
            await asyncio.wait([after])
        if key not in self._deferred or key in self._failed:
            return
        params = self._statement_params(key, None, [])
        try:
            await self._execute(_statement_for(params), params, [])
        except Exception as e:  # noqa: BLE001 - the run hears of it at its next put, write or flush
            self._failed[key] = e
            self._drop_held(key)

    def _drop_held(self, key: tuple[str, str]) -> None:
        held = self._deferred.pop(key, None)
        if held is not None and held.timer is not None:
            held.timer.cancel()

    async def flush(self, thread_id: str) -> None:
        """Write what is held back for ``thread_id`` (every namespace), if anything, once the
        writes of its windows that ran out are done; raise the first of theirs that failed."""
        for params in await self._held(thread_id):
            await self._execute(_statement_for(params), params, [])

    async def take_held(self, thread_id: str) -> list[Along]:
        """What is held back for ``thread_id``, as statements to go in the caller's (asyncpg)
        statement: stored in its commit, with what it writes (the orchestrator's: the run's
        outcome). As :meth:`flush`, once the writes of its windows that ran out are done."""
        return [_along(sql, params) for params in await self._held(thread_id) for sql in _parts(params)]

    async def _held(self, thread_id: str) -> list[dict[str, Any]]:
        """Take what is held for ``thread_id``, one statement's parameters per namespace, after the
        writes of its windows that ran out; raise the first of those that failed."""
        if writing := [task for key, task in self._writing.items() if key[0] == thread_id]:
            await asyncio.wait(writing)
        if failed := [k for k in self._failed if k[0] == thread_id]:  # the run stops here: forget it
            errors = [self._failed.pop(key) for key in failed]
            for key in [k for k in self._deferred if k[0] == thread_id]:
                self._drop_held(key)
            raise errors[0]
        return [self._statement_params(key, None, []) for key in [k for k in self._deferred if k[0] == thread_id]]

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        if not writes:
            return
        configurable = config["configurable"]
        key = (configurable["thread_id"], configurable["checkpoint_ns"])
        if (failed := self._failed.get(key)) is not None:
            raise failed
        batch = self._batch(configurable, writes, task_id, task_path)
        self._waiting.setdefault(key, []).append(batch)
        try:
            await self._wait_for_carrier(key, batch)
            if batch.taken:
                await batch.done
                return
        finally:
            if not batch.taken:
                self._forget(key, batch)
        # No checkpoint came: send these rows, with any other batch of the thread still waiting.
        self._waiting.setdefault(key, []).insert(0, batch)
        batches = self._take(key)
        self.stats.merged_write_batches += len(batches) - 1
        params = self._statement_params(key, None, batches)
        await self._execute(_statement_for(params), params, batches)

    def _forget(self, key: tuple[str, str], batch: _WriteBatch) -> None:
        waiting = self._waiting.get(key, [])
        if batch in waiting:
            waiting.remove(batch)
        if not waiting:
            self._waiting.pop(key, None)

    async def _wait_for_carrier(self, key: tuple[str, str], batch: _WriteBatch) -> None:
        """Wait for the thread's next ``aput`` to take ``batch``: while one of its checkpoints
        is being written (the next cannot start before it ends), then ``merge_ticks`` turns."""
        turns = 0
        while not batch.taken and turns < self.merge_ticks:
            if puts := self._puts.get(key):
                await asyncio.wait(list(puts))
                turns = 0
            else:
                await asyncio.sleep(0)
                turns += 1

    def _batch(
        self, configurable: dict[str, Any], writes: Sequence[tuple[str, Any]], task_id: str, task_path: str
    ) -> _WriteBatch:
        upsert = all(w[0] in WRITES_IDX_MAP for w in writes)
        dumped = self._dump_writes(
            configurable["thread_id"],
            configurable["checkpoint_ns"],
            configurable["checkpoint_id"],
            task_id,
            task_path,
            writes,
        )
        rows: list[_WriteRow] = [(r[2], r[3], r[4], r[5], r[6], r[7], r[8]) for r in dumped]
        if upsert:
            # One statement may not update a row twice; upstream's row-by-row upserts keep the last.
            rows = list({row[3]: row for row in rows}.values())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_consume_exception)
        return _WriteBatch(upsert=upsert, rows=rows, done=done)

    def _take(self, key: tuple[str, str]) -> list[_WriteBatch]:
        """The thread's waiting batches that can share one statement: none writes a row another writes."""
        waiting = self._waiting.pop(key, [])
        taken: list[_WriteBatch] = []
        seen: set[tuple[str, str, int]] = set()
        for batch in waiting:
            if batch.keys() & seen:
                break  # keep the order of writes: this batch and later ones go in a later statement
            seen |= batch.keys()
            batch.taken = True
            taken.append(batch)
        if rest := waiting[len(taken) :]:
            self._waiting[key] = rest
        return taken

    async def _execute(self, sql: str, params: dict[str, Any], batches: Sequence[_WriteBatch]) -> None:
        """Run one statement and settle the write batches it carried with its outcome."""
        self.stats.statements += 1
        try:
            async with self._cursor() as cur:
                await cur.execute(sql, params)
        except BaseException as e:
            for b in batches:
                if b.done.done():
                    continue
                if isinstance(e, Exception):
                    b.done.set_exception(e)
                else:  # cancelled (or the process is exiting): whether the rows landed is unknown
                    b.done.cancel()
            raise
        for b in batches:
            if not b.done.done():
                b.done.set_result(None)

    async def _load_checkpoint_tuple(self, value: DictRow) -> CheckpointTuple:
        checkpoint = value["checkpoint"]
        thread_id, ns = value["thread_id"], value["checkpoint_ns"]
        parent = value["parent_checkpoint_id"]
        channel_values = {**(checkpoint.get("channel_values") or {}), **self._load_blobs(value["channel_values"])}
        parent_config: RunnableConfig | None = None
        if parent:
            parent_config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": parent}}
        return CheckpointTuple(
            {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": value["checkpoint_id"]}},
            cast(Checkpoint, {**checkpoint, "channel_values": channel_values}),
            value["metadata"],
            parent_config,
            self._load_writes(value["pending_writes"]),
        )


def _looks_dead(conn: AsyncConnection[DictRow]) -> bool:
    """Whether an idle pooled connection may be dead: closed, broken, or with something to read
    (a server that went away left its farewell, or EOF, on the socket). One ``select`` with no
    wait (~1 µs), where the pool's own check (``check_connection``) is a round trip per checkout."""
    if conn.closed or conn.broken:
        return True
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError):  # no socket left
        return True
    return bool(readable)


async def _confirmed_dead(conn: AsyncConnection[DictRow]) -> bool:
    """A connection that looks dead, checked with a round trip; closed if it is (the pool then
    discards it when it comes back)."""
    try:
        await conn.execute("")
        return False
    except Exception:  # noqa: BLE001 - whatever it says, it cannot serve
        await conn.close()
        return True


@contextlib.asynccontextmanager
async def _live_connection(pool: AsyncConnectionPool[Any]) -> AsyncIterator[AsyncConnection[DictRow]]:
    """A connection of ``pool`` that is not known to be dead. After a PostgreSQL restart every idle
    connection of the pool is dead, and psycopg finds out only when one is used: each cost a run
    an attempt (runs failed with ``AdminShutdown`` after PostgreSQL was back and ``/ready`` said
    so), and reads answered 503. A dead one is dropped and another taken; the first found also
    has the pool check the idle rest in the background (``AsyncConnectionPool.check``)."""
    for _ in range(pool.max_size + 1):
        async with pool.connection() as conn:
            if not (_looks_dead(conn) and await _confirmed_dead(conn)):
                yield conn
                return
        _sweep(pool)
    async with pool.connection() as conn:  # every one was dead: let this one raise what it raises
        yield conn


#: The background check of each pool (by id) while one runs.
_sweeps: dict[int, asyncio.Task[None]] = {}


def _sweep(pool: AsyncConnectionPool[Any]) -> None:
    """Check ``pool``'s idle connections in the background, one check at a time."""
    if id(pool) in _sweeps:
        return
    task = asyncio.get_running_loop().create_task(pool.check(), name="checkpointer-pool-check")
    _sweeps[id(pool)] = task
    task.add_done_callback(lambda t: (_sweeps.pop(id(pool), None), t.cancelled() or t.exception()))


def _conn_kwargs(settings: Settings) -> dict[str, Any]:
    # autocommit + dict_row are what the saver expects; prepare_threshold=None is
    # the pgbouncer-safe choice (AO_PG_PREPARE_THRESHOLD= empty).
    return {"autocommit": True, "row_factory": dict_row, "prepare_threshold": settings.pg_prepare_threshold}


async def _async_commit(conn: AsyncConnection[DictRow]) -> None:
    await conn.execute("SET synchronous_commit = off")


#: How long a replica waits for another one to finish setting the checkpoint tables up.
_SETUP_WAIT_S = 120.0


async def _setup_once(url: str, settings: Settings) -> None:
    # setup() runs CREATE INDEX CONCURRENTLY, which refuses a transaction: use a
    # plain autocommit connection, serialised across processes by an advisory lock.
    # Waiting must not sit inside a statement: CREATE INDEX CONCURRENTLY in the holder waits for
    # every open transaction, so a blocked pg_advisory_lock() here would deadlock with it.
    async with await AsyncConnection[DictRow].connect(url, **_conn_kwargs(settings)) as conn:
        deadline = time.monotonic() + _SETUP_WAIT_S
        while not (await (await conn.execute("SELECT pg_try_advisory_lock(7364921) AS ok")).fetchone() or {}).get("ok"):
            if time.monotonic() > deadline:
                raise StartupError(f"checkpointer set-up waited {_SETUP_WAIT_S:.0f}s for another process's")
            await asyncio.sleep(0.1)
        try:
            await AsyncPostgresSaver(conn).setup()
        finally:
            await conn.execute("SELECT pg_advisory_unlock(7364921)")


@contextlib.asynccontextmanager
async def open_checkpointer(settings: Settings, *, max_size: int = 10) -> AsyncIterator[PooledPostgresSaver]:
    """A set-up saver on its own psycopg pool, closed on exit."""
    assert settings.database_url is not None
    await _setup_once(settings.database_url, settings)
    pool = AsyncConnectionPool(
        settings.database_url,
        connection_class=AsyncConnection[DictRow],
        min_size=1,
        max_size=max_size,
        open=False,
        kwargs=_conn_kwargs(settings),
        configure=None if settings.checkpoint_synchronous_commit else _async_commit,
    )
    await pool.open(wait=True, timeout=10)
    try:
        yield PooledPostgresSaver(pool)
    finally:
        await pool.close()
