"""Running a subprocess without blocking the loop, bounded in time and output.

Every command the agents run (git, ruff, a repository's test command) goes
through :func:`run_process`, so each one has a timeout, its whole process group
is killed when the timeout fires or the caller is cancelled (a cancelled request:
the test command must not outlive it), and its output is captured up to a bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.lib.errors import Timeout

__all__ = ["ProcessResult", "run_process"]

#: Output kept per stream; a runaway test log must not fill the agent's memory.
_MAX_OUTPUT_BYTES = 4 * 1024 * 1024
#: How long to wait for the pipes to close once the group is killed.
_DRAIN_AFTER_KILL_S = 5.0


@dataclass(frozen=True)
class ProcessResult:
    """What a finished command left behind."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _read_bounded(stream: asyncio.StreamReader | None, *, tail: bool = False) -> bytes:
    """What ``stream`` gives, up to the bound: its first bytes, or with ``tail`` its last (a log,
    whose end says how it went)."""
    if stream is None:
        return b""
    chunks: collections.deque[bytes] = collections.deque()
    kept = 0
    while chunk := await stream.read(65536):
        if tail:
            chunks.append(chunk)
            kept += len(chunk)
            while kept - len(chunks[0]) >= _MAX_OUTPUT_BYTES:
                kept -= len(chunks.popleft())
        elif kept < _MAX_OUTPUT_BYTES:
            chunks.append(chunk[: _MAX_OUTPUT_BYTES - kept])
            kept += len(chunks[-1])
    return b"".join(chunks)[-_MAX_OUTPUT_BYTES:]


async def run_process(
    args: Sequence[str],
    *,
    cwd: Path | str | None = None,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    stdin_bytes: bytes | None = None,
    raise_on_timeout: bool = True,
    merge_stderr: bool = False,
) -> ProcessResult:
    """Run ``args`` in its own process group; kill the whole group after ``timeout_s``.

    With ``raise_on_timeout`` a timeout raises :class:`Timeout`; without it the
    result comes back with ``timed_out`` set and whatever output was produced.
    With ``merge_stderr`` both streams go to one pipe, so ``stdout`` holds the output in the
    order the command wrote it (a log: of a long one, the end is kept), and ``stderr`` is empty.
    """
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=str(cwd) if cwd is not None else None,
        env=dict(env) if env is not None else None,
        stdin=asyncio.subprocess.PIPE if stdin_bytes is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    readers = asyncio.gather(
        _read_bounded(proc.stdout, tail=merge_stderr), _read_bounded(proc.stderr), _feed(proc, stdin_bytes)
    )
    timed_out = False
    try:
        async with asyncio.timeout(timeout_s):
            out, err, _ = await asyncio.shield(readers)
            await proc.wait()
    except TimeoutError:
        timed_out = True
        _kill_group(proc)
        out, err = await _drain_after_kill(proc, readers)
    except BaseException:  # cancelled (the request was, or the agent stops): the group must not outlive it
        _kill_group(proc)
        _abandon(readers)
        raise
    result = ProcessResult(tuple(args), proc.returncode or 0, _decode(out), _decode(err), timed_out)
    if timed_out and raise_on_timeout:
        raise Timeout(f"{args[0]} did not finish within {timeout_s} s; raise its timeout or look at why it hangs")
    return result


async def _drain_after_kill(
    proc: asyncio.subprocess.Process, readers: asyncio.Future[tuple[bytes, bytes, None]]
) -> tuple[bytes, bytes]:
    """Collect what the killed group wrote; a grandchild that escaped the group may hold a pipe open."""
    try:
        async with asyncio.timeout(_DRAIN_AFTER_KILL_S):
            out, err, _ = await readers
            await proc.wait()
    except TimeoutError:
        _abandon(readers)
        return b"", b""
    return out, err


def _abandon(readers: asyncio.Future[tuple[bytes, bytes, None]]) -> None:
    """Cancel ``readers`` and take their outcome when it comes: a cancelled gather ends with
    CancelledError set as its exception, which asyncio logs at ERROR as "never retrieved" when
    nobody reads it (and nobody awaits it here: the shield around it was cancelled instead)."""
    readers.cancel()
    readers.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[tuple[bytes, bytes, None]]) -> None:
    if not future.cancelled():
        future.exception()


async def _feed(proc: asyncio.subprocess.Process, data: bytes | None) -> None:
    if data is None or proc.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
    proc.stdin.close()


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
