"""InOrder: background steps run one after another in the order added; a failure stops the rest."""

from __future__ import annotations

import asyncio

import pytest

from shared.lib.tasks import InOrder


async def test_steps_run_in_order_while_the_caller_goes_on() -> None:
    done: list[int] = []

    async def step(i: int, delay: float) -> None:
        await asyncio.sleep(delay)
        done.append(i)

    steps = InOrder()
    for i, delay in enumerate([0.03, 0.0, 0.01]):
        steps.add(step(i, delay))
    assert done == []  # nothing waited for yet: the caller went on
    await steps.drain()
    assert done == [0, 1, 2]  # the slow first one still came first


async def test_a_failure_stops_the_later_steps_and_is_raised_at_the_next_add_and_at_drain() -> None:
    ran: list[str] = []

    async def fail() -> None:
        ran.append("fail")
        raise RuntimeError("refused")

    async def later() -> None:
        ran.append("later")

    steps = InOrder()
    steps.add(fail())
    steps.add(later())
    with pytest.raises(RuntimeError, match="refused"):
        await steps.drain()
    assert ran == ["fail"]
    with pytest.raises(RuntimeError, match="refused"):
        steps.add(later())
    assert ran == ["fail"]
