"""Wake-ups by key: only the key's waiters are woken, and a finished wait leaves nothing behind."""

from __future__ import annotations

import pytest

from shared.lib.wakeups import Wakeups


async def test_wake_sets_only_the_keys_waiters() -> None:
    wakeups = Wakeups()
    with wakeups.waiting("a") as a1, wakeups.waiting("a") as a2, wakeups.waiting("b") as b:
        assert len(wakeups) == 2
        wakeups.wake("a")
        assert a1.is_set()
        assert a2.is_set()
        assert not b.is_set()
        wakeups.wake("nobody")  # no waiter: nothing happens
        wakeups.wake_all()
        assert b.is_set()
    assert len(wakeups) == 0


async def test_a_wait_that_raises_is_unregistered() -> None:
    wakeups = Wakeups()
    with pytest.raises(RuntimeError), wakeups.waiting("a"):
        raise RuntimeError("the waiter failed")
    assert len(wakeups) == 0
