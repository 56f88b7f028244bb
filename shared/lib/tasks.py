"""Background tasks: stopping one the same way everywhere, and writes kept in order while the
caller goes on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

__all__ = ["InOrder", "cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has finished unwinding (a no-op for None or a done task)."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _discard(step: Awaitable[Any]) -> None:
    """A step that will never run: closed, so it warns of nothing."""
    if asyncio.iscoroutine(step):
        step.close()


class InOrder:
    """Awaitables run one after another in the background, in the order they were added, while
    the caller goes on. The first failure stops the ones after it; :meth:`check` raises it at
    the caller's next step and :meth:`drain` at the end."""

    def __init__(self) -> None:
        self._last: asyncio.Task[None] | None = None

    def add(self, step: Awaitable[Any]) -> None:
        try:
            self.check()
        except BaseException:
            _discard(step)
            raise
        self._last = asyncio.create_task(self._after(self._last, step))

    @staticmethod
    async def _after(previous: asyncio.Task[None] | None, step: Awaitable[Any]) -> None:
        if previous is not None:
            try:
                await previous
            except BaseException:
                _discard(step)
                raise
        await step

    def check(self) -> None:
        """Raise the failure of a finished step, if any."""
        last = self._last
        if last is not None and last.done() and not last.cancelled():
            error = last.exception()
            if error is not None:
                raise error

    async def drain(self) -> None:
        """Wait for every step added; raises the first failure."""
        if self._last is not None:
            await asyncio.shield(self._last)

    async def cancel(self) -> None:
        await cancel_and_wait(self._last)
