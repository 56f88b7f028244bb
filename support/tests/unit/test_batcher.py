"""Batcher: items submitted in one loop iteration share a flush; an ordered one flushes a batch
only after the one before, and the items submitted meanwhile join the waiting batch."""

from __future__ import annotations

import asyncio

import pytest

from shared.lib._bus_batch import Batcher


async def test_items_of_one_iteration_share_a_flush() -> None:
    flushes: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushes.append(items)
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(flush)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(3))) == [0, 10, 20]
    assert flushes == [[0, 1, 2]]


async def test_ordered_batches_reach_the_server_in_order() -> None:
    arrived: list[list[int]] = []

    async def flush(items: list[int]) -> list[None]:
        if items[0] == 0:
            await asyncio.sleep(0.05)  # the first batch is slow: the later ones must not overtake it
        arrived.append(items)
        return [None] * len(items)

    batcher: Batcher[int, None] = Batcher(flush, ordered=True)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.01)  # flushing
    later = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    more = asyncio.ensure_future(batcher.submit(3))
    await asyncio.gather(first, *later, more)
    assert arrived == [[0], [1, 2, 3]]


async def test_a_batch_cancelled_while_waiting_fails_its_items() -> None:
    gate = asyncio.Event()

    async def flush(items: list[int]) -> list[None]:
        await gate.wait()
        return [None] * len(items)

    batcher: Batcher[int, None] = Batcher(flush, ordered=True)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.01)
    for task in list(batcher._running):
        task.cancel()
    with pytest.raises(ConnectionError):
        await second
    with pytest.raises(ConnectionError):
        await first
