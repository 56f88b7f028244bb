"""A served app freezes its start-up heap and raises the collector's thresholds once started."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator

from fastapi import FastAPI

from shared.lib.http_service import GC_THRESHOLDS, tune_gc_after_startup


async def test_the_collector_is_tuned_after_the_apps_own_startup() -> None:
    order: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        order.append(f"started with {gc.get_threshold()}")
        yield
        order.append("stopped")

    app = FastAPI(lifespan=lifespan)
    tune_gc_after_startup(app)
    before = gc.get_threshold()
    assert before != GC_THRESHOLDS
    try:
        async with app.router.lifespan_context(app):
            assert order == [f"started with {before}"]  # the app's own start-up ran first
            assert gc.get_threshold() == GC_THRESHOLDS
            assert gc.get_freeze_count() > 0
        assert order[-1] == "stopped"
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
