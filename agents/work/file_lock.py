"""A lock file held with ``flock`` around work that runs in a thread.

Deploys and rollbacks of one environment directory must never interleave, whether
they come to one agent at once or to two agents on the same machine. The lock is an
exclusive ``flock`` on a file: it excludes other threads (each call opens its own
file description) and other processes, and the kernel drops it when its holder dies.

The lock is taken from the event loop, polling ``LOCK_NB`` with an ``asyncio.sleep``
in between, so a caller waiting for it holds no worker thread (a blocking ``flock`` in
``asyncio.to_thread`` pinned one per waiter, and twenty waiting deploys starved every
other ``to_thread`` of the agent) and a cancelled waiter just stops waiting. Once
taken, the lock belongs to the thread running the work, which releases it when the
work ends: if the caller is cancelled meanwhile (its deadline passed), the work still
finishes under the lock rather than leave the directory half-changed to the next holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from shared.lib.errors import LockContended

__all__ = ["run_locked"]

T = TypeVar("T")

#: Between two attempts at a held lock; a deploy takes tens of milliseconds at least.
_POLL_S = 0.02


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 512, 0).decode("utf-8", errors="replace").strip() or "unknown"
    return "unknown"


def _note_holder(fd: int, holder: str) -> None:
    """Write who holds the lock into the lock file, so a contended caller can name it."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder} (pid {os.getpid()})\n".encode(), 0)


async def _acquire(path: Path, *, wait_s: float, holder: str, resource: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        give_up = time.monotonic() + wait_s
        while not _try_lock(fd):
            if time.monotonic() >= give_up:
                raise LockContended(
                    f"{resource} is held by {_holder(fd)} and stayed so for {wait_s:.1f} s; retry once it is done",
                    resource=resource,
                    details={"holder": _holder(fd)},
                )
            await asyncio.sleep(_POLL_S)
        _note_holder(fd, holder)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _run_then_release(fd: int, work: Callable[[], T]) -> T:
    try:
        return work()
    finally:
        os.close(fd)  # closing the file description releases the flock


async def run_locked(path: Path, work: Callable[[], T], *, wait_s: float, holder: str, resource: str) -> T:
    """Run ``work`` in a thread while holding the ``flock`` of ``path`` (created if missing).

    Waits at most ``wait_s`` for another holder, then raises :class:`LockContended` naming
    it (``holder`` is what this call writes into the file for others to see)."""
    fd = await _acquire(path, wait_s=wait_s, holder=holder, resource=resource)
    try:
        future = asyncio.get_running_loop().run_in_executor(None, _run_then_release, fd, work)
    except BaseException:
        os.close(fd)
        raise
    # Shielded: a caller cancelled while the job still waits for a thread must not cancel the
    # job, which alone closes the file (the lock would be held until the process exits).
    return await asyncio.shield(future)
