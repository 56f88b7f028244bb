"""The per-environment deploy lock (an flock): a holder cancelled while its work still waits
for a thread gives the lock back once the work ran, instead of holding it for good."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agents.work.file_lock import run_locked
from shared.lib.errors import LockContended


async def test_a_holder_cancelled_before_its_thread_ran_still_releases(tmp_path: Path) -> None:
    lock = tmp_path / ".deploy.lock"
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(pool)
    busy = threading.Event()
    loop.run_in_executor(None, busy.wait, 10)  # the only thread is taken: A's work waits in the queue
    ran: list[str] = []
    first = asyncio.create_task(run_locked(lock, lambda: ran.append("A"), wait_s=1, holder="A", resource="env"))
    await asyncio.sleep(0.1)  # A holds the lock, its work queued
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(LockContended, match="held by A"):  # still held: A's work has not run yet
        await run_locked(lock, lambda: None, wait_s=0.1, holder="B", resource="env")
    busy.set()
    assert await run_locked(lock, lambda: "B ran", wait_s=5, holder="B", resource="env") == "B ran"
    assert ran == ["A"]  # A's work ran under the lock, then gave it back
    pool.shutdown(wait=True)
