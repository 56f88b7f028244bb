"""A local HTTP endpoint standing in for the LangSmith API, recording the runs it receives.

It answers ``/info`` so the client uses the plain JSON ``/runs/batch`` endpoint,
and merges every posted and patched run by id, so a test can assert on the
parent/child structure of a trace built by several processes.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import uvicorn
import zstandard
from fastapi import FastAPI, Request

from support.tests.procs import free_port

__all__ = ["LangSmithStandIn"]


class LangSmithStandIn:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server = uvicorn.Server(
            uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def _merge(self, run: dict[str, Any]) -> None:
        with self._lock:
            self.runs.setdefault(str(run["id"]), {}).update({k: v for k, v in run.items() if v is not None})

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/info")
        async def info() -> dict[str, Any]:
            config = {
                "use_multipart_endpoint": False,
                "size_limit": 100,
                "size_limit_bytes": 20 * 1024 * 1024,
                "scale_up_qsize_trigger": 1000,
                "scale_up_nthreads_limit": 16,
                "scale_down_nempty_trigger": 4,
            }
            return {"version": "0.0-standin", "batch_ingest_config": config}

        @app.post("/runs/batch")
        async def batch(request: Request) -> dict[str, Any]:
            body = await request.body()
            if request.headers.get("content-encoding") == "zstd":
                body = zstandard.ZstdDecompressor().decompress(body, max_output_size=64 << 20)
            data = orjson.loads(body)
            for run in [*data.get("post", []), *data.get("patch", [])]:
                self._merge(run)
            return {}

        @app.post("/runs")
        async def post(request: Request) -> dict[str, Any]:
            self._merge(orjson.loads(await request.body()))
            return {}

        @app.patch("/runs/{run_id}")
        async def patch(run_id: str, request: Request) -> dict[str, Any]:
            self._merge({"id": run_id, **orjson.loads(await request.body())})
            return {}

        return app

    def __enter__(self) -> LangSmithStandIn:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)

    def env(self) -> dict[str, str]:
        return {
            "LANGSMITH_TRACING": "true",
            "LANGSMITH_ENDPOINT": self.url,
            "LANGSMITH_API_KEY": "standin-key",
            "LANGSMITH_PROJECT": "agent-orchestrator-tests",
        }

    def named(self, prefix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.runs.values() if str(r.get("name", "")).startswith(prefix)]
