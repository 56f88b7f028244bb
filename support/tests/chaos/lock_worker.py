"""A separate process that takes resource locks, for the chaos tests.

``torture RESOURCE COUNTER_FILE MARKER_FILE N``: N times, acquire the lock, then
inside the critical section create MARKER_FILE exclusively (a second holder
would find it there), read-increment-write COUNTER_FILE (with the last token,
which must rise), remove the marker, release. Prints a JSON summary.

``hold RESOURCE TTL_S HOLD_S``: acquire, print ``locked <token>``, sleep HOLD_S
without renewing, then release and print ``released`` or ``lost``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import orjson

from shared.lib.connections import create_pg_pool
from shared.lib.errors import LockLost
from shared.lib.resource_lock import ResourceLockManager
from shared.lib.settings import load_settings


def _critical_section(counter: Path, marker: Path, token: int) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        print(f"OVERLAP: another holder is inside the critical section (token {token})", flush=True)
        sys.exit(3)
    try:
        count, last_token = (int(x) for x in counter.read_text().split())
        if token <= last_token:
            print(f"TOKEN WENT BACK: {token} after {last_token}", flush=True)
            sys.exit(4)
        counter.write_text(f"{count + 1} {token}")
    finally:
        os.close(fd)
        os.unlink(marker)


async def torture(locks: ResourceLockManager, resource: str, counter: Path, marker: Path, n: int) -> None:
    owner = f"worker-{os.getpid()}"
    started = time.monotonic()
    for _ in range(n):
        async with locks.acquire(resource, owner=owner, ttl_s=30, wait_s=60) as lease:
            _critical_section(counter, marker, lease.token)
    print(orjson.dumps({"pid": os.getpid(), "n": n, "elapsed_s": time.monotonic() - started}).decode(), flush=True)


async def hold(locks: ResourceLockManager, resource: str, ttl_s: float, hold_s: float) -> None:
    lease = await locks.acquire_lease(resource, owner=f"holder-{os.getpid()}", ttl_s=ttl_s)
    print(f"locked {lease.token}", flush=True)
    await asyncio.sleep(hold_s)
    try:
        await lease.release()
        print("released", flush=True)
    except LockLost:
        print("lost", flush=True)


async def main(argv: list[str]) -> None:
    settings = load_settings(dev_mode=True)
    assert settings.database_url, "DATABASE_URL must be set"
    pool = await create_pg_pool(settings.database_url, min_size=1, max_size=2)
    try:
        async with ResourceLockManager(pool, settings) as locks:
            if argv[0] == "torture":
                await torture(locks, argv[1], Path(argv[2]), Path(argv[3]), int(argv[4]))
            else:
                await hold(locks, argv[1], float(argv[2]), float(argv[3]))
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
